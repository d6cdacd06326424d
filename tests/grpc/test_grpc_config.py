"""``--grpc-port`` and ``--advertise``; a broker without the gRPC port serves none."""

from __future__ import annotations

import pytest

from broker.config import BrokerConfig, ConfigError, load_config


def test_grpc_port_is_off_by_default_and_parsed():
    assert BrokerConfig().grpc_port is None and BrokerConfig().advertise is None
    assert load_config(["--grpc-port", "0"], {}).grpc_port == 0
    assert load_config([], {"HALFMQ_GRPC_PORT": "off"}).grpc_port is None
    assert load_config(["--advertise", "[::1]:8081"], {}).advertise == "[::1]:8081"
    for bad in (["--grpc-port", "70000"], ["--advertise", "nohost"], ["--advertise", "h:0"]):
        with pytest.raises(ConfigError):
            load_config(bad, {})


def test_endpoints_of_an_advertised_address():
    from broker.frontends.grpc.server import endpoints_of
    from broker.frontends.grpc.stubs import pb

    e = endpoints_of("mq.example.com:8081")
    assert (e.scheme, e.addresses[0].host, e.addresses[0].port) == (pb.AddressScheme.DOMAIN_NAME, "mq.example.com", 8081)
    assert endpoints_of("10.1.2.3:1").scheme == pb.AddressScheme.IPv4
    assert endpoints_of("[::1]:2").addresses[0].host == "::1" and endpoints_of("[::1]:2").scheme == pb.AddressScheme.IPv6


async def test_no_grpc_server_without_the_option(embedded_broker):
    assert embedded_broker.grpc is None and embedded_broker.grpc_port == 0


def test_ready_line_names_the_grpc_address(broker_factory):
    b = broker_factory("--grpc-port", "0")
    parts = dict(p.split("=", 1) for p in b.ready_line.split()[3:])
    assert parts["grpc"].startswith("127.0.0.1:") and int(parts["grpc"].rsplit(":", 1)[1]) > 0
