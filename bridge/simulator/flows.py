"""The event sequences of the simulator: realistic entity lifecycles, interleaved, plus the rate schedule.

Pure and synchronous: no I/O, no clock of its own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Final, TypeAlias

__all__ = ["BURST", "EventSource", "Flow", "RateSchedule", "Step"]

# Events per scheduling burst: the emitter yields to the loop at least this often.
BURST: Final = 256

Step: TypeAlias = tuple[str, str]
Flow: TypeAlias = Iterator[Step]


class RateSchedule:
    """When the next generated events are due: after a (re)start, event k is due at t0 + k/rate.

    Deadline-based, so a slow loop catches up in bursts (of at most ``BURST``) rather than
    drifting; a restart after a pause does not catch up on the idle time.
    """

    __slots__ = ("_base", "_t0", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._t0 = 0.0
        self._base = 0

    def restart(self, now: float, generated: int) -> None:
        """Start a fresh schedule at ``now``, with ``generated`` events already out."""
        self._t0, self._base = now, generated

    def due(self, now: float, generated: int) -> int:
        """How many events to send now (0: wait ``delay()`` first); at most ``BURST``."""
        if self.rate <= 0:
            return BURST
        behind = self._base + int((now - self._t0) * self.rate) + 1 - generated
        return max(0, min(behind, BURST))

    def delay(self, now: float, generated: int) -> float:
        """Seconds until the next event is due."""
        return self._t0 + (generated - self._base) / self.rate - now


class EventSource:
    """Deterministic, realistic event sequences: entity lifecycles, interleaved.

    Entity ids look like the MongoDB ObjectIds of the Orangepill WebSocket documentation (24 hex) and stay the same
    through an entity's lifecycle.
    """

    def __init__(self, seed: int, index: int) -> None:
        self._rng = random.Random(f"orangepill-sim:{seed}:{index}")
        self._serial = 0
        self._accounts: list[str] = []
        self._users: list[str] = []
        self._identities: list[str] = []
        # The first flow runs alone so a demo opens with the readable happy path.
        self._flows: list[Flow] = [self._onboarding(first_deposit=True)]
        self._solo = True
        self._kinds: tuple[tuple[Callable[[], Flow], int], ...] = (
            (self._onboarding, 8),
            (self._deposit, 22),
            (self._withdrawal, 10),
            (self._transfer, 14),
            (self._currency, 3),
            (self._alias, 4),
            (self._apps_payment, 12),
            (self._apps_deposit, 8),
            (self._messaging, 8),
            (self._persons_sync, 3),
            (self._maintenance, 6),
        )
        self._weights = [weight for _, weight in self._kinds]

    def take(self, n: int) -> list[Step]:
        """Return the next ``n`` (event, entity id) steps."""
        rng = self._rng
        flows = self._flows
        out: list[Step] = []
        while len(out) < n:
            if not flows or (not self._solo and len(flows) < 6 and rng.random() < 0.2):
                factory = rng.choices(self._kinds, weights=self._weights)[0][0]
                flows.append(factory())
            index = rng.randrange(len(flows)) if not self._solo else 0
            step = next(flows[index], None)
            if step is None:
                flows.pop(index)
                self._solo = False
                continue
            out.append(step)
        return out

    def _oid(self) -> str:
        self._serial += 1
        return f"{(0x63967141 + self._serial * 7) & 0xFFFFFFFF:08x}{self._rng.getrandbits(64):016x}"

    def _chance(self, p: float) -> bool:
        return self._rng.random() < p

    def _account(self) -> str:
        return self._rng.choice(self._accounts) if self._accounts else self._oid()

    def _onboarding(self, first_deposit: bool = False) -> Flow:
        user, identity, account = self._oid(), self._oid(), self._oid()
        yield "user.created", user
        self._users.append(user)
        yield "identity.created", identity
        self._identities.append(identity)
        if self._chance(0.2):
            person = self._oid()
            yield "person.created", person
            yield "person.assigned", person
        yield "account.creating", account
        if not first_deposit and self._chance(0.06):
            yield "account.failed", account
            return
        yield "account.created", account
        self._accounts.append(account)
        if first_deposit:
            yield from self._deposit(account, happy=True)
        elif self._chance(0.3):
            yield "sms.message.sent", self._oid()

    def _deposit(self, account: str | None = None, happy: bool = False) -> Flow:
        account = account or self._account()
        deposit = self._oid()
        yield "deposit.pending", deposit
        yield "deposit.received", deposit
        yield "deposit.processing", deposit
        if not happy and self._chance(0.25):
            yield "deposit.gas", deposit
        if not happy and self._chance(0.05):
            yield "deposit.failed", deposit
            return
        yield "deposit.processed", deposit
        yield "account.incoming", account
        transaction = self._oid()
        yield "transaction.processing", transaction
        if not happy and self._chance(0.03):
            yield "transaction.failed", transaction
            return
        yield "transaction.done", transaction

    def _withdrawal(self) -> Flow:
        account, withdrawal, transaction = self._account(), self._oid(), self._oid()
        yield "withdrawal.creating", withdrawal
        yield "transaction.processing", transaction
        if self._chance(0.06):
            yield "transaction.failed", transaction
            yield "withdrawal.failed", withdrawal
            return
        yield "account.outgoing", account
        yield "transaction.done", transaction
        yield "withdrawal.processed", withdrawal

    def _transfer(self) -> Flow:
        source, target, transaction = self._account(), self._account(), self._oid()
        yield "transaction.processing", transaction
        if self._chance(0.2):
            yield "transaction.updated", transaction
        if self._chance(0.04):
            yield "transaction.failed", transaction
            return
        yield "account.outgoing", source
        yield "account.incoming", target
        yield "transaction.done", transaction

    def _currency(self) -> Flow:
        currency = self._oid()
        if self._chance(0.08):
            yield "currency.failed", currency
            return
        yield "currency.created", currency
        yield "currency.issued", currency
        if self._chance(0.3):
            yield "currency.destroyed", currency

    def _alias(self) -> Flow:
        alias = self._oid()
        yield "alias.created", alias
        if self._chance(0.5):
            yield "alias.updated", alias
        if self._chance(0.2):
            yield "alias.deleted", alias

    def _apps_payment(self) -> Flow:
        payment, transaction = self._oid(), self._oid()
        yield "apps.payment.pending", payment
        yield "apps.payment.status", payment
        yield "apps.payment.processing", payment
        if self._chance(0.07):
            yield "apps.payment.failed", payment
            return
        yield "apps.payment.done", payment
        yield ("apps.forward.done" if self._chance(0.9) else "apps.forward.failed"), transaction

    def _apps_deposit(self) -> Flow:
        account, deposit = self._account(), self._oid()
        yield "apps.deposit.pending", deposit
        yield "apps.deposit.processing", deposit
        if self._chance(0.06):
            yield "apps.deposit.failed", deposit
            return
        yield "apps.deposit.done", deposit
        yield "account.incoming", account

    def _messaging(self) -> Flow:
        channel = self._rng.choice(("sms", "whatsapp", "html"))
        outcome = "sent" if self._chance(0.85) else "failed"
        yield f"{channel}.message.{outcome}", self._oid()

    def _persons_sync(self) -> Flow:
        sync = self._oid()
        yield "persons.sync.started", sync
        for _ in range(self._rng.randint(1, 3)):
            yield ("person.created" if self._chance(0.5) else "person.updated"), self._oid()
        yield ("company.created" if self._chance(0.5) else "company.updated"), self._oid()
        yield "persons.sync.done", sync

    def _maintenance(self) -> Flow:
        rng = self._rng
        roll = rng.random()
        if roll < 0.3 and self._users:
            yield "user.updated", rng.choice(self._users)
        elif roll < 0.55 and self._identities:
            yield "identity.updated", rng.choice(self._identities)
        elif roll < 0.8:
            yield "account.updated", self._account()
        elif roll < 0.85:
            yield "person.unassigned", self._oid()
        elif roll < 0.88:
            yield "person.deleted", self._oid()
        elif roll < 0.91:
            yield "company.deleted", self._oid()
        elif roll < 0.95 and self._identities:
            yield "identity.deleted", self._identities.pop(rng.randrange(len(self._identities)))
        elif self._users:
            yield "user.deleted", self._users.pop(rng.randrange(len(self._users)))
        else:
            yield "user.updated", self._oid()
