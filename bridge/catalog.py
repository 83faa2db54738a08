"""The documented Orangepill events, as listed in the upstream WebSocket spec."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "CATALOG",
    "CHANNEL_PATTERN",
    "EXAMPLE_BINDINGS",
    "KNOWN_CHANNELS",
    "EventSpec",
    "lookup",
    "metric_label",
    "metric_labels",
]


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One documented event: its name, what it means, and whether it needs Infobip."""

    name: str
    description: str
    infobip: bool = False

    @property
    def family(self) -> str:
        """The first word of the name (``deposit`` for ``deposit.received``)."""
        return self.name.split(".", 1)[0]


def _e(name: str, description: str, infobip: bool = False) -> EventSpec:
    return EventSpec(name=name, description=description, infobip=infobip)


# Order and wording follow the "Events" table of the Orangepill WebSocket documentation ("WebSocket Subscriptions").
CATALOG: tuple[EventSpec, ...] = (
    _e("user.created", "New user is successfully created."),
    _e("user.updated", "User is updated."),
    _e(
        "user.deleted",
        "User is deleted. All related content is cascade deleted: identities, virtual "
        "currencies, accounts, transactions, deposits, withdrawals.",
    ),
    _e("identity.created", "New identity is successfully created."),
    _e("identity.updated", "Identity is updated."),
    _e("identity.deleted", "Identity is deleted."),
    _e("persons.sync.started", "Two-way synchronization of persons started.", True),
    _e("persons.sync.done", "Two-way synchronization succesfully finished.", True),
    _e("person.created", "Person profile is created.", True),
    _e("person.updated", "Person profile is updated.", True),
    _e("person.deleted", "Person profile is deleted.", True),
    _e("person.assigned", "Person is assigned to Identity.", True),
    _e("person.unassigned", "Person is unassigned from Identity.", True),
    _e("company.created", "Company profile is created.", True),
    _e("company.updated", "Company profile is updated.", True),
    _e("company.deleted", "Company profile is deleted.", True),
    _e(
        "CHANNEL.message.sent",
        "Message is sent to CHANNEL. CHANNEL is sms, whatsapp, html and any other enabled.",
        True,
    ),
    _e(
        "CHANNEL.message.failed",
        "Message failed to CHANNEL. CHANNEL is sms, whatsapp, html and any other enabled.",
        True,
    ),
    _e("account.creating", "New account is being created."),
    _e("account.created", "Account is successfully created."),
    _e("account.failed", "Account creation has failed."),
    _e("account.updated", "Account has been updated."),
    _e("account.incoming", "Incoming balance."),
    _e("account.outgoing", "Outgoing balance."),
    _e("transaction.processing", "New transaction is created and being processed."),
    _e("transaction.updated", "Transaction is updated."),
    _e("transaction.done", "Transaction is successfully processed."),
    _e("transaction.failed", "Transaction processing failed."),
    _e("deposit.pending", "Incoming deposit detected."),
    _e("deposit.received", "Incoming deposit received."),
    _e("deposit.processing", "Deposit is stored and processing."),
    _e("deposit.gas", "Gas is withdrawn for ERC20, BEP20, TRC20 deposit processing."),
    _e("deposit.processed", "Deposit is successfully processed."),
    _e("deposit.failed", "Deposit processing failed."),
    _e("withdrawal.creating", "New withdrawal is created and being processed."),
    _e("withdrawal.processed", "Withdrawal is successfully processed."),
    _e("withdrawal.failed", "Withdrawal processing failed."),
    _e("currency.created", "Virtual currency is successfully created."),
    _e("currency.failed", "Virtual currency failed creating."),
    _e("currency.issued", "New Virtual currency supply issued."),
    _e("currency.destroyed", "Virtual currency supply destroyed."),
    _e("alias.created", "Alias successfully created."),
    _e("alias.updated", "Alias successfully updated."),
    _e("alias.deleted", "Alias successfully deleted."),
    _e("apps.forward.done", "Transaction was successfully forwarded."),
    _e("apps.forward.failed", "Transaction forwarding failed."),
    _e("apps.payment.pending", "Apps.Payment is created and pending."),
    _e("apps.payment.status", "Apps.Payment status change."),
    _e("apps.payment.processing", "Apps.Payment is being processed."),
    _e("apps.payment.done", "Apps.Payment is successfully processed."),
    _e("apps.payment.failed", "Apps.Payment processing failed."),
    _e("apps.deposit.pending", "Apps.Deposit is created and pending."),
    _e("apps.deposit.processing", "Apps.Deposit is being processed."),
    _e("apps.deposit.done", "Apps.Deposit is succesfully processed."),
    _e("apps.deposit.failed", "Apps.Deposit processing failed."),
)

# The channels the Orangepill WebSocket documentation names; other channels still match the pattern but share
# one metric label so that label cardinality stays bounded.
KNOWN_CHANNELS: frozenset[str] = frozenset({"sms", "whatsapp", "html"})

# ``CHANNEL.message.sent`` / ``CHANNEL.message.failed``: CHANNEL is one word.
CHANNEL_PATTERN = re.compile(r"^(?P<channel>[A-Za-z0-9_-]{1,64})\.message\.(?P<outcome>sent|failed)$")

_BY_NAME: dict[str, EventSpec] = {spec.name: spec for spec in CATALOG}

EXAMPLE_BINDINGS: tuple[tuple[str, str], ...] = (
    ("#", "every event"),
    ("transaction.#", "every transaction event"),
    ("deposit.#", "every deposit event"),
    ("*.created", "every creation (user, identity, account, currency, ...)"),
    ("#.failed", "every failure, including apps.payment.failed and sms.message.failed"),
    ("apps.payment.*", "the Apps.Payment lifecycle"),
    ("*.message.*", "every Infobip message event, any channel"),
)


def lookup(name: str) -> EventSpec | None:
    """Return the catalogue entry for an event name, matching the CHANNEL pattern.

    Args:
        name: an event name as received (``deposit.received``, ``sms.message.sent``).

    Returns:
        The entry, or None for a name the Orangepill WebSocket documentation does not document.
    """
    spec = _BY_NAME.get(name)
    if spec is not None:
        return spec
    match = CHANNEL_PATTERN.match(name)
    if match is not None:
        return _BY_NAME["CHANNEL.message." + match.group("outcome")]
    return None


def metric_label(name: str) -> str:
    """Map an event name to a bounded metric label value.

    Catalogue names map to themselves, the documented channels keep their name
    (``sms.message.sent``), other channels collapse to ``CHANNEL.message.sent``,
    and anything else is ``other``.
    """
    if name in _BY_NAME and not name.startswith("CHANNEL."):
        return name
    match = CHANNEL_PATTERN.match(name)
    if match is not None:
        if match.group("channel") in KNOWN_CHANNELS:
            return name
        return "CHANNEL.message." + match.group("outcome")
    return "other"


def metric_labels() -> tuple[str, ...]:
    """Every value ``metric_label`` can return, for pre-initialising series."""
    labels: list[str] = []
    for spec in CATALOG:
        if spec.name.startswith("CHANNEL."):
            outcome = spec.name.rsplit(".", 1)[1]
            labels.extend(f"{ch}.message.{outcome}" for ch in sorted(KNOWN_CHANNELS))
        labels.append(spec.name)
    labels.append("other")
    return tuple(labels)
