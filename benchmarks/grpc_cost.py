"""What a busy gRPC client costs native clients: native publish throughput alone, and
while an official RocketMQ client publishes through the gRPC port at full speed.

    python -m benchmarks.grpc_cost [--rounds 3] [--duration 3] [--window 256]

Both front ends share the broker's one event loop. Each round starts one broker
(``--flush sync`` with ``--grpc-port``) and measures, on it, (a) a native producer alone
and (b) the same native producer with a gRPC producer (``Producer.send_async``, ``window``
in flight) started at the same moment; rounds interleave a and b. Printed: the native
rate in each (median and range over rounds), their ratio, the gRPC rate, and the broker's
CPU. Compare within one run only: the machine's load moves every absolute figure.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from typing import Any

from benchmarks.harness import _install_uvloop, run_flow
from benchmarks.systems.halfmq_grpc import Server

__all__ = ["measure", "main"]


def _params(duration: float, warmup: float, window: int, **over: Any) -> dict[str, Any]:
    p = {"mode": "publish", "window": window, "duration": duration, "warmup": warmup, "count": 0, "size": 1024}
    p.update(over)
    return p


async def measure(*, rounds: int, duration: float, warmup: float, window: int,
                  progress: Any = None) -> dict[str, Any]:
    """Run the rounds; return the per-round rates and CPU figures."""
    server = Server()
    why = await server.unavailable()
    if why:
        raise SystemExit(f"grpc_cost: {why}")
    out: dict[str, list[Any]] = {"alone": [], "mixed": [], "grpc": [], "cpu_alone": [], "cpu_mixed": []}
    for rnd in range(rounds):
        conn = await server.start_cell(f"cost{rnd}", tempfile.gettempdir())
        try:
            both = {"address": server.broker.address, "grpc": conn["address"], "topic": conn["topic"]}  # type: ignore[union-attr]
            native = _params(duration, warmup, window, system="halfmq")
            a = await run_flow(server, both, [native], [])
            b = await run_flow(server, both, [native, _params(duration, warmup, window, system="halfmq_grpc")], [])
        finally:
            await server.stop_cell()
        out["alone"].append(a["producers"][0]["rate"])
        out["mixed"].append(b["producers"][0]["rate"])
        out["grpc"].append(b["producers"][1]["rate"])
        out["cpu_alone"].append(a["monitor"]["cpu"].get("server", 0.0))
        out["cpu_mixed"].append(b["monitor"]["cpu"].get("server", 0.0))
        if progress:
            progress(f"round {rnd + 1}: native alone {out['alone'][-1]:,.0f}/s, with gRPC "
                     f"{out['mixed'][-1]:,.0f}/s, gRPC {out['grpc'][-1]:,.0f}/s")
    return out


def render(r: dict[str, Any], *, duration: float, window: int) -> str:
    def med(key: str) -> str:
        v = r[key]
        return f"{statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f})"

    ratios = [m / a for a, m in zip(r["alone"], r["mixed"], strict=True) if a]
    return "\n".join([
        f"native publish (window {window}, 1 KiB, --flush sync), {len(r['alone'])} rounds of {duration:g} s:",
        f"  alone:                       {med('alone')} msgs/s, broker CPU {med('cpu_alone')} %",
        f"  with a gRPC producer at full speed: {med('mixed')} msgs/s, broker CPU {med('cpu_mixed')} %",
        f"  native kept: {statistics.median(ratios):.0%} ({min(ratios):.0%}-{max(ratios):.0%}) of its rate",
        f"  the gRPC producer (official client, send_async, window {window}): {med('grpc')} msgs/s",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.grpc_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=3.0, help="measured seconds per flow (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--window", type=int, default=256)
    a = ap.parse_args(argv)
    _install_uvloop()
    r = asyncio.run(measure(rounds=a.rounds, duration=a.duration, warmup=a.warmup, window=a.window,
                            progress=lambda line: print(line, file=sys.stderr)))
    print(render(r, duration=a.duration, window=a.window))
    return 0


if __name__ == "__main__":
    sys.exit(main())
