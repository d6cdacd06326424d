"""``python -m benchmarks.cluster_failover``: how long cluster mode pauses when a machine
dies, and whether anything acknowledged is lost.

How this works
--------------
It starts a 3-node JetStream cluster (``sync_interval: always``) and two gateways on
127.0.0.1, then a producer and a consumer group through the public SDKs, both given the
address list ``"gwA,gwB"``. The producer keeps ``--window`` sends in flight, every body
unique; the consumer records every body it receives. Faults, one after the other, each
after ``--settle`` seconds of steady traffic:

1. ``kill -9`` of the topic stream's leader (a nats-server process);
2. ``kill -9`` of gateway A, which both clients are connected to.

For each fault: the *pause* is the longest time without any acknowledged send from the
kill on (the kill itself counts as the start of a gap), and *resumed* the time from the
kill to the first acknowledgement after it. At the end the producer stops, and every
acknowledged body must reach the consumer (deliveries leased by the dead gateway come
back after ``--ack-timeout``): *lost* counts those that never do. Prints a Markdown
table (or ``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


async def _leader(urls: list[str], stream: str) -> str:
    import nats

    nc = await nats.connect(servers=urls, connect_timeout=5)
    try:
        info = await nc.jetstream(timeout=10).stream_info(stream)
        assert info.cluster is not None and info.cluster.leader
        return str(info.cluster.leader)
    finally:
        await nc.close()


async def run(a: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.systems.halfmq import start_broker
    from broker.engines.jetstream.local_cluster import LocalCluster
    from consumer_sdk import ConsumeResult, PushConsumer
    from producer_sdk import Producer

    folder = tempfile.mkdtemp(prefix="halfmq-failover-", dir=a.workdir)
    cluster = LocalCluster(Path(folder), nodes=3)
    await asyncio.to_thread(cluster.start)
    gateways = []
    try:
        for _ in range(2):
            gateways.append(await start_broker(workdir=folder, extra=[
                "--engine", cluster.engine_url, "--engine-monitor", ",".join(cluster.monitor_urls),
                "--replicas", "3", "--ack-timeout", f"{a.ack_timeout}s"]))
        both = ",".join(g.address for g in gateways)
        topic = "failover"
        acked: set[bytes] = set()
        ack_times: list[float] = []
        got: set[bytes] = set()
        errors = 0
        stop = asyncio.Event()
        body = os.urandom(max(0, a.size - 16))

        async def on(m: Any) -> Any:
            got.add(m.body[:16])
            return ConsumeResult.SUCCESS

        async with (
            Producer(both, send_timeout=a.send_timeout) as p,
            PushConsumer(both, group="failover", topic=topic, listener=on, prefetch=256),
        ):
            counter = iter(range(1 << 62))

            async def sender() -> None:
                nonlocal errors
                while not stop.is_set():
                    key = f"{next(counter):016d}".encode()
                    try:
                        await p.send(topic, key + body)
                    except Exception:  # noqa: BLE001 - unacknowledged: not promised
                        errors += 1
                        continue
                    acked.add(key)
                    ack_times.append(time.monotonic())

            tasks = [asyncio.create_task(sender()) for _ in range(a.window)]
            faults: list[dict[str, Any]] = []

            async def fault(name: str, kill: Any) -> None:
                await asyncio.sleep(a.settle)
                before = len(ack_times)
                t0 = time.monotonic()
                await kill()
                await asyncio.sleep(a.observe)
                after = [t for t in ack_times[before:] if t >= t0]
                gaps = [b - c for c, b in zip([t0, *after], after, strict=False)]
                faults.append({"fault": name, "pause_s": round(max(gaps, default=a.observe), 2),
                               "resumed_s": round(after[0] - t0, 2) if after else None,
                               "acked_in_window": len(after)})

            stream_leader = await _leader(cluster.urls, f"HMQ_T_{topic}")

            async def kill_leader() -> None:
                await asyncio.to_thread(cluster.kill9, stream_leader)

            async def kill_gateway() -> None:
                gateways[0].proc.kill()
                await gateways[0].proc.wait()

            await fault(f"kill -9 of the stream leader ({stream_leader})", kill_leader)
            await fault("kill -9 of gateway A (both clients on it)", kill_gateway)
            stop.set()
            await asyncio.gather(*tasks)
            deadline = time.monotonic() + a.drain_timeout
            while not acked <= got and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        return {"acknowledged": len(acked), "consumed_distinct": len(got & acked),
                "lost": len(acked - got), "send_errors": errors, "faults": faults,
                "settings": {"window": a.window, "size": a.size, "send_timeout": a.send_timeout,
                             "ack_timeout": a.ack_timeout, "settle": a.settle, "observe": a.observe}}
    finally:
        for g in gateways:
            await g.stop()
        await asyncio.to_thread(cluster.stop)
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run the failover measurement; print the table. Exit status 1 if anything was lost."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cluster_failover", description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=int, default=64, help="sends in flight (default 64)")
    ap.add_argument("--size", type=int, default=1024, help="body bytes (default 1024)")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of traffic before each fault (default 3)")
    ap.add_argument("--observe", type=float, default=15.0, help="seconds watched after each fault (default 15)")
    ap.add_argument("--send-timeout", type=float, default=30.0, help="the producer's send_timeout (default 30)")
    ap.add_argument("--ack-timeout", type=float, default=5.0, help="the gateways' --ack-timeout (default 5)")
    ap.add_argument("--drain-timeout", type=float, default=120.0, help="seconds to wait for the consumer (default 120)")
    ap.add_argument("--workdir", default=None, help="where the cluster's stores go (default: temp dir)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON instead")
    a = ap.parse_args(argv)
    result = asyncio.run(run(a))
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"acknowledged {result['acknowledged']:,}, consumed {result['consumed_distinct']:,}, "
              f"lost {result['lost']}, unacknowledged sends {result['send_errors']}")
        print("\n| fault | longest pause without an ack (s) | first ack after the kill (s) |\n|---|---:|---:|")
        for f in result["faults"]:
            print(f"| {f['fault']} | {f['pause_s']} | {f['resumed_s']} |")
    return 1 if result["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
