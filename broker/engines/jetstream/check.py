"""The engine check run before a gateway serves: version, cluster size, fsync.

How this works
--------------
``check_engine(urls, replicas=..., fsync=...)`` connects once to every client URL and
reads the server's INFO (version, server name, JetStream on), then reads each server's
monitoring endpoint: ``/varz`` for its version and JetStream configuration
(``sync_always``) and ``/jsz`` for the JetStream meta group (cluster size, peer names).
The client protocol cannot tell a server's fsync setting — neither INFO nor the JetStream
account info (``$JS.API.INFO``) carries it — so the monitoring endpoint is required; its
URLs default to port 8222 on each client URL's host (``monitor_urls`` overrides them).

Refusals (``EngineCheckError``, one message naming every problem found):

- a server older than ``MIN_SERVER_VERSION`` (2.12: ``sync_interval`` and the crash
  fixes after Jepsen's NATS analysis), or one without JetStream;
- a JetStream cluster of fewer servers than ``replicas``;
- with ``fsync="always"``: a server that does not sync every write, or no server whose
  configuration could be read at all. With ``fsync="lazy"`` the fsync setting is not
  required; the check logs once, at WARNING, what that risks.

What it tolerates, and why: a server that is down now (unreachable URL, or a peer of the
meta group whose monitoring endpoint does not answer) is listed in ``EngineReport.unchecked``
and logged, not refused — a gateway must be able to start while one engine node is down,
which is the failure cluster mode exists to survive. Every server that answers is held to
the rules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from broker.engines.jetstream.binary import MIN_SERVER_VERSION, parse_version

__all__ = ["EngineCheckError", "EngineReport", "ServerReport", "check_engine", "split_engine_urls"]

log = logging.getLogger("halfmq.engine")

DEFAULT_MONITOR_PORT = 8222
LAZY_FSYNC_WARNING = (
    "engine fsync is lazy (--engine-fsync lazy): nats-server acknowledges a write once a "
    "quorum holds it in memory and syncs to disk only every sync_interval (2 minutes by "
    "default), so acknowledged messages and transaction outcomes can be lost if several "
    "engine machines lose power at once"
)


class EngineCheckError(RuntimeError):
    """The engine does not meet cluster mode's requirements; the message says what to change."""


@dataclass(frozen=True)
class ServerReport:
    """What the check learned about one server."""

    name: str
    version: str
    url: str | None = None
    monitor_url: str | None = None
    sync_always: bool | None = None  # None: the configuration could not be read


@dataclass(frozen=True)
class EngineReport:
    """The result of a successful check."""

    servers: list[ServerReport]
    cluster_size: int
    meta_leader: str | None
    unchecked: list[str] = field(default_factory=list)


def split_engine_urls(engine: str | list[str]) -> list[str]:
    """``"nats://a:4222,nats://b:4222"`` (or a list) → a list of URLs; raises ``ValueError``."""
    items = engine.split(",") if isinstance(engine, str) else list(engine)
    urls = [u.strip() for u in items if u.strip()]
    if not urls:
        raise ValueError("no engine URL given")
    for u in urls:
        parsed = urllib.parse.urlsplit(u)
        if parsed.scheme not in ("nats", "tls") or not parsed.hostname:
            raise ValueError(f"not a nats:// URL: {u!r}")
    return urls


def _default_monitor_url(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{DEFAULT_MONITOR_PORT}"


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


async def _server_info(url: str, timeout: float) -> dict[str, Any]:
    """The INFO a NATS server sends first on every client connection (read, then hang up)."""
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 4222

    async def read() -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            line = await reader.readuntil(b"\r\n")
        finally:
            writer.close()
        if not line.startswith(b"INFO "):
            raise ValueError(f"not a NATS server (it said {line[:40]!r})")
        info: dict[str, Any] = json.loads(line[5:])
        return info

    return await asyncio.wait_for(read(), timeout)


def _version_ok(version: str) -> bool:
    try:
        return parse_version(version) >= MIN_SERVER_VERSION
    except ValueError:
        return False


async def check_engine(urls: str | list[str], *, replicas: int = 3, fsync: str = "always",
                       monitor_urls: list[str] | None = None, timeout: float = 5.0) -> EngineReport:
    """Check the JetStream cluster behind ``urls``; return what was found.

    ``replicas``: copies each stream will keep (default 3). ``fsync``: ``"always"``
    (default: every server must sync each write) or ``"lazy"`` (accept JetStream's
    periodic sync; logs a warning once). ``monitor_urls``: monitoring endpoints (default:
    port 8222 on each URL's host). Raises ``EngineCheckError`` when the engine is refused,
    ``ValueError`` for bad arguments.
    """
    if fsync not in ("always", "lazy"):
        raise ValueError(f"fsync must be 'always' or 'lazy', not {fsync!r}")
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    url_list = split_engine_urls(urls)
    monitors = list(monitor_urls) if monitor_urls is not None else [
        _default_monitor_url(u) for u in url_list]
    problems: list[str] = []
    unchecked: list[str] = []
    servers: dict[str, ServerReport] = {}

    infos = await asyncio.gather(*(_server_info(u, timeout) for u in url_list), return_exceptions=True)
    for url, info in zip(url_list, infos, strict=True):
        if isinstance(info, BaseException):
            unchecked.append(f"{url} (unreachable: {type(info).__name__}: {info})")
            continue
        name = str(info.get("server_name") or info.get("server_id") or url)
        version = str(info.get("version", "?"))
        servers[name] = ServerReport(name, version, url=url)
        if not _version_ok(version):
            problems.append(f"{url} runs nats-server {version}; cluster mode needs "
                            f"{'.'.join(map(str, MIN_SERVER_VERSION))} or newer")
        if not info.get("jetstream"):
            problems.append(f"{url} ({name}) does not have JetStream enabled")
    if not servers:
        raise EngineCheckError("cannot reach any engine server: " + "; ".join(unchecked))
    if problems:  # an old server: its monitoring answers would only add noise
        raise EngineCheckError("; ".join(problems))

    loop = asyncio.get_running_loop()
    cluster_size = 0
    meta_leader: str | None = None
    peers: set[str] = set()
    read_any = False
    for mon in dict.fromkeys(monitors):
        try:
            varz = await loop.run_in_executor(None, _get_json, mon + "/varz", timeout)
            jsz = await loop.run_in_executor(None, _get_json, mon + "/jsz", timeout)
        except (OSError, ValueError) as exc:
            unchecked.append(f"{mon} (monitoring unreachable: {exc})")
            continue
        read_any = True
        name = str(varz.get("server_name") or mon)
        version = str(varz.get("version", "?"))
        js_config = ((varz.get("jetstream") or {}).get("config")) or {}
        sync_always = bool(js_config.get("sync_always", False))
        prior = servers.get(name)
        servers[name] = ServerReport(name, version, url=prior.url if prior else None,
                                     monitor_url=mon, sync_always=sync_always)
        if not _version_ok(version):
            problems.append(f"{name} runs nats-server {version}; cluster mode needs "
                            f"{'.'.join(map(str, MIN_SERVER_VERSION))} or newer")
        if not js_config:
            problems.append(f"{name} does not have JetStream enabled")
        elif not sync_always and fsync == "always":
            interval = js_config.get("sync_interval")
            every = f"every {interval / 1e9:g}s" if isinstance(interval, int | float) else "periodically"
            problems.append(
                f"{name} syncs JetStream writes to disk only {every}: set "
                "'sync_interval: always' in its jetstream block, or accept the risk with "
                "--engine-fsync lazy")
        meta = jsz.get("meta_cluster") or {}
        size = int(meta.get("cluster_size") or 1)
        cluster_size = max(cluster_size, size)
        meta_leader = meta_leader or meta.get("leader") or (name if size == 1 else None)
        peers.add(name)
        peers.update(str(r.get("name")) for r in meta.get("replicas") or [] if r.get("name"))
        if meta.get("leader"):
            peers.add(str(meta["leader"]))

    if not read_any:
        if fsync == "always":
            problems.append(
                "cannot read any server's JetStream configuration from its monitoring "
                f"endpoint (tried {', '.join(dict.fromkeys(monitors))}), so 'sync_interval: "
                "always' cannot be checked: enable monitoring ('http: PORT') and give its "
                "URLs, or accept the risk with --engine-fsync lazy")
        cluster_size = max(len(servers), 1)
    for peer in sorted(peers - {s.name for s in servers.values() if s.sync_always is not None}):
        unchecked.append(f"{peer} (peer whose monitoring endpoint was not given or did not answer)")
    if cluster_size < replicas:
        problems.append(f"the JetStream cluster has {cluster_size} server"
                        f"{'s' if cluster_size != 1 else ''}, fewer than --replicas {replicas}")
    if problems:
        raise EngineCheckError("; ".join(problems))
    for item in unchecked:
        log.warning("engine check: not checked: %s", item)
    if fsync == "lazy":
        log.warning(LAZY_FSYNC_WARNING)
    return EngineReport(sorted(servers.values(), key=lambda s: s.name), cluster_size, meta_leader,
                        unchecked)
