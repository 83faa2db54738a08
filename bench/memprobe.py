"""``python -m bench.memprobe run ARGS``: the bridge, plus memory probes on signals (issue 14 diagnostics).

SIGUSR1 writes one JSON report to ``$OPB_PROBE_DIR/probe-<n>.json`` (n counts from 1): RSS and
``/proc/self/smaps_rollup``, pymalloc arena counts (``sys._debugmallocstats``), glibc ``malloc_info``,
GC-tracked objects by type, the spool ledgers' counters and, when ``tracemalloc`` is tracing
(``PYTHONTRACEMALLOC=N``, or ``OPB_TRACEMALLOC_FROM_PROBE=N`` to start tracing at the first
report, so that later ones show what was allocated since), a snapshot next to it
(``probe-<n>.tracemalloc``) and its top 40 tracebacks. SIGUSR2 does the same
after ``gc.collect()`` + ``malloc_trim(0)`` (what a trim would give back at that moment).

Experiment knobs, read from the environment at start (nothing is patched without them):

- ``OPB_WINDOW_ROWS`` / ``OPB_WINDOW_BYTES``: the spool's in-memory window (rows, body bytes);
- ``OPB_COMPACT_BODY=1``: event bodies copied out of orjson's over-allocated buffer;
- ``OPB_ORJSON_RAW=1``: undo the right-sizing of ``bridge/wire.py`` (the code before issue 14's fix);
- ``OPB_MALLOPT``: ``NAME=VALUE,...`` glibc ``mallopt`` calls (``TRIM_THRESHOLD``, ``MMAP_THRESHOLD``,
  ``ARENA_MAX``, ``TOP_PAD``), made before the bridge starts.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import re
import signal
import sys
import tempfile
import time
import tracemalloc
from typing import Any

_MALLOPT = {"TRIM_THRESHOLD": -1, "TOP_PAD": -2, "MMAP_THRESHOLD": -3, "MMAP_MAX": -4, "ARENA_MAX": -8}
_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
_count = 0


def _rss_kb() -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/self/smaps_rollup") as f:
        for line in f:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2))
    return out


def _pymalloc() -> dict[str, Any]:
    """Parse ``sys._debugmallocstats()`` (it writes to the C stderr)."""
    with tempfile.TemporaryFile("w+b") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode(errors="replace")
    keys = {
        "arenas allocated total": "arenas_total", "arenas reclaimed": "arenas_reclaimed",
        "arenas highwater mark": "arenas_highwater", "arenas allocated current": "arenas_current",
        "bytes in allocated blocks": "allocated_bytes", "bytes in available blocks": "available_bytes",
        "unused pools": "unused_pools", "bytes lost to pool headers": "pool_headers",
        "bytes lost to quantization": "quantization", "bytes lost to arena alignment": "alignment",
        "Total": "total",
    }  # fmt: skip
    out: dict[str, Any] = {}
    for line in text.splitlines():
        m = re.match(r"#?\s*([^=]+?)\s*=\s*([\d,]+)$", line.strip())
        if m and m.group(1) in keys:
            out[keys[m.group(1)]] = int(m.group(2).replace(",", ""))
        m = re.match(r"(\d+) unused pools \* \d+ bytes\s*=\s*([\d,]+)", line.strip())
        if m:
            out["unused_pools"] = int(m.group(1))
    return out


def _malloc_info() -> dict[str, Any]:
    fd, path = tempfile.mkstemp(prefix="malloc-info-")
    os.close(fd)
    try:
        fopen = _LIBC.fopen
        fopen.restype = ctypes.c_void_p
        fp = fopen(path.encode(), b"w")
        _LIBC.malloc_info(0, ctypes.c_void_p(fp))
        _LIBC.fclose(ctypes.c_void_p(fp))
        with open(path) as f:
            xml = f.read()
    finally:
        os.unlink(path)
    heaps = re.findall(r'<heap nr="(\d+)">(.*?)</heap>', xml, re.S)
    per_heap = []
    for nr, body in heaps:
        cur = re.search(r'<system type="current" size="(\d+)"/>', body)
        free = re.search(r'<total type="rest" count="(\d+)" size="(\d+)"/>', body)
        fast = re.search(r'<total type="fast" count="(\d+)" size="(\d+)"/>', body)
        per_heap.append({"nr": int(nr), "system": int(cur.group(1)) if cur else None,
                         "free_rest": int(free.group(2)) if free else None,
                         "free_fast": int(fast.group(2)) if fast else None})  # fmt: skip
    tail = xml.rsplit("</heap>", 1)[-1]
    totals = {k: int(v) for k, v in re.findall(r'<(?:total|system|aspace) type="([\w]+)"[^>]*?size="(\d+)"', tail)}
    mmap = re.search(r'<total type="mmap" count="(\d+)" size="(\d+)"/>', tail)
    return {"heaps": per_heap, "totals": totals, "mmap_count": int(mmap.group(1)) if mmap else None}


def _ledgers() -> list[dict[str, Any]]:
    from bridge.spool.ledger import Ledger

    out = []
    for obj in gc.get_objects():
        if isinstance(obj, Ledger):
            out.append({"depth": obj.depth, "pending": obj.pending, "window": obj.window, "in_flight": obj.in_flight,
                        "released": len(obj._released), "disk_only": obj.disk_only,
                        "memory_bytes": obj.memory_bytes, "window_rows": obj.limits.window_rows})  # fmt: skip
    return out


def _probe(trim: bool) -> None:
    global _count
    _count += 1
    n = _count
    t0 = time.monotonic()
    if trim:
        from bridge.memory import release_memory

        release_memory()
    report: dict[str, Any] = {"n": n, "time": time.time(), "trim": trim}
    report["smaps"] = _rss_kb()
    report["pymalloc"] = _pymalloc()
    report["malloc_info"] = _malloc_info()
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    report["gc_objects"] = sum(counts.values())
    report["gc_by_type"] = dict(counts.most_common(25))
    report["ledgers"] = _ledgers()
    report["threads"] = len(os.listdir("/proc/self/task"))
    report["gc_counts"] = gc.get_count()
    out = os.environ.get("OPB_PROBE_DIR", ".")
    if tracemalloc.is_tracing():
        report["tracemalloc_traced"] = tracemalloc.get_traced_memory()
        snap = tracemalloc.take_snapshot()
        snap.dump(os.path.join(out, f"probe-{n}.tracemalloc"))
        report["tracemalloc_top"] = [
            {"size": st.size, "count": st.count, "where": [f"{fr.filename}:{fr.lineno}" for fr in st.traceback]}
            for st in snap.statistics("traceback")[:40]
        ]
    elif n == 1 and os.environ.get("OPB_TRACEMALLOC_FROM_PROBE"):
        tracemalloc.start(int(os.environ["OPB_TRACEMALLOC_FROM_PROBE"]))
    report["probe_s"] = round(time.monotonic() - t0, 3)
    with open(os.path.join(out, f"probe-{n}.json"), "w") as f:
        json.dump(report, f, indent=1)


def _knobs() -> None:
    spec = os.environ.get("OPB_MALLOPT", "")
    for part in filter(None, spec.split(",")):
        name, value = part.split("=")
        ok = _LIBC.mallopt(_MALLOPT[name.strip().upper()], int(value))
        print(f"memprobe: mallopt({name}, {value}) -> {ok}", file=sys.stderr, flush=True)
    if os.environ.get("OPB_COMPACT_BODY"):
        import bridge.wire as wire

        exact = wire.dumps_exact

        def compact(value: Any, *, sort_keys: bool = False) -> bytes:
            return bytes(memoryview(exact(value, sort_keys=sort_keys)))  # a right-sized copy of orjson's buffer

        wire.dumps_exact = compact
        print("memprobe: event bodies copied to right-sized bytes", file=sys.stderr, flush=True)
    if os.environ.get("OPB_ORJSON_RAW"):
        import bridge.wire as wire

        wire.memoryview = lambda b: b  # type: ignore[attr-defined]  # bytes(b) is b: orjson's buffer as it was
        print("memprobe: event bodies kept in orjson's own buffer", file=sys.stderr, flush=True)
    rows, nbytes = os.environ.get("OPB_WINDOW_ROWS"), os.environ.get("OPB_WINDOW_BYTES")
    if rows or nbytes:
        import dataclasses

        import bridge.spool as spool_mod
        from bridge.spool import Limits, Spool

        original = Spool.open.__func__  # type: ignore[attr-defined]
        base = Limits()
        limits = dataclasses.replace(base, window_bytes=int(nbytes) if nbytes else base.window_bytes)
        window = int(rows) if rows else spool_mod.DEFAULT_WINDOW

        async def open_patched(cls: Any, path: str, **kw: Any) -> Any:
            kw.setdefault("window", window)
            kw.setdefault("limits", limits)
            return await original(cls, path, **kw)

        Spool.open = classmethod(open_patched)  # type: ignore[method-assign,assignment]
        print(f"memprobe: spool window {window} rows, {limits.window_bytes} bytes", file=sys.stderr, flush=True)


def main() -> int:
    _knobs()
    signal.signal(signal.SIGUSR1, lambda *_: _probe(False))
    signal.signal(signal.SIGUSR2, lambda *_: _probe(True))
    from bridge.cli import main as bridge_main

    sys.argv = ["orangepill-bridge", *sys.argv[1:]]
    return int(bridge_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
