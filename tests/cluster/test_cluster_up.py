"""``halfmq cluster up`` and the local cluster: real processes, ready lines, clean stop."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from broker.engines.jetstream.binary import MIN_SERVER_VERSION, parse_version, server_version
from broker.engines.jetstream.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[2]


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        assert sel.select(timeout), "no output in time"
        return proc.stdout.readline()
    finally:
        sel.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _node_pids(data_dir: Path) -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(str(data_dir).encode() in c for c in cmd) and cmd[0].endswith(b"nats-server"):
                pids.append(int(d))
    return pids


def test_binary_from_the_wheel_is_recent(nats_server_binary):
    assert server_version(nats_server_binary) >= MIN_SERVER_VERSION
    assert parse_version("nats-server: v2.9.10") == (2, 9, 10)
    with pytest.raises(ValueError):
        parse_version("no digits here")


def test_cluster_up_without_gateways_runs_until_sigterm(nats_server_binary, tmp_path):
    data = tmp_path / "cu"
    with subprocess.Popen([sys.executable, "-m", "broker.cli", "cluster", "up", "--nodes", "3",
                           "--gateways", "0", "--data-dir", str(data)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            line = _read_line(proc, 90)
            if not line.startswith("halfmq cluster ready engine="):
                proc.kill()
                raise AssertionError(f"{line!r} {proc.stderr.read()}")
            fields = dict(p.split("=", 1) for p in line.split()[3:])
            urls, monitors = fields["engine"].split(","), fields["monitor"].split(",")
            assert len(urls) == 3 and all(u.startswith("nats://127.0.0.1:") for u in urls)
            for m in monitors:  # every node sees the same meta leader and syncs always
                with urllib.request.urlopen(m + "/jsz", timeout=5) as r:
                    meta = json.loads(r.read())["meta_cluster"]
                assert meta["cluster_size"] == 3 and meta["leader"]
                with urllib.request.urlopen(m + "/varz", timeout=5) as r:
                    assert json.loads(r.read())["jetstream"]["config"]["sync_always"] is True
            pids = _node_pids(data)
            assert len(pids) == 3
            for i in (1, 2, 3):
                conf = (data / f"n{i}" / "nats.conf").read_text()
                assert f"server_name: n{i}" in conf and "sync_interval: always" in conf
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            err = proc.stderr.read()
            assert "JetStream meta leader" in err and "stopped" in err
            assert not any(_pid_alive(p) for p in pids), "nodes left running"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_cluster_up_refuses_bad_options(tmp_path):
    out = subprocess.run([sys.executable, "-m", "broker.cli", "cluster", "up", "--nodes", "2",
                          "--replicas", "3", "--data-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "--replicas" in out.stderr
    out = subprocess.run([sys.executable, "-m", "broker.cli", "cluster", "down"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "usage: halfmq cluster up" in out.stderr


def test_gateway_that_fails_to_start_stops_everything(nats_server_binary, tmp_path):
    """Until ``halfmq broker --engine`` exists a gateway cannot start: the launcher must say
    so, stop the nodes it started and exit 1 (the same path any failing gateway takes)."""
    data = tmp_path / "cu"
    out = subprocess.run([sys.executable, "-m", "broker.cli", "cluster", "up", "--nodes", "1",
                          "--gateways", "1", "--data-dir", str(data), "--", "--bogus-flag-for-test"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "gateway 0 did not start" in out.stderr
    assert (data / "gw0.log").exists()
    assert _node_pids(data) == []


def test_local_cluster_restart_keeps_a_node_store(nats_server_binary, tmp_path):
    with LocalCluster(tmp_path / "c", nodes=3, binary=nats_server_binary) as c:
        assert c.meta_leader() in {"n1", "n2", "n3"}
        victim = c.meta_leader()
        c.kill9(victim)
        assert not c.node(victim).running
        deadline = time.monotonic() + 30  # the survivors elect another meta leader
        while c.meta_leader() in (None, victim):
            assert time.monotonic() < deadline, "no new meta leader"
            time.sleep(0.1)
        c.start_node(victim)
        assert c.node(victim).running and (c.node(victim).store_dir / "jetstream").exists()
