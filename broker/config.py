"""Broker configuration: the options of SPEC §2, their parsers, and where they come from.

How this works
--------------
Every option is described once, in ``OPTIONS`` (name, kind, help). Everything else is
derived from that table: the ``argparse`` flags (``--tx-timeout``), the environment
variables (``HALFMQ_TX_TIMEOUT``), the keys accepted in the ``[broker]`` table of a TOML
file (``tx_timeout``) and the error messages.

``load_config()`` merges four layers, the first one that sets an option wins::

    command-line flag  >  environment variable  >  TOML file  >  BrokerConfig default

To tell "flag given" from "flag left at its default", every flag has the argparse default
``SUPPRESS``: an option absent from the parsed namespace was not given.

Values are strings on the command line and in the environment; in the TOML file they may
also be TOML numbers, booleans or (for ``retry_delays``) arrays. Each kind has one parser
(``parse_duration``, ``parse_size``, ``parse_bool``, ... in :mod:`broker.config_values`). A bad value raises
``ConfigError`` (a ``ValueError``) naming the option and the source, e.g.::

    invalid value for tx_timeout from environment variable HALFMQ_TX_TIMEOUT: 'soon'
    (expected a duration like 250ms, 6s, 1m, 2h or bare seconds)

``BrokerConfig`` holds the result: field names are the option names with ``_``, durations
are float seconds, ``retry_delays`` is a tuple of float seconds. Its ``__post_init__``
normalizes and validates, so an embedding program that builds one directly gets the same
checks.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from broker.config_values import (
    _parse_int,
    _parse_str,
    format_duration,
    parse_bool,
    parse_duration,
    parse_duration_list,
    parse_size,
)

__all__ = [
    "BrokerConfig",
    "ConfigError",
    "DEFAULT_RETRY_DELAYS",
    "ENV_PREFIX",
    "OPTIONS",
    "Option",
    "build_arg_parser",
    "format_duration",
    "load_config",
    "parse_bool",
    "parse_duration",
    "parse_duration_list",
    "parse_size",
]

ENV_PREFIX = "HALFMQ_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"

DEFAULT_RETRY_DELAYS: tuple[float, ...] = (
    10.0, 30.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0,
    420.0, 480.0, 540.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0,
)


class ConfigError(ValueError):
    """A configuration value or file is invalid; the message names the option and the source."""


# --------------------------------------------------------------------------- the option table


@dataclass(frozen=True, slots=True)
class Option:
    """One broker option: its name (with ``_``), value parser, metavar and help text."""

    name: str
    parse: Callable[[Any], Any]
    metavar: str | None
    help: str
    boolean: bool = False

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--tx-timeout``."""
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment variable, e.g. ``HALFMQ_TX_TIMEOUT``."""
        return ENV_PREFIX + self.name.upper()


def _parse_flush(s: str) -> str:
    value = _parse_str(s).strip().lower()
    if value not in ("sync", "async"):
        raise ValueError(f"{s!r}: expected 'sync' or 'async'")
    return value


def _parse_nonempty(s: str | os.PathLike[str]) -> str:
    if isinstance(s, os.PathLike):
        s = os.fspath(s)
    if not _parse_str(s):
        raise ValueError("must not be empty")
    return s


def _parse_optional_path(s: str | os.PathLike[str] | None) -> str | None:
    if s is None:
        return None
    return _parse_nonempty(s)


def _parse_port(s: str | int) -> int:
    port = _parse_int(s)
    if not 0 <= port <= 65535:
        raise ValueError(f"{port}: a port must be between 0 and 65535")
    return port


def _parse_positive_int(s: str | int) -> int:
    n = _parse_int(s)
    if n <= 0:
        raise ValueError(f"{n}: must be greater than 0")
    return n


def _parse_positive_size(s: str | int) -> int:
    n = parse_size(s)
    if n <= 0:
        raise ValueError(f"{n}: must be greater than 0 bytes")
    return n


def _parse_positive_duration(s: str | int | float) -> float:
    seconds = parse_duration(s)
    if seconds <= 0:
        raise ValueError(f"{s!r}: must be longer than 0 seconds")
    return seconds


def _parse_optional_port(s: str | int | None) -> int | None:
    if s is None or (isinstance(s, str) and s.strip().lower() in ("", "off", "false", "none")):
        return None
    return _parse_port(s)


def _parse_engine(s: str | None) -> str | None:
    if s is None or (isinstance(s, str) and s.strip().lower() in ("", "none", "embedded")):
        return None
    from broker.engines.jetstream.check import split_engine_urls  # stdlib only, no nats-py

    return ",".join(split_engine_urls(_parse_str(s)))


def _parse_monitor(s: str | None) -> str | None:
    if s is None or (isinstance(s, str) and s.strip().lower() in ("", "none")):
        return None
    urls = [u.strip().rstrip("/") for u in _parse_str(s).split(",") if u.strip()]
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"{u!r}: expected http://HOST:PORT (a nats-server monitoring endpoint)")
    return ",".join(urls) or None


def _parse_engine_fsync(s: str) -> str:
    value = _parse_str(s).strip().lower()
    if value not in ("always", "lazy"):
        raise ValueError(f"{s!r}: expected 'always' or 'lazy'")
    return value


def _parse_advertise(s: str | None) -> str | None:
    if s is None or (isinstance(s, str) and s.strip().lower() in ("", "none")):
        return None
    text = _parse_str(s).strip()
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{s!r}: expected HOST:PORT, e.g. mq.example.com:8081")
    return text


OPTIONS: tuple[Option, ...] = (
    Option("data_dir", _parse_nonempty, "DIR",
           "directory for the log and metadata; created if missing (default: ./halfmq-data)"),
    Option("host", _parse_nonempty, "HOST", "listen address (default: 127.0.0.1)"),
    Option("port", _parse_port, "N", "native protocol port; 0 picks a free port (default: 7600)"),
    Option("http_port", _parse_port, "N",
           "admin HTTP API and console port; 0 picks a free port (default: 7601)"),
    Option("grpc_port", _parse_optional_port, "N",
           "RocketMQ 5 gRPC port (apache.rocketmq.v2.MessagingService) for the official "
           "RocketMQ clients; 0 picks a free port; needs the grpc extra (default: off)"),
    Option("advertise", _parse_advertise, "HOST:PORT",
           "the gRPC address clients are told to use in topic routes, when it is not the one "
           "they connected to (NAT, containers) (default: none)"),
    Option("flush", _parse_flush, "{sync,async}",
           "sync: a send is acknowledged after its record is fsynced (group commit); "
           "async: acknowledged after the write, fsynced every --flush-interval (default: sync)"),
    Option("flush_interval", _parse_positive_duration, "DUR", "fsync interval in async mode (default: 200ms)"),
    Option("tx_timeout", parse_duration, "DUR",
           "age of an unresolved half message before its first check-back (default: 6s)"),
    Option("tx_check_interval", _parse_positive_duration, "DUR",
           "how often unresolved half messages are checked again (default: 30s)"),
    Option("tx_check_max", _parse_positive_int, "N",
           "check-backs that reach a producer before a transaction is abandoned (default: 15)"),
    Option("retry_delays", parse_duration_list, "LIST",
           "comma-separated delays before redelivery after the Nth failure; past the end the "
           "last repeats (default: 10s,30s,1m,2m,3m,4m,5m,6m,7m,8m,9m,10m,20m,30m,1h,2h)"),
    Option("ack_timeout", _parse_positive_duration, "DUR",
           "a delivered message not acked by then is redelivered; counts as a failed attempt "
           "(default: 60s)"),
    Option("max_message_size", _parse_positive_size, "BYTES",
           "larger bodies are rejected (default: 4194304)"),
    Option("default_queues", _parse_positive_int, "N", "queues of an auto-created topic (default: 4)"),
    Option("auto_create_topics", parse_bool, None,
           "create a topic on first use (default: on)", boolean=True),
    Option("retention", _parse_positive_duration, "DUR",
           "log segments older than this are deleted (default: 72h)"),
    Option("segment_size", _parse_positive_size, "BYTES",
           "size at which a log segment is rolled over (default: 128MiB)"),
    Option("max_connections", _parse_positive_int, "N",
           "client connections at once; more are refused with an error (default: 10000)"),
    Option("max_http_connections", _parse_positive_int, "N",
           "connections to the admin HTTP port at once, TLS handshakes included; more are "
           "refused (default: 256)"),
    Option("max_topics", _parse_positive_int, "N",
           "topics (not counting system topics); creating one more is refused (default: 10000)"),
    Option("max_open_indexes", _parse_positive_int, "N",
           "queue index files held open at once, whatever the number of queues; the least "
           "recently used is closed first (default: 256)"),
    Option("max_groups", _parse_positive_int, "N",
           "consumer groups; subscribing with one more is refused (default: 10000)"),
    Option("max_leases", _parse_positive_int, "N",
           "messages one consumer group may hold leased at once (push and pull consumers "
           "together); past it nothing more is delivered to the group until some are settled "
           "(default: 65536)"),
    Option("max_prepared", _parse_positive_int, "N",
           "unresolved half messages the broker holds; a transactional send past it is refused "
           "(default: 50000)"),
    Option("max_prefetch", _parse_positive_int, "N",
           "largest prefetch a consumer may ask for; larger is refused (default: 4096)"),
    Option("max_client_buffer", _parse_positive_size, "BYTES",
           "output to one client not yet written to its socket; past an eighth of it the "
           "broker stops reading that client until it reads, past it the client is "
           "disconnected (default: 64MiB)"),
    Option("max_inflight_requests", _parse_positive_int, "N",
           "requests of one connection awaiting their reply; past it the broker stops reading "
           "that connection until replies go out (default: 4096)"),
    Option("max_inflight_bytes", _parse_positive_size, "BYTES",
           "message bytes of one connection's sends not yet stored; past it the broker stops "
           "reading that connection until they are (default: 64MiB)"),
    Option("max_inflight_total", _parse_positive_size, "BYTES",
           "message bytes of all connections' sends not yet stored, gRPC's included; past it "
           "the broker stops reading every native connection that sends until half of it is "
           "stored, and refuses gRPC sends (TOO_MANY_REQUESTS) (default: 256MiB)"),
    Option("max_delay", _parse_positive_duration, "DUR",
           "longest delay of a scheduled message (delay or deliver-at); further ahead is "
           "refused (default: 3d)"),
    Option("trace", parse_bool, None,
           "record each delivery attempt and its outcome, and who sent each message, for "
           "`halfmq admin trace`; one small log record per loop iteration (default: off)", boolean=True),
    # security (README, "Security")
    Option("tls_cert", _parse_optional_path, "FILE",
           "PEM certificate chain: serve TLS on the native and HTTP ports (default: none)"),
    Option("tls_key", _parse_optional_path, "FILE", "PEM private key of --tls-cert, if not in that file (default: none)"),
    Option("tls_client_ca", _parse_optional_path, "FILE",
           "PEM CA: clients must present a certificate it signed, mutual TLS (default: none)"),
    Option("users_file", _parse_optional_path, "FILE",
           "TOML file of users ([users.NAME] verifier, grants) added to the stored ones (default: none)"),
    Option("allow_anonymous", parse_bool, None,
           "serve clients without credentials on a non-loopback --host while no user exists; "
           "without it such a broker refuses to start (default: off)", boolean=True),
    Option("engine", _parse_engine, "URLS",
           "cluster mode: run as a stateless gateway over this NATS JetStream cluster, "
           "e.g. nats://n1:4222,nats://n2:4222,nats://n3:4222; --data-dir, --flush and "
           "--segment-size do not apply; without it the broker runs its embedded engine "
           "on --data-dir (default: none)"),
    Option("engine_monitor", _parse_monitor, "URLS",
           "monitoring endpoints of the engine's servers, read by the start-up check; "
           "none given: port 8222 on each --engine host (default: none)"),
    Option("replicas", _parse_positive_int, "N",
           "cluster mode: replicas of every stream; the engine must have at least this many "
           "servers (default: 3)"),
    Option("engine_fsync", _parse_engine_fsync, "{always,lazy}",
           "cluster mode: require sync_interval: always on every engine server (always), or "
           "accept nats-server's periodic fsync and log once what that risks (lazy) "
           "(default: always)"),
)

_OPTIONS_BY_NAME = {opt.name: opt for opt in OPTIONS}


# --------------------------------------------------------------------------- BrokerConfig


@dataclass
class BrokerConfig:
    """The broker's settings; field names are the SPEC §2 option names with ``_``.

    Durations are float seconds (a string such as ``"6s"`` is also accepted and converted),
    ``retry_delays`` is a tuple of float seconds. Raises ``ConfigError`` (a ``ValueError``)
    if a value is out of range.
    """

    data_dir: str = "./halfmq-data"
    host: str = "127.0.0.1"
    port: int = 7600
    http_port: int = 7601
    grpc_port: int | None = None
    advertise: str | None = None
    flush: str = "sync"
    flush_interval: float = 0.2
    tx_timeout: float = 6.0
    tx_check_interval: float = 30.0
    tx_check_max: int = 15
    retry_delays: tuple[float, ...] = field(default=DEFAULT_RETRY_DELAYS)
    ack_timeout: float = 60.0
    max_message_size: int = 4194304
    default_queues: int = 4
    auto_create_topics: bool = True
    retention: float = 72 * 3600.0
    segment_size: int = 128 * 1024 * 1024
    max_connections: int = 10000
    max_http_connections: int = 256
    max_topics: int = 10000
    max_open_indexes: int = 256
    max_groups: int = 10000
    max_leases: int = 65536
    max_prepared: int = 50000
    max_prefetch: int = 4096
    max_client_buffer: int = 64 * 1024 * 1024
    max_inflight_requests: int = 4096
    max_inflight_bytes: int = 64 * 1024 * 1024
    max_inflight_total: int = 256 * 1024 * 1024
    max_delay: float = 3 * 86400.0
    trace: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    users_file: str | None = None
    allow_anonymous: bool = False
    engine: str | None = None
    engine_monitor: str | None = None
    replicas: int = 3
    engine_fsync: str = "always"

    def __post_init__(self) -> None:
        for opt in OPTIONS:
            try:
                value = opt.parse(getattr(self, opt.name))
            except ValueError as exc:
                raise ConfigError(f"invalid value for {opt.name}: {exc}") from None
            setattr(self, opt.name, value)
        if (self.tls_key or self.tls_client_ca) and not self.tls_cert:
            raise ConfigError("--tls-key and --tls-client-ca need --tls-cert")


# --------------------------------------------------------------------------- sources


def build_arg_parser(prog: str | None = "halfmq broker") -> argparse.ArgumentParser:
    """Return the parser for ``halfmq broker`` / ``python -m broker``.

    Every option of SPEC §2 (plus ``--segment-size``) is a flag whose argparse default is
    ``SUPPRESS``, so the parsed namespace holds only the flags actually given; their values
    are left as strings for ``load_config()`` to parse (with errors naming the flag).
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the halfmq broker. Every option can also be set by the environment "
                    f"variable {ENV_PREFIX}<NAME> (e.g. {ENV_PREFIX}TX_TIMEOUT=1s) or in the "
                    "[broker] table of a TOML file; flags win over environment, environment "
                    "over the file. Durations accept 250ms, 6s, 1m, 2h or bare seconds.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", metavar="FILE",
                        help=f"TOML file with a [broker] table; keys are the option names "
                             f"with '_', e.g. tx_timeout = \"6s\" (default: none; env "
                             f"{CONFIG_ENV})")
    for opt in OPTIONS:
        if opt.boolean:
            parser.add_argument(opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction,
                                help=opt.help)
        else:
            parser.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar, help=opt.help)
    return parser


def _parse_option(opt: Option, value: Any, source: str) -> Any:
    try:
        return opt.parse(value)
    except ValueError as exc:
        raise ConfigError(f"invalid value for {opt.name} from {source}: {exc}") from None


def _read_toml(path: str, source: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} ({source}) does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r} ({source}): {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    for key, value in document.items():
        if not isinstance(value, dict):
            hint = " (put it under [broker])" if key in _OPTIONS_BY_NAME else ""
            raise ConfigError(f"config file {path!r}: unexpected top-level key {key!r}{hint}")
    table = document.get("broker", {})
    for key in table:
        if key not in _OPTIONS_BY_NAME:
            underscored = key.replace("-", "_")
            hint = f" (did you mean {underscored!r}?)" if underscored in _OPTIONS_BY_NAME else ""
            raise ConfigError(f"config file {path!r}: unknown key {key!r} in [broker]{hint}")
    return table


def load_config(argv: Sequence[str] | None = None,
                env: Mapping[str, str] | None = None) -> BrokerConfig:
    """Return the ``BrokerConfig`` for the command line ``argv`` and environment ``env``.

    ``argv`` excludes the program name (``None``: ``sys.argv[1:]``); ``env`` defaults to
    ``os.environ``. Precedence: flags > ``HALFMQ_<NAME>`` variables > the TOML file named by
    ``--config`` or ``HALFMQ_CONFIG`` > defaults. An empty environment variable counts as
    unset. Raises ``ConfigError`` (a ``ValueError``) for a bad value (naming the option and
    where it came from), an unreadable file or an unknown key in the file; argparse itself
    exits with status 2 on an unknown flag or a missing flag value, and prints help on ``-h``.
    A command-line entry point should turn ``ConfigError`` into ``parser.error(str(exc))``.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    namespace = vars(build_arg_parser().parse_args(argv))
    values: dict[str, Any] = {}

    config_path = namespace.get("config")
    config_source = "flag --config"
    if config_path is None and environ.get(CONFIG_ENV):
        config_path = environ[CONFIG_ENV]
        config_source = f"environment variable {CONFIG_ENV}"
    if config_path is not None:
        for key, raw in _read_toml(config_path, config_source).items():
            values[key] = _parse_option(_OPTIONS_BY_NAME[key], raw,
                                        f"config file {config_path!r}")

    for opt in OPTIONS:
        raw = environ.get(opt.env)
        if raw is not None and raw.strip() != "":
            values[opt.name] = _parse_option(opt, raw, f"environment variable {opt.env}")

    for opt in OPTIONS:
        if opt.name in namespace:
            values[opt.name] = _parse_option(opt, namespace[opt.name], f"flag {opt.flag}")

    known = {f.name for f in fields(BrokerConfig)}
    assert set(values) <= known, set(values) - known
    return BrokerConfig(**values)
