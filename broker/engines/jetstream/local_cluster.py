"""A whole nats-server cluster on one machine: for ``halfmq cluster up`` and the tests.

How this works
--------------
``LocalCluster.start()`` picks three free 127.0.0.1 ports per node (client, route,
monitoring), writes one config per node under the data directory and starts one
``nats-server -c`` process per node, each logging to ``<name>.log`` beside its config.
The configs differ only in name and ports: every node lists every node's route, its
JetStream store is ``<data-dir>/<name>/store`` and (by default) ``sync_interval: always``,
so a write is fsynced before the server acknowledges it. ``max_payload`` is raised to
8 MiB so a 4 MiB halfmq body plus its metadata fits in one message.

Readiness is polled on the monitoring port, never slept for: a node is ready once
``/healthz`` answers 200 and ``/jsz`` names a JetStream meta leader. If a port was taken
between picking and binding (another process won the race), the node exits at once and
the whole start is tried again with new ports, up to three times.

Faults for tests: ``kill9(name)`` (SIGKILL, reaped), ``stop_node(name)`` (SIGTERM, reaped),
``start_node(name)`` (same config, same ports, same store), ``wipe_store(name)`` (the
node's disk is lost), ``pause(name)`` (SIGSTOP, returning once every thread has
stopped) / ``resume(name)`` (SIGCONT). ``stop()``
SIGTERMs every node it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.engines.jetstream.binary import find_nats_server

__all__ = ["ClusterStartError", "LocalCluster", "Node", "free_ports", "wait_stopped"]


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    """Return once every thread of process ``pid`` is stopped (state ``T``/``t``) or gone,
    after a SIGSTOP.

    The kernel hands a SIGSTOP to one thread, and the others stop only once that one has
    run: on a busy machine a paused server went on answering for milliseconds after the
    signal was sent. Without ``/proc`` (not Linux) this returns at once. Raises
    ``TimeoutError`` if a thread still runs after ``timeout`` seconds.
    """
    tasks = Path(f"/proc/{pid}/task")
    if not tasks.is_dir():
        return
    deadline = time.monotonic() + timeout
    while True:
        running = False
        for task in tasks.iterdir():
            try:
                stat = (task / "stat").read_text()
            except OSError:  # the thread exited
                continue
            if stat[stat.rindex(")") + 2] not in "TtZX":  # the state, after "(comm)"
                running = True
                break
        if not running:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} not stopped {timeout:g} s after SIGSTOP")
        time.sleep(0.001)


class ClusterStartError(RuntimeError):
    """The cluster did not come up; the message holds the tail of the failing node's log."""


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` right now (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Node:
    """One nats-server process of a ``LocalCluster``."""

    name: str
    host: str
    client_port: int
    route_port: int
    http_port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    wanted: bool = False  # started and not deliberately killed or stopped

    @property
    def url(self) -> str:
        """Client URL, ``nats://host:port``."""
        return f"nats://{self.host}:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        """Monitoring URL, ``http://host:port``."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def config_path(self) -> Path:
        return self.dir / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.name}.log"

    @property
    def store_dir(self) -> Path:
        return self.dir / "store"

    @property
    def running(self) -> bool:
        """True while its process is alive (a paused process counts as running)."""
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, path: str, timeout: float = 2.0) -> tuple[int, Any]:
        """GET a monitoring endpoint; returns ``(status, json)``; ``(0, None)`` if unreachable."""
        try:
            with urllib.request.urlopen(self.monitor_url + path, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            body = exc.read()
            with contextlib.suppress(ValueError):
                return exc.code, json.loads(body or b"null")
            return exc.code, None
        except (OSError, ValueError):
            return 0, None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the node's log (empty if none yet)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalCluster:
    """N nats-server processes with cluster routes and JetStream on 127.0.0.1.

    Keyword options: ``nodes`` (3), ``sync_always`` (True: ``sync_interval: always``;
    False leaves JetStream's default of a sync every 2 minutes), ``binary`` (default:
    ``find_nats_server()``), ``host`` (``"127.0.0.1"``), ``cluster_name`` (``"halfmq"``).
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, nodes: int = 3, sync_always: bool = True,
                 binary: str | os.PathLike[str] | None = None, host: str = "127.0.0.1",
                 cluster_name: str = "halfmq") -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.data_dir = Path(data_dir).resolve()
        self.size = nodes
        self.sync_always = sync_always
        self.binary = Path(binary) if binary is not None else find_nats_server()
        self.host = host
        self.cluster_name = cluster_name
        self.nodes: list[Node] = []

    # -- addresses -------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node, in node order."""
        return [n.url for n in self.nodes]

    @property
    def engine_url(self) -> str:
        """The value of ``halfmq broker --engine``: every client URL, comma-separated."""
        return ",".join(self.urls)

    @property
    def monitor_urls(self) -> list[str]:
        """Monitoring URLs of every node, in node order."""
        return [n.monitor_url for n in self.nodes]

    def node(self, name: str) -> Node:
        """The node called ``name``; raises ``KeyError``."""
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    # -- lifecycle -------------------------------------------------------------------

    def _config(self, node: Node) -> str:
        routes = ", ".join(f"nats-route://{n.host}:{n.route_port}" for n in self.nodes)
        sync = "  sync_interval: always\n" if self.sync_always else ""
        store = json.dumps(str(node.store_dir))  # a quoted string, escapes included
        return (
            f"server_name: {node.name}\n"
            f"listen: {node.host}:{node.client_port}\n"
            f"http: {node.host}:{node.http_port}\n"
            "max_payload: 8MB\n"
            + (
                "cluster {\n"
                f"  name: {self.cluster_name}\n"
                f"  listen: {node.host}:{node.route_port}\n"
                f"  routes: [{routes}]\n"
                "}\n"
                if self.size > 1 else ""  # one node: plain JetStream, no meta group to elect
            )
            + "jetstream {\n"
            f"  store_dir: {store}\n"
            f"{sync}"
            "}\n"
        )

    def start(self, timeout: float = 60.0) -> LocalCluster:
        """Start every node and wait until the cluster has a JetStream meta leader.

        Raises ``ClusterStartError`` (with the failing node's log) if it does not come up
        within ``timeout`` seconds.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        last: ClusterStartError | None = None
        for _attempt in range(3):
            ports = free_ports(3 * self.size, self.host)
            self.nodes = [
                Node(f"n{i + 1}", self.host, ports[3 * i], ports[3 * i + 1], ports[3 * i + 2],
                     self.data_dir / f"n{i + 1}")
                for i in range(self.size)
            ]
            for n in self.nodes:
                n.dir.mkdir(parents=True, exist_ok=True)
                n.config_path.write_text(self._config(n))
            for n in self.nodes:
                self.start_node(n.name, wait=False)
            try:
                self.wait_ready(timeout)
                return self
            except ClusterStartError as exc:
                last = exc
                exited = any(not n.running for n in self.nodes)
                self.stop()
                if not exited:  # not a port race: a real failure, do not retry
                    break
        assert last is not None
        raise last

    def start_node(self, name: str, *, wait: bool = True, timeout: float = 60.0) -> Node:
        """(Re)start node ``name`` on its config, ports and store; optionally wait until ready."""
        node = self.node(name)
        if node.running:
            raise RuntimeError(f"node {name} is already running")
        node.wanted = True
        with open(node.log_path, "ab") as log:
            node.proc = subprocess.Popen([str(self.binary), "-c", str(node.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready(timeout)
        return node

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll until every wanted node (started, not killed on purpose) is healthy and
        knows the meta leader.

        Raises ``ClusterStartError`` on timeout or if a wanted node's process exited.
        """
        deadline = time.monotonic() + timeout
        while True:
            pending = None
            for n in self.nodes:
                if n.proc is None or not n.wanted:
                    continue
                if n.proc.poll() is not None:
                    raise ClusterStartError(
                        f"nats-server {n.name} exited with status {n.proc.returncode}:\n{n.log_tail()}")
                status, _ = n.monitor("/healthz")
                _, jsz = n.monitor("/jsz")
                leader = ((jsz or {}).get("meta_cluster") or {}).get("leader") if jsz else None
                if status != 200 or (self.size > 1 and not leader):
                    pending = n
                    break
            if pending is None:
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"nats-server {pending.name} not ready after {timeout:.0f}s:\n{pending.log_tail()}")
            time.sleep(0.05)

    def meta_leader(self) -> str | None:
        """Name of the JetStream meta leader as a running node sees it, or None."""
        for n in self.nodes:
            if n.running:
                _, jsz = n.monitor("/jsz")
                leader = ((jsz or {}).get("meta_cluster") or {}).get("leader")
                if leader:
                    return str(leader)
        return None

    def kill9(self, name: str) -> None:
        """SIGKILL node ``name`` and reap it."""
        node = self.node(name)
        node.wanted = False
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)  # a paused process must die too
            node.proc.kill()
            node.proc.wait(10)

    def stop_node(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM node ``name`` (a clean shutdown) and reap it; SIGKILL after ``timeout``."""
        node = self.node(name)
        node.wanted = False
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
            node.proc.terminate()
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(5)

    def pause(self, name: str, timeout: float = 10.0) -> None:
        """SIGSTOP node ``name`` (a process pause: no heartbeat, connections stay open) and
        return once every thread of it has stopped (``wait_stopped``: found by a test whose
        request, sent right after the signal, was answered by the node being paused)."""
        node = self.node(name)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        wait_stopped(node.proc.pid, timeout)

    def resume(self, name: str) -> None:
        """SIGCONT node ``name``."""
        node = self.node(name)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)

    def wipe_store(self, name: str) -> None:
        """Delete the JetStream store of a stopped node (its disk is lost)."""
        node = self.node(name)
        if node.running:
            raise RuntimeError(f"node {name} is running: stop it before wiping its store")
        shutil.rmtree(node.store_dir, ignore_errors=True)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every running node, SIGKILL any still alive after ``timeout`` seconds."""
        for n in self.nodes:
            n.wanted = False
            if n.proc is not None and n.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    n.proc.send_signal(signal.SIGCONT)
                    n.proc.terminate()
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            if n.proc is None:
                continue
            try:
                n.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                n.proc.kill()
                n.proc.wait(5)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
