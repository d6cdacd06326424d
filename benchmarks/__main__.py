"""``python -m benchmarks`` / ``halfmq bench``: halfmq and its peers side by side.

Every reachable system runs every scenario it supports, interleaved over rounds, through
one harness (``benchmarks/harness.py``); the report goes to ``benchmarks/results/``
(``latest.md``, ``latest.json``, ``latest.png``). ``python -m benchmarks.e2e`` is the
halfmq-only end-to-end benchmark.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

__all__ = ["bench_main"]


def _split(value: str, known: tuple[str, ...], what: str) -> list[str]:
    out: list[str] = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if item == "all":
            out.extend(known)
        elif item == "halfmq" and what == "system":
            out.extend(("halfmq-sync", "halfmq-async", "halfmq-secure"))
        elif item in known:
            out.append(item)
        else:
            raise SystemExit(f"unknown {what} {item!r}; choose from {', '.join(known)} (or all)")
    return list(dict.fromkeys(out))


def bench_main(argv: list[str]) -> int:
    """Parse the flags, run the comparison, print the Markdown table; returns the exit status."""
    from benchmarks import harness

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="halfmq vs RabbitMQ, NATS JetStream and Redis Streams: one harness, same "
                    "loops, payloads and clocks. Writes benchmarks/results/latest.{md,json,png}.")
    ap.add_argument("--systems", default="all",
                    help="comma list of " + ", ".join(harness.SYSTEMS) + " (halfmq = both flush "
                         "modes and halfmq-secure; default all); unreachable systems are skipped")
    ap.add_argument("--scenarios", default="all",
                    help="comma list of " + ", ".join(harness.SCENARIOS) + " (default all)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--duration", type=float, default=2.5,
                    help="seconds measured per cell after the warm-up (default 2.5)")
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds (default 0.5)")
    ap.add_argument("--count", type=int, default=0,
                    help="send exactly this many messages per cell instead of --duration")
    ap.add_argument("--window", type=int, default=256, help="unconfirmed publishes (default 256)")
    ap.add_argument("--batch", type=int, default=100, help="messages per send_batch (default 100)")
    ap.add_argument("--batch-window", type=int, default=4, help="batches in flight (default 4)")
    ap.add_argument("--size", type=int, default=1024, help="body bytes (default 1024)")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s cells: a smoke run")
    ap.add_argument("--workdir", default=None,
                    help="where data dirs go and fsync is measured (default: system temp dir)")
    ap.add_argument("--out-dir", default=None, help="report directory (default benchmarks/results)")
    ap.add_argument("--stem", default="latest", help="report file name stem (default latest)")
    ap.add_argument("--profile", choices=("cprofile", "py-spy"), default=None,
                    help="profile the halfmq broker(s) and print their top costs")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args(argv)

    systems = _split(args.systems, harness.SYSTEMS, "system")
    scenarios = _split(args.scenarios, harness.SCENARIOS, "scenario")
    s = harness.Settings(duration=args.duration, warmup=args.warmup, count=args.count,
                         window=args.window, batch=args.batch, batch_window=args.batch_window,
                         size=args.size, rounds=args.rounds, workdir=args.workdir,
                         profile=args.profile)
    if args.out_dir:
        s.out_dir = args.out_dir
    if args.quick:
        s.rounds, s.duration, s.warmup = 1, 1.0, 0.2
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    if args.profile == "py-spy" and shutil.which("py-spy") is None:
        print("py-spy is not installed (pip install py-spy); use --profile cprofile", file=sys.stderr)
        return 2
    report, paths = harness.run_comparison(systems, scenarios, s, stem=args.stem, quiet=args.quiet)
    print(harness.render_markdown(report))
    if args.profile:
        for path in report.get("profiles", []):
            print(harness.profile_summary(path, args.profile))
    print("written: " + ", ".join(paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(bench_main(sys.argv[1:]))
