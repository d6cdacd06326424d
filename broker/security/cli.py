"""``halfmq user ...`` and ``halfmq token ...``, and the login and TLS options every client
command shares (``send``, ``consume``, ``admin``).

How this works
--------------
``user`` and ``token`` change users either **offline**, on a data directory
(``--data-dir DIR``, the broker's default ``./halfmq-data``): they take the directory's
lock, so they never race a running broker (a locked directory is refused with a hint to
use ``--http``), and write the same settings the broker reads at start; or **online**,
through the admin API of a running broker (``--http URL``), where the change applies at
once; or, in cluster mode, **in the engine** the gateways share (``--engine URLS``), which
every running gateway picks up at once (the first admin of a cluster is made this way).
Passwords are read from standard input (``--password-stdin``, one line) or asked
twice on a terminal; never from the command line.

Client commands log in with ``--user NAME`` (or ``HALFMQ_USER``) and the password in
``HALFMQ_PASSWORD`` (asked on a terminal when missing); on the admin API also with
``--token`` (or ``HALFMQ_TOKEN``). ``--tls`` checks the broker's certificate against the
system's CAs, ``--tls-ca FILE`` against that CA; ``--tls-cert``/``--tls-key`` present a
client certificate (mutual TLS).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any

from broker.frontends.http.guard import CSRF_HEADER
from broker.security.rights import RIGHTS
from broker.security.tls import client_context

__all__ = ["add_client_options", "add_http_login_options", "add_users_offline", "client_kwargs", "env_login_headers",
           "http_call", "token_main", "user_main"]

DEFAULT_DATA_DIR = "./halfmq-data"
DEFAULT_HTTP = "http://127.0.0.1:7601"


class CommandError(SystemExit):
    """Exit with a message on standard error."""


# -- shared client options ----------------------------------------------------------------


def add_tls_options(p: argparse.ArgumentParser) -> None:
    """``--tls``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``."""
    p.add_argument("--tls", action="store_true", help="connect with TLS, checking the broker against the system's CAs")
    p.add_argument("--tls-ca", metavar="FILE", help="connect with TLS, checking the broker against this CA (PEM)")
    p.add_argument("--tls-cert", metavar="FILE", help="client certificate for mutual TLS (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="key of --tls-cert, if not in that file (PEM)")


def add_client_options(p: argparse.ArgumentParser) -> None:
    """Login (``--user``; password from ``HALFMQ_PASSWORD`` or a prompt) and TLS options."""
    p.add_argument("--user", default=os.environ.get("HALFMQ_USER") or None,
                   help="log in as this user (default: HALFMQ_USER; password: HALFMQ_PASSWORD or asked)")
    add_tls_options(p)


def add_http_login_options(p: argparse.ArgumentParser) -> None:
    """``add_client_options`` plus ``--token`` (bearer token for the admin API)."""
    add_client_options(p)
    p.add_argument("--token", default=os.environ.get("HALFMQ_TOKEN") or None,
                   help="bearer token for the admin API (default: HALFMQ_TOKEN)")


def _tls(a: argparse.Namespace) -> ssl.SSLContext | None:
    if not (a.tls or a.tls_ca or a.tls_cert):
        return None
    try:
        return client_context(ca=a.tls_ca, cert=a.tls_cert, key=a.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"halfmq: cannot load TLS files: {exc}") from None


def _password_for(user: str) -> str:
    password = os.environ.get("HALFMQ_PASSWORD")
    if password:
        return password
    if not sys.stdin.isatty():
        raise CommandError(f"halfmq: no password for user {user!r}: set HALFMQ_PASSWORD")
    return getpass.getpass(f"password of {user}: ")


def client_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    """The SDK keyword arguments (``user``, ``password``, ``tls``) for parsed client options."""
    out: dict[str, Any] = {"tls": _tls(a)}
    if a.user:
        out["user"], out["password"] = a.user, _password_for(a.user)
    return out


def env_login_headers() -> dict[str, str]:
    """Admin API headers from the environment alone (``HALFMQ_TOKEN``, else ``HALFMQ_USER``
    and ``HALFMQ_PASSWORD``), for commands without login options; plus the cross-site header."""
    headers = {CSRF_HEADER: "cli"}
    token, user, password = (os.environ.get(n) for n in ("HALFMQ_TOKEN", "HALFMQ_USER", "HALFMQ_PASSWORD"))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    elif user and password:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return headers


def http_call(a: argparse.Namespace, method: str, url: str, body: Any = None, prog: str = "halfmq") -> Any:
    """Call the admin API with the login and TLS of ``a``; return the JSON answer or exit."""
    headers = {CSRF_HEADER: "cli"}
    data = None
    if method == "POST":
        data = json.dumps(body if body is not None else {}).encode()
        headers["Content-Type"] = "application/json"
    if getattr(a, "token", None):
        headers["Authorization"] = f"Bearer {a.token}"
    elif getattr(a, "user", None):
        raw = f"{a.user}:{_password_for(a.user)}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
    req = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=_tls(a)) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        raise CommandError(f"{prog}: HTTP {exc.code}: {text}") from None
    except urllib.error.URLError as exc:
        raise CommandError(f"{prog}: cannot reach {url}: {exc.reason}") from None


# -- users and tokens -------------------------------------------------------------------


def _read_new_password(a: argparse.Namespace) -> str:
    if a.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("new password: ")
        if getpass.getpass("again: ") != password:
            raise CommandError("halfmq user: the passwords differ")
    else:
        raise CommandError("halfmq user: give the password on standard input with --password-stdin")
    if not password:
        raise CommandError("halfmq user: the password must not be empty")
    return password


async def _on_engine(engine: str, replicas: int, action: Any) -> Any:
    """Run ``action(directory)`` on the users kept by a cluster's engine (``--engine``):
    every gateway reloads them at once (they watch the engine's settings)."""
    from broker.engines.jetstream.check import split_engine_urls
    from broker.engines.jetstream.client import EngineClient
    from broker.engines.jetstream.streams import StreamSet
    from broker.security.directory import UserDirectory

    client = EngineClient(split_engine_urls(engine), name="halfmq user")
    await client.connect()
    try:
        streams = StreamSet(client, replicas=replicas)
        await streams.ensure_shared()
        directory = UserDirectory(streams)
        await directory.load()
        return await action(directory)
    finally:
        await client.close()


async def _offline(data_dir: str, action: Any) -> Any:
    """Run ``action(directory)`` on the users of ``data_dir`` under its lock."""
    from broker.engines.embedded.settings import MetadataSettings
    from broker.security.directory import UserDirectory
    from storage import DataDirLockedError, Metadata
    from storage.lock import DataDirLock

    os.makedirs(data_dir, exist_ok=True)
    try:
        lock = DataDirLock.acquire(data_dir)
    except DataDirLockedError as exc:
        raise CommandError(f"halfmq: {exc} (a running broker?): change users through it with "
                           f"--http URL (its admin API), or stop it first") from None
    try:
        md = await Metadata.open(os.path.join(data_dir, "meta.sqlite"))
        try:
            directory = UserDirectory(MetadataSettings(md))
            await directory.load()
            return await action(directory)
        finally:
            await md.close()
    finally:
        lock.release()


async def add_users_offline(data_dir: str, users: dict[str, tuple[str, list[tuple[str, str, str | None]]]]) -> None:
    """Create ``users`` ({name: (password, [(right, topic, group), ...])}) in the stopped
    broker's ``data_dir`` (tests, benchmarks and scripts that set a broker up)."""

    async def create(directory: Any) -> None:
        for name, (password, grants) in users.items():
            await directory.add_user(name, password)
            for right, topic, group in grants:
                await directory.grant(name, right, topic, group)

    await _offline(data_dir, create)


def _target_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=os.environ.get("HALFMQ_DATA_DIR") or DEFAULT_DATA_DIR,
                   help=f"change the users of this stopped broker's data directory (default: {DEFAULT_DATA_DIR})")
    p.add_argument("--http", default=None, metavar="URL",
                   help="change them through the admin API of a running broker instead (takes effect at once)")
    p.add_argument("--engine", default=None, metavar="URLS",
                   help="cluster mode: change them in the engine the gateways share "
                        "(nats://n1:4222,...; takes effect on every gateway at once)")
    p.add_argument("--replicas", type=int, default=3,
                   help="with --engine: replicas of the settings stream if it must be created (default 3)")
    add_http_login_options(p)


def _run(a: argparse.Namespace, offline: Any, online: tuple[str, str, Any]) -> int:
    """Run the offline coroutine factory or the online (method, path, body) call; print JSON."""
    from broker.security.directory import DirectoryError

    if a.http:
        method, path, body = online
        out = http_call(a, method, a.http.rstrip("/") + path, body, prog=f"halfmq {a.command}")
    else:
        try:
            out = asyncio.run(_on_engine(a.engine, a.replicas, offline) if a.engine
                              else _offline(a.data_dir, offline))
        except DirectoryError as exc:
            raise CommandError(f"halfmq {a.command}: {exc}") from None
    print(json.dumps(out, indent=2))
    return 0


def user_main(argv: list[str]) -> int:
    """``halfmq user add|passwd|list|remove|grant|revoke|verifier``."""
    from broker.security.users import make_verifier

    p = argparse.ArgumentParser(prog="halfmq user", description="Users, their passwords and rights.")
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="add a user (the password from standard input or asked)")
    add.add_argument("name")
    passwd = sub.add_parser("passwd", help="give a user a new password")
    passwd.add_argument("name")
    for s in (add, passwd):
        s.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    sub.add_parser("list", help="users and their grants")
    rm = sub.add_parser("remove", help="remove a user and its tokens")
    rm.add_argument("name")
    for verb in ("grant", "revoke"):
        g = sub.add_parser(verb, help=f"{verb} a right on the topics matching a glob")
        g.add_argument("name")
        g.add_argument("right", choices=RIGHTS)
        g.add_argument("pattern", help="glob on topic names, e.g. transfer, 'orders-*', '%%DLQ%%*', '*'")
        g.add_argument("--group", default=None,
                       help="glob on group names: the producer groups (publish) or consumer groups "
                            "(subscribe, required) it may use")
    kc = sub.add_parser("key-create", help="a new access key and secret key for RocketMQ 5 (gRPC) clients "
                                           "acting as NAME (the secret is printed once)")
    kc.add_argument("name")
    sub.add_parser("key-list", help="gRPC access keys: key, user, created")
    kr = sub.add_parser("key-revoke", help="revoke a gRPC access key")
    kr.add_argument("access_key")
    ver = sub.add_parser("verifier", help="print a SCRAM-SHA-256 verifier for a users file (no broker needed)")
    ver.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    for s in (add, passwd, sub.choices["list"], rm, sub.choices["grant"], sub.choices["revoke"], kc,
              sub.choices["key-list"], kr):
        _target_options(s)
    a = p.parse_args(argv)
    a.command = "user"
    try:
        if a.cmd == "verifier":
            print(make_verifier(_read_new_password(a)).to_text())
            return 0
        if a.cmd in ("add", "passwd"):
            password = _read_new_password(a)
            if a.cmd == "add":
                return _run(a, lambda d: _described(d.add_user(a.name, password)),
                            ("POST", "/api/users", {"user": a.name, "password": password}))
            return _run(a, lambda d: _done(d.set_password(a.name, password), {"user": a.name, "password": "changed"}),
                        ("POST", f"/api/users/{a.name}/password", {"password": password}))
        if a.cmd == "list":
            return _run(a, lambda d: _value({"users": d.list_users()}), ("GET", "/api/users", None))
        if a.cmd == "key-create":
            async def create_key(d: Any) -> Any:
                key = await d.create_access_key(a.name)
                return {**key.describe(), "secret_key": key.secret}

            return _run(a, create_key, ("POST", "/api/access-keys", {"user": a.name}))
        if a.cmd == "key-list":
            return _run(a, lambda d: _value({"access_keys": d.list_access_keys()}), ("GET", "/api/access-keys", None))
        if a.cmd == "key-revoke":
            return _run(a, lambda d: _done(d.revoke_access_key(a.access_key), {"revoked": a.access_key}),
                        ("POST", f"/api/access-keys/{a.access_key}/revoke", None))
        if a.cmd == "remove":
            return _run(a, lambda d: _done(d.remove_user(a.name), {"removed": a.name}),
                        ("POST", f"/api/users/{a.name}/remove", None))
        body = {"right": a.right, "topic": a.pattern, "group": a.group}
        change = "grant" if a.cmd == "grant" else "revoke"

        async def offline(d: Any) -> Any:
            await getattr(d, change)(a.name, a.right, a.pattern, a.group)
            return d.state.users[a.name].describe()

        return _run(a, offline, ("POST", f"/api/users/{a.name}/{change}", body))
    except CommandError as exc:
        print(exc.code, file=sys.stderr)
        return 1


def token_main(argv: list[str]) -> int:
    """``halfmq token create|list|revoke``: bearer tokens for the admin API."""
    p = argparse.ArgumentParser(prog="halfmq token", description="Bearer tokens for the admin API.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="a new token acting as USER (printed once)")
    c.add_argument("user")
    sub.add_parser("list", help="tokens: id, user, created")
    r = sub.add_parser("revoke", help="revoke a token by its id")
    r.add_argument("token_id")
    for s in sub.choices.values():
        _target_options(s)
    a = p.parse_args(argv)
    a.command = "token"
    try:
        if a.cmd == "create":
            async def create(d: Any) -> Any:
                text, token = await d.create_token(a.user)
                return {"token": text, **token.describe()}

            return _run(a, create, ("POST", "/api/tokens", {"user": a.user}))
        if a.cmd == "list":
            return _run(a, lambda d: _value({"tokens": d.list_tokens()}), ("GET", "/api/tokens", None))
        return _run(a, lambda d: _done(d.revoke_token(a.token_id), {"revoked": a.token_id}),
                    ("POST", f"/api/tokens/{a.token_id}/revoke", None))
    except CommandError as exc:
        print(exc.code, file=sys.stderr)
        return 1


async def _value(v: Any) -> Any:
    return v


async def _done(coro: Any, result: Any) -> Any:
    await coro
    return result


async def _described(coro: Any) -> Any:
    return (await coro).describe()
