"""``python -m bench`` (the end-to-end benchmark), ``python -m bench outage`` and ``python -m bench chaos``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("command", nargs="?", default="run", choices=("run", "outage", "profile", "chaos"))
    parser.add_argument("--smoke", action="store_true", help="small N, a few seconds per row: checks, not figures")
    parser.add_argument("--quick", action="store_true", help="outage: 100,000 events instead of 1,000,000")
    parser.add_argument("-n", "--count", type=int, help="events per full-speed run (default: sized for >= 10 s)")
    parser.add_argument("--results-dir", type=Path, help="where the JSON goes (default bench/results)")
    parser.add_argument("--only", action="append", choices=("ceiling", "naive", "node", "pypeer", "bridge"),
                        help="rows to run (pypeer only when named)")
    parser.add_argument("--loop", action="append", choices=("uvloop", "asyncio"), help="loops to run")
    parser.add_argument("--pairs", type=int, help="alternating node/bridge full-speed pairs after the table "
                        "(default 3; --smoke 1; 0: none)")
    chaos = parser.add_argument_group("chaos (issue 14)")
    chaos.add_argument("--minutes", type=float, default=60.0, help="chaos: length of the soak (default 60)")
    chaos.add_argument("--seed", type=int, help="chaos: seed of the fault schedule (printed; default random)")
    chaos.add_argument("--rate", type=float, default=300.0, help="chaos: simulator events/s (default 300)")
    chaos.add_argument("--replicas", type=int, choices=(1, 2), default=1, help="chaos: bridge replicas")
    chaos.add_argument("--broker", choices=("private", "local"), default="private",
                       help="chaos: a private RabbitMQ node on a spare loopback port (default), or 127.0.0.1:5672")
    chaos.add_argument("--gap", type=float, nargs=2, default=(20.0, 60.0), metavar=("MIN", "MAX"),
                       help="chaos: seconds between fault starts (default 20 60)")
    chaos.add_argument("--down", type=float, nargs=2, default=(10.0, 40.0), metavar=("MIN", "MAX"),
                       help="chaos: seconds RabbitMQ stays stopped (default 10 40)")
    chaos.add_argument("--kinds", help="chaos: comma-separated fault kinds to inject (default: all of them)")
    args = parser.parse_args(argv)
    if args.command == "chaos":
        from bench import chaos as chaos_bench

        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip()) if args.kinds else chaos_bench.KINDS
        unknown = sorted(set(kinds) - set(chaos_bench.KINDS))
        if unknown or not kinds:
            choices = ", ".join(chaos_bench.KINDS)
            parser.error(f"--kinds: unknown {', '.join(unknown) or '(none given)'}; one of {choices}")
        return chaos_bench.main(chaos_bench.ChaosConfig(
            minutes=args.minutes, seed=args.seed, rate=args.rate, replicas=args.replicas, broker=args.broker,
            gap=tuple(args.gap), down=tuple(args.down), results_dir=args.results_dir, kinds=kinds,
        ))  # fmt: skip
    if args.command == "outage":
        from bench import outage

        return outage.main(
            count=args.count or (100_000 if args.quick else 1_000_000),
            uvloop_on=(args.loop or ["uvloop"])[0] == "uvloop",
            results_dir=args.results_dir,
        )
    if args.command == "profile":
        from bench import profile

        return profile.main(loop=(args.loop or ["uvloop"])[0], count=args.count or 60_000)
    from bench import run

    pairs = args.pairs if args.pairs is not None else (1 if args.smoke else 3)
    report = run.main(
        smoke=args.smoke, results_dir=args.results_dir, only=args.only, loops=args.loop, count=args.count,
        pairs=pairs,
    )  # fmt: skip
    if "paired" in report and not report["paired"]["complete"]:
        print("INCOMPLETE: the consumer did not count every event in a node/bridge pair", file=sys.stderr)
        return 1
    incomplete = [f"{r['subject']}/{r['loop']}" for r in report["rows"] if not r["complete"]]
    if incomplete:
        print(f"INCOMPLETE: the consumer did not count every event for {', '.join(incomplete)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
