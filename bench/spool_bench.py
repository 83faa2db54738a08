"""Throughput of the spool: put + group commit + get_batch + ack of N messages.

Run: ``.venv/bin/python bench/spool_bench.py [N] [--sync FULL]``. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from bridge.contract import KIND_EVENT, Outbound
from bridge.spool import MEMORY, Spool


def message(n: int) -> Outbound:
    """A message shaped like a real event (about 300 bytes of JSON)."""
    body = (
        b'{"type":"notification","event":"transaction.done","data":{"id":"%08d",'
        b'"amount":"125.00","currency":"USD","status":"done","account":"acc_0123456789abcdef",'
        b'"meta":{"source":"bench","attempt":1}},"timestamp":1700000000000}' % n
    )
    return Outbound(
        kind=KIND_EVENT,
        routing_key="transaction.done",
        message_id=f"{n:032x}",
        body=body,
        headers={"realm": "bench", "entity_id": f"{n:08d}", "received_at": 1700000000000 + n},
        received_at=1700000000.0 + n / 1000,
        metric_kind="transaction.done",
    )


async def run(path: str, count: int, synchronous: str) -> None:
    """Put ``count`` messages while a consumer takes and acks them; print the rate."""
    messages = [message(n) for n in range(count)]
    spool = await Spool.open(path, synchronous=synchronous)

    async def consume() -> None:
        seen = 0
        while seen < count:
            batch = await spool.get_batch(500)
            seen += len(batch)
            spool.ack(item.id for item in batch)

    start = time.perf_counter()
    consumer = asyncio.create_task(consume())
    for m in messages:
        await spool.put(m)
    put_done = time.perf_counter()
    await consumer
    await spool.flush()
    end = time.perf_counter()
    await spool.close()
    print(
        f"{path if path == MEMORY else 'file':>6} sync={synchronous:<6} {count} msgs: "
        f"put {count / (put_done - start):>9,.0f}/s, put+commit+get+ack {count / (end - start):>9,.0f}/s "
        f"({end - start:.2f} s)"
    )

    # Backlog: everything spooled first (broker down), then drained.
    spool = await Spool.open(path, synchronous=synchronous)
    start = time.perf_counter()
    for m in messages:
        await spool.put(m)
    await spool.flush()
    mid = time.perf_counter()
    await consume()
    await spool.flush()
    end = time.perf_counter()
    await spool.close()
    print(f"{'':>6} backlog: spool {count / (mid - start):>9,.0f}/s, then drain {count / (end - mid):>9,.0f}/s")


def main() -> None:
    """Parse arguments and run the benchmark on a temporary file and in memory."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("count", nargs="?", type=int, default=100_000)
    parser.add_argument("--sync", default="NORMAL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(os.path.join(tmp, "bench.db"), args.count, args.sync))
    asyncio.run(run(MEMORY, args.count, args.sync))


if __name__ == "__main__":
    main()
