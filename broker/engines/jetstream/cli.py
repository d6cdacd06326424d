"""``halfmq cluster up``: a whole cluster on one machine, for trying cluster mode and for tests.

How this works
--------------
``halfmq cluster up --nodes 3 --gateways 2 --data-dir DIR`` starts a ``LocalCluster``
(N nats-server processes on free 127.0.0.1 ports, ``sync_interval: always``, stores under
``DIR``), waits for the JetStream meta leader, then starts each gateway as a subprocess
``python -m broker --engine nats://...,... --engine-monitor http://...,... --replicas R
--port 0 --http-port 0 [BROKER_ARGS after --]`` and copies its ready line
(``halfmq broker ready tcp=... http=...``) to standard output, in gateway order. The last
line on standard output is ``halfmq cluster ready engine=<urls> monitor=<urls>``, so a
script (or ``--gateways 0``) also learns the engine's addresses. Progress goes to standard
error; each gateway logs to ``DIR/gw<i>.log``, each node to ``DIR/n<i>/n<i>.log``.

It runs until SIGTERM or SIGINT, then stops the gateways (SIGTERM, graceful), then the
nodes, and exits 0. If anything fails to start, everything already started is stopped and
the exit status is 1 (2 for bad options).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["cluster_main", "start_gateway"]

READY_PREFIX = "halfmq broker ready"


def _say(text: str) -> None:
    print(f"halfmq cluster: {text}", file=sys.stderr, flush=True)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The first line the process writes to stdout, '' on EOF or timeout."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            return ""
        return proc.stdout.readline()
    finally:
        sel.close()


def _forward_rest(proc: subprocess.Popen[str], name: str) -> None:
    """Keep draining a gateway's stdout after its ready line (to our stderr)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"{name}: {line.rstrip()}", file=sys.stderr, flush=True)


def start_gateway(index: int, *, engine_url: str, monitor_urls: list[str], replicas: int,
                  fsync: str, data_dir: Path, extra_args: list[str],
                  timeout: float = 60.0) -> tuple[subprocess.Popen[str], str]:
    """Start gateway ``index`` and wait for its ready line; returns ``(process, ready_line)``.

    Raises ``RuntimeError`` (with its log's tail) if it exits or prints anything else.
    """
    log_path = data_dir / f"gw{index}.log"
    cmd = [sys.executable, "-m", "broker", "--engine", engine_url,
           "--engine-monitor", ",".join(monitor_urls), "--replicas", str(replicas),
           "--engine-fsync", fsync, "--port", "0", "--http-port", "0", *extra_args]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = _read_line(proc, timeout)
    if not line.startswith(READY_PREFIX):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"gateway {index} did not start (printed {line!r}):\n{tail}")
    threading.Thread(target=_forward_rest, args=(proc, f"gw{index}"), daemon=True).start()
    return proc, line.strip()


def _stop_process(proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _up(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(
        prog="halfmq cluster up",
        description="Run a JetStream cluster and halfmq gateways on 127.0.0.1 until SIGTERM. "
                    "Arguments after -- go to every gateway (halfmq broker options).")
    p.add_argument("--nodes", type=int, default=3, help="nats-server processes (default 3)")
    p.add_argument("--gateways", type=int, default=2, help="halfmq gateways (default 2)")
    p.add_argument("--data-dir", default="./halfmq-cluster",
                   help="stores, configs and logs (default ./halfmq-cluster)")
    p.add_argument("--replicas", type=int, default=None,
                   help="copies of each stream (default: 3, or --nodes if fewer)")
    p.add_argument("--engine-fsync", choices=["always", "lazy"], default="always",
                   help="always (default): nats-server syncs every write before acking it; "
                        "lazy: its default periodic sync (can lose acknowledged messages on power loss)")
    a = p.parse_args(argv)
    if a.nodes < 1 or a.gateways < 0:
        p.error("--nodes must be at least 1 and --gateways at least 0")
    replicas = a.replicas if a.replicas is not None else min(3, a.nodes)
    if not 1 <= replicas <= a.nodes:
        p.error(f"--replicas must be between 1 and --nodes ({a.nodes})")

    from broker.engines.jetstream.binary import NatsServerNotFound, server_version
    from broker.engines.jetstream.local_cluster import ClusterStartError, LocalCluster

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    data_dir = Path(a.data_dir).resolve()
    try:
        cluster = LocalCluster(data_dir, nodes=a.nodes, sync_always=a.engine_fsync == "always")
    except NatsServerNotFound as exc:
        print(f"halfmq cluster: {exc}", file=sys.stderr)
        return 1
    version = ".".join(map(str, server_version(cluster.binary)))
    _say(f"starting {a.nodes} nats-server {version} node(s) ({cluster.binary}) in {data_dir}")
    gateways: list[subprocess.Popen[str]] = []
    try:
        cluster.start()
        for n in cluster.nodes:
            _say(f"node {n.name}: {n.url} monitor {n.monitor_url} log {n.log_path}")
        _say(f"JetStream meta leader: {cluster.meta_leader() or '(single node)'}")
        for i in range(a.gateways):
            _say(f"starting gateway {i} (log {data_dir / f'gw{i}.log'})")
            proc, ready = start_gateway(i, engine_url=cluster.engine_url,
                                        monitor_urls=cluster.monitor_urls, replicas=replicas,
                                        fsync=a.engine_fsync, data_dir=data_dir, extra_args=extra)
            gateways.append(proc)
            print(ready, flush=True)
        print(f"halfmq cluster ready engine={cluster.engine_url} "
              f"monitor={','.join(cluster.monitor_urls)}", flush=True)
        _say("running; SIGTERM or Ctrl-C stops everything")
        reported: set[int] = set()
        while not stop.wait(0.5):
            for i, g in enumerate(gateways):
                if g.poll() is not None and i not in reported:
                    reported.add(i)
                    _say(f"gateway {i} exited with status {g.returncode}")
        _say("stopping")
        return 0
    except (ClusterStartError, RuntimeError, OSError) as exc:
        print(f"halfmq cluster: {exc}", file=sys.stderr)
        return 1
    finally:
        for g in gateways:
            _stop_process(g)
        cluster.stop()
        _say("stopped")


def cluster_main(argv: list[str]) -> int:
    """Entry point of ``halfmq cluster``; returns the exit status."""
    if argv and argv[0] == "up":
        return _up(argv[1:])
    print("usage: halfmq cluster up [--nodes N] [--gateways N] [--data-dir DIR] [--replicas N] "
          "[--engine-fsync always|lazy] [-- BROKER_ARGS...]",
          file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cluster_main(sys.argv[1:]))
