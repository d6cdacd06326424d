"""broker.config: value parsers, BrokerConfig validation, and flag > env > file > default."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.config import (
    DEFAULT_RETRY_DELAYS,
    OPTIONS,
    BrokerConfig,
    ConfigError,
    build_arg_parser,
    format_duration,
    load_config,
    parse_bool,
    parse_duration,
    parse_duration_list,
    parse_size,
)

# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("6s", 6.0),
        ("1m", 60.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5", 1.5),
        ("3", 3.0),
        ("0", 0.0),
        (" 6s ", 6.0),
        ("1m30s", 90.0),
        ("1h1m1s", 3661.0),
        ("1s500ms", 1.5),
        ("0.5s", 0.5),
        ("72h", 259200.0),
        ("6S", 6.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration_accepts(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    "text", ["", "   ", "soon", "6 s", "6sec", "s", "ms", "1m-30s", "-1", "-5s", "1.2.3s", "6x",
             "inf", "nan", -1, -0.5, float("inf"), float("nan"), True, None, [1]],
)
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_duration_negative_message_says_so():
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-5s")


@given(st.integers(min_value=0, max_value=10**6))
def test_format_duration_round_trips_whole_milliseconds(ms):
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_parse_duration_list():
    assert parse_duration_list("200ms,400ms") == (0.2, 0.4)
    assert parse_duration_list(" 1s , 2s ") == (1.0, 2.0)
    assert parse_duration_list(["1s", 2, 0.5]) == (1.0, 2.0, 0.5)
    assert parse_duration_list(5) == (5.0,)
    assert parse_duration_list("10s,30s,1m,2m,3m,4m,5m,6m,7m,8m,9m,10m,20m,30m,1h,2h") == (
        DEFAULT_RETRY_DELAYS
    )
    for bad in ("", [], "1s,,2s", "1s,x", ["1s", "-2s"]):
        with pytest.raises(ValueError):
            parse_duration_list(bad)


# --------------------------------------------------------------------------- sizes and bools


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4194304", 4194304),
        (4194304, 4194304),
        ("4MiB", 4 * 1024**2),
        ("4mib", 4 * 1024**2),
        ("4M", 4 * 1024**2),
        ("4MB", 4_000_000),
        ("512KiB", 512 * 1024),
        ("512 KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("1.5KiB", 1536),
        ("10B", 10),
        ("0", 0),
    ],
)
def test_parse_size_accepts(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "big", "4XB", "-1", -1, "1.3B", "4 M iB", True, 1.5])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "value"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("on", True),
    ("false", False), ("0", False), ("no", False), ("off", False), (True, True), (False, False),
])
def test_parse_bool(text, value):
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["", "maybe", "2", 2, None])
def test_parse_bool_rejects(text):
    with pytest.raises(ValueError, match="invalid boolean"):
        parse_bool(text)


# --------------------------------------------------------------------------- BrokerConfig


def test_defaults_match_spec():
    c = BrokerConfig()
    assert c.data_dir == "./halfmq-data"
    assert (c.host, c.port, c.http_port) == ("127.0.0.1", 7600, 7601)
    assert (c.flush, c.flush_interval) == ("sync", 0.2)
    assert (c.tx_timeout, c.tx_check_interval, c.tx_check_max) == (6.0, 30.0, 15)
    assert c.retry_delays == (10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200,
                              1800, 3600, 7200)
    assert c.ack_timeout == 60.0
    assert c.max_message_size == 4194304
    assert c.default_queues == 4
    assert c.auto_create_topics is True
    assert c.retention == 72 * 3600.0
    assert c.segment_size == 128 * 1024 * 1024
    assert c.max_delay == 3 * 86400.0


def test_fields_are_the_options():
    assert [f.name for f in dataclasses.fields(BrokerConfig)] == [o.name for o in OPTIONS]


def test_help_states_every_default_correctly():
    """The "(default: X)" of each flag's help parses back to the BrokerConfig default."""
    parser = build_arg_parser()
    defaults = BrokerConfig()
    actions = {a.dest: a for a in parser._actions}
    for opt in OPTIONS:
        match = re.search(r"\(default: ([^)]*)\)", actions[opt.name].help)
        assert match, f"help of {opt.flag} does not state its default"
        text = {"on": "true", "off": "false", "none": None}.get(match.group(1), match.group(1))
        assert opt.parse(text) == getattr(defaults, opt.name), opt.name
    assert "default: none" in actions["config"].help


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        load_config(["--help"], {})
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in OPTIONS:
        assert opt.flag in out
    assert "--no-auto-create-topics" in out
    assert "--config" in out


def test_embedding_normalizes_values(tmp_path: Path):
    c = BrokerConfig(data_dir=tmp_path, tx_timeout=1, retry_delays=[1, "2s"], flush="ASYNC",
                     max_message_size="1MiB")
    assert c.data_dir == str(tmp_path)
    assert c.tx_timeout == 1.0 and isinstance(c.tx_timeout, float)
    assert c.retry_delays == (1.0, 2.0)
    assert c.flush == "async"
    assert c.max_message_size == 1024**2


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"flush": "sometimes"}, r"flush.*'sync' or 'async'"),
        ({"port": 65536}, r"port.*between 0 and 65535"),
        ({"http_port": -1}, r"http_port.*between 0 and 65535"),
        ({"tx_check_max": 0}, r"tx_check_max.*greater than 0"),
        ({"default_queues": -2}, r"default_queues.*greater than 0"),
        ({"retry_delays": ()}, r"retry_delays.*at least one"),
        ({"max_message_size": 0}, r"max_message_size.*greater than 0"),
        ({"tx_check_interval": 0}, r"tx_check_interval.*longer than 0"),
        ({"tx_timeout": -1}, r"tx_timeout.*negative"),
        ({"host": ""}, r"host.*empty"),
    ],
)
def test_post_init_validates(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        BrokerConfig(**kwargs)


def test_port_zero_and_tx_timeout_zero_are_allowed():
    c = BrokerConfig(port=0, http_port=0, tx_timeout=0)
    assert (c.port, c.http_port, c.tx_timeout) == (0, 0, 0.0)


# --------------------------------------------------------------------------- sources


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "halfmq.toml"
    path.write_text(text)
    return str(path)


def test_no_sources_gives_defaults():
    assert load_config([], {}) == BrokerConfig()


def test_flags():
    c = load_config(["--data-dir", "d", "--host", "0.0.0.0", "--port", "0", "--http-port", "9",
                     "--flush", "async", "--flush-interval", "50ms", "--tx-timeout", "1s",
                     "--tx-check-interval", "200ms", "--tx-check-max", "3",
                     "--retry-delays", "200ms,400ms", "--ack-timeout", "2s",
                     "--max-message-size", "1MiB", "--default-queues", "8",
                     "--no-auto-create-topics", "--retention", "1h", "--segment-size", "1024"],
                    {})
    assert c == BrokerConfig(data_dir="d", host="0.0.0.0", port=0, http_port=9, flush="async",
                             flush_interval=0.05, tx_timeout=1.0, tx_check_interval=0.2,
                             tx_check_max=3, retry_delays=(0.2, 0.4), ack_timeout=2.0,
                             max_message_size=1024**2, default_queues=8,
                             auto_create_topics=False, retention=3600.0, segment_size=1024)


def test_every_option_has_an_env_variable():
    env = {"HALFMQ_DATA_DIR": "d", "HALFMQ_HOST": "::1", "HALFMQ_PORT": "1",
           "HALFMQ_HTTP_PORT": "2", "HALFMQ_FLUSH": "async", "HALFMQ_FLUSH_INTERVAL": "1s",
           "HALFMQ_TX_TIMEOUT": "1s", "HALFMQ_TX_CHECK_INTERVAL": "2s",
           "HALFMQ_TX_CHECK_MAX": "3", "HALFMQ_RETRY_DELAYS": "1s,2s", "HALFMQ_ACK_TIMEOUT": "4s",
           "HALFMQ_MAX_MESSAGE_SIZE": "100", "HALFMQ_DEFAULT_QUEUES": "2",
           "HALFMQ_AUTO_CREATE_TOPICS": "no", "HALFMQ_RETENTION": "5m",
           "HALFMQ_SEGMENT_SIZE": "4KiB", "HALFMQ_MAX_CONNECTIONS": "5", "HALFMQ_MAX_TOPICS": "6",
           "HALFMQ_MAX_HTTP_CONNECTIONS": "14", "HALFMQ_MAX_GROUPS": "7", "HALFMQ_MAX_PREFETCH": "8", "HALFMQ_MAX_CLIENT_BUFFER": "1MiB",
           "HALFMQ_MAX_INFLIGHT_REQUESTS": "9", "HALFMQ_MAX_INFLIGHT_BYTES": "2MiB",
           "HALFMQ_MAX_INFLIGHT_TOTAL": "3MiB",
           "HALFMQ_MAX_DELAY": "1d", "HALFMQ_GRPC_PORT": "8081", "HALFMQ_ADVERTISE": "mq.example:8081",
           "HALFMQ_TLS_CERT": "c.pem", "HALFMQ_TLS_KEY": "k.pem", "HALFMQ_TLS_CLIENT_CA": "ca.pem",
           "HALFMQ_USERS_FILE": "users.toml", "HALFMQ_ALLOW_ANONYMOUS": "yes",
           "HALFMQ_MAX_LEASES": "11", "HALFMQ_MAX_PREPARED": "12", "HALFMQ_MAX_OPEN_INDEXES": "13",
           "HALFMQ_TRACE": "on",
           "HALFMQ_ENGINE": "nats://n1:4222, nats://n2:4222", "HALFMQ_ENGINE_MONITOR": "http://n1:8222/",
           "HALFMQ_REPLICAS": "5", "HALFMQ_ENGINE_FSYNC": "LAZY"}
    assert {o.env for o in OPTIONS} == set(env)
    c = load_config([], env)
    assert c == BrokerConfig(data_dir="d", host="::1", port=1, http_port=2, flush="async",
                             flush_interval=1.0, tx_timeout=1.0, tx_check_interval=2.0,
                             tx_check_max=3, retry_delays=(1.0, 2.0), ack_timeout=4.0,
                             max_message_size=100, default_queues=2, auto_create_topics=False,
                             retention=300.0, segment_size=4096, max_connections=5, max_topics=6,
                             max_http_connections=14, max_groups=7, max_prefetch=8, max_client_buffer=1 << 20,
                             max_inflight_requests=9, max_inflight_bytes=2 << 20, max_inflight_total=3 << 20,
                             max_delay=86400.0,
                             grpc_port=8081, advertise="mq.example:8081",
                             tls_cert="c.pem", tls_key="k.pem", tls_client_ca="ca.pem",
                             users_file="users.toml", allow_anonymous=True, max_leases=11, max_prepared=12,
                             max_open_indexes=13, trace=True,
                             engine="nats://n1:4222,nats://n2:4222", engine_monitor="http://n1:8222",
                             replicas=5, engine_fsync="lazy")


def test_toml_file_values_may_be_strings_numbers_lists_and_booleans(tmp_path):
    path = write_toml(tmp_path, """
[broker]
tx_timeout = "6s"
tx_check_interval = 2
ack_timeout = 1.5
retry_delays = ["1s", 2, "1m"]
auto_create_topics = false
max_message_size = "1MiB"
port = 0
flush = "async"
""")
    c = load_config(["--config", path], {})
    assert c.tx_timeout == 6.0
    assert c.tx_check_interval == 2.0
    assert c.ack_timeout == 1.5
    assert c.retry_delays == (1.0, 2.0, 60.0)
    assert c.auto_create_topics is False
    assert c.max_message_size == 1024**2
    assert c.port == 0
    assert c.flush == "async"


def test_toml_retry_delays_as_a_string(tmp_path):
    path = write_toml(tmp_path, '[broker]\nretry_delays = "1s,2s"\n')
    assert load_config(["--config", path], {}).retry_delays == (1.0, 2.0)


def test_config_file_from_env(tmp_path):
    path = write_toml(tmp_path, "[broker]\ntx_check_max = 7\n")
    assert load_config([], {"HALFMQ_CONFIG": path}).tx_check_max == 7


def test_config_flag_beats_config_env(tmp_path):
    a = write_toml(tmp_path, "[broker]\ntx_check_max = 7\n")
    other = tmp_path / "other.toml"
    other.write_text("[broker]\ntx_check_max = 9\n")
    assert load_config(["--config", a], {"HALFMQ_CONFIG": str(other)}).tx_check_max == 7


# (option, flag args, env value, file line, expected flag/env/file values, default)
PRECEDENCE_CASES = [
    ("tx_timeout", ["--tx-timeout", "1s"], "2s", 'tx_timeout = "3s"', (1.0, 2.0, 3.0)),
    ("port", ["--port", "1"], "2", "port = 3", (1, 2, 3)),
    ("auto_create_topics", ["--no-auto-create-topics"], "true", "auto_create_topics = true",
     (False, True, True)),
    ("auto_create_topics", ["--auto-create-topics"], "0", "auto_create_topics = false",
     (True, False, False)),
    ("retry_delays", ["--retry-delays", "1s"], "2s,2s", 'retry_delays = ["3s"]',
     ((1.0,), (2.0, 2.0), (3.0,))),
    ("flush", ["--flush", "async"], "sync", 'flush = "async"', ("async", "sync", "async")),
    ("max_message_size", ["--max-message-size", "1KiB"], "2000", "max_message_size = 3000",
     (1024, 2000, 3000)),
    ("data_dir", ["--data-dir", "flag"], "env", 'data_dir = "file"', ("flag", "env", "file")),
]


@pytest.mark.parametrize(("name", "flag", "env_value", "file_line", "expected"),
                         PRECEDENCE_CASES)
def test_precedence(tmp_path, name, flag, env_value, file_line, expected):
    flag_value, env_wins, file_value = expected
    env_name = "HALFMQ_" + name.upper()
    path = write_toml(tmp_path, f"[broker]\n{file_line}\n")
    default = getattr(BrokerConfig(), name)
    cfg = ["--config", path]

    assert getattr(load_config([], {}), name) == default
    assert getattr(load_config(cfg, {}), name) == file_value                        # file > default
    assert getattr(load_config(cfg, {env_name: env_value}), name) == env_wins       # env > file
    assert getattr(load_config([], {env_name: env_value}), name) == env_wins        # env > default
    assert getattr(load_config(flag + cfg, {env_name: env_value}), name) == flag_value  # flag > env
    assert getattr(load_config(flag + cfg, {}), name) == flag_value                 # flag > file
    assert getattr(load_config(flag, {}), name) == flag_value                       # flag > default


def test_a_flag_equal_to_the_default_still_beats_env():
    assert load_config(["--tx-timeout", "6s"], {"HALFMQ_TX_TIMEOUT": "1s"}).tx_timeout == 6.0
    assert load_config(["--auto-create-topics"],
                       {"HALFMQ_AUTO_CREATE_TOPICS": "false"}).auto_create_topics is True


def test_empty_env_variable_counts_as_unset():
    assert load_config([], {"HALFMQ_TX_TIMEOUT": ""}).tx_timeout == 6.0


def test_unrelated_env_is_ignored():
    assert load_config([], {"HALFMQ_NOPE": "x", "PATH": "/bin"}) == BrokerConfig()


def test_options_are_independent_across_sources(tmp_path):
    path = write_toml(tmp_path, '[broker]\ntx_timeout = "3s"\nport = 3\n')
    c = load_config(["--config", path, "--port", "1"], {"HALFMQ_RETENTION": "1h"})
    assert (c.tx_timeout, c.port, c.retention) == (3.0, 1, 3600.0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("argv", "env", "pattern"),
    [
        (["--tx-timeout", "soon"], {},
         r"tx_timeout from flag --tx-timeout: invalid duration 'soon'"),
        ([], {"HALFMQ_TX_TIMEOUT": "soon"},
         r"tx_timeout from environment variable HALFMQ_TX_TIMEOUT: invalid duration"),
        ([], {"HALFMQ_AUTO_CREATE_TOPICS": "perhaps"},
         r"auto_create_topics from environment variable HALFMQ_AUTO_CREATE_TOPICS"),
        (["--port", "70000"], {}, r"port from flag --port: 70000: a port must be between"),
        (["--port", "seven"], {}, r"port from flag --port: invalid integer 'seven'"),
        (["--flush", "later"], {}, r"flush from flag --flush: 'later': expected 'sync' or"),
        (["--retry-delays", "1s,,2s"], {}, r"retry_delays from flag --retry-delays"),
        (["--max-message-size", "huge"], {}, r"max_message_size from flag --max-message-size"),
        ([], {"HALFMQ_TX_CHECK_MAX": "0"}, r"tx_check_max from environment variable"),
        (["--ack-timeout=-1s"], {}, r"ack_timeout from flag --ack-timeout: .*negative"),
    ],
)
def test_bad_values_name_the_option_and_the_source(argv, env, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(argv, env)


def test_bad_file_value_names_the_file(tmp_path):
    path = write_toml(tmp_path, '[broker]\ntx_timeout = "soon"\n')
    with pytest.raises(ConfigError, match=r"tx_timeout from config file .*halfmq\.toml"):
        load_config(["--config", path], {})
    path = write_toml(tmp_path, "[broker]\nport = true\n")
    with pytest.raises(ConfigError, match=r"port from config file"):
        load_config(["--config", path], {})


def test_bad_file_value_is_reported_even_if_a_flag_overrides_it(tmp_path):
    path = write_toml(tmp_path, '[broker]\ntx_timeout = "soon"\n')
    with pytest.raises(ConfigError, match="config file"):
        load_config(["--config", path, "--tx-timeout", "1s"], {})


def test_unknown_toml_key_is_rejected(tmp_path):
    path = write_toml(tmp_path, '[broker]\ntx_timeout = "1s"\ntx_timout = "2s"\n')
    with pytest.raises(ConfigError, match="unknown key 'tx_timout' in \\[broker\\]"):
        load_config(["--config", path], {})


def test_dashed_toml_key_is_rejected_with_a_hint(tmp_path):
    path = write_toml(tmp_path, '[broker]\ntx-timeout = "1s"\n')
    with pytest.raises(ConfigError, match="did you mean 'tx_timeout'"):
        load_config(["--config", path], {})


def test_top_level_option_is_rejected_with_a_hint(tmp_path):
    path = write_toml(tmp_path, 'tx_timeout = "1s"\n')
    with pytest.raises(ConfigError, match=r"top-level key 'tx_timeout' \(put it under \[broker\]\)"):
        load_config(["--config", path], {})


def test_other_tables_are_ignored(tmp_path):
    path = write_toml(tmp_path, '[producer]\nanything = 1\n[broker]\nport = 5\n')
    assert load_config(["--config", path], {}).port == 5


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "nope.toml")], {})
    with pytest.raises(ConfigError, match="HALFMQ_CONFIG"):
        load_config([], {"HALFMQ_CONFIG": str(tmp_path / "nope.toml")})
    path = write_toml(tmp_path, "[broker\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", path], {})


def test_unknown_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        load_config(["--tx-timeot", "1s"], {})
    assert exc.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
