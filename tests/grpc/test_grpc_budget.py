"""gRPC sends count in the broker's ``--max-inflight-total`` with the native port's: a gRPC
client could otherwise keep any amount of message bytes in the broker's memory while the
disk is slow. A gRPC send that does not fit is refused with TOO_MANY_REQUESTS (nothing
stored; the client retries); a native connection held for the budget is read again when
gRPC sends are stored."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from broker import Broker, BrokerConfig
from broker.frontends.grpc.stubs import grpc_pb
from broker.frontends.native.checks import SEND_MESSAGE_OVERHEAD
from protocol import Op, encode_frame
from tests.broker.test_process import RawClient
from tests.conftest import wait_for
from tests.grpc.rawstub import md, pb, send_req

pytestmark = pytest.mark.timeout(30)

BODY = b"x" * (600 << 10)  # more than half of the 1 MiB budget


async def test_grpc_sends_share_the_budget_and_are_refused_past_it(tmp_path, monkeypatch):
    cfg = BrokerConfig(data_dir=str(tmp_path / "d"), port=0, http_port=0, grpc_port=0,
                       max_inflight_total=1 << 20)
    async with Broker(cfg) as b:
        held: list[tuple[Any, int, int]] = []  # the engine keeps each send unanswered, as a slow disk would
        monkeypatch.setattr(b.engine, "send", lambda s, rid, topic, msgs, half: held.append((s, rid, len(msgs))))
        channel = grpc.aio.insecure_channel(b.grpc_address)
        native = await RawClient.connect(b.address)
        try:
            api = grpc_pb.MessagingServiceStub(channel)
            first = asyncio.ensure_future(api.SendMessage(send_req("budget", BODY), metadata=md()))
            await wait_for(lambda: len(held) == 1, what="the first gRPC send handed to the engine")
            assert b.native.inflight_bytes == len(BODY) + SEND_MESSAGE_OVERHEAD

            refused = await api.SendMessage(send_req("budget", BODY), metadata=md())
            assert refused.status.code == pb.Code.TOO_MANY_REQUESTS, refused.status
            assert "--max-inflight-total" in refused.status.message
            assert len(held) == 1 and b.native.inflight_bytes == len(BODY) + SEND_MESSAGE_OVERHEAD

            # a native SEND that takes the sum past the budget: that connection is not read
            native.writer.write(encode_frame(Op.SEND, 5, {"topic": "budget", "msgs": [[b"y" * (500 << 10), None,
                                                                                      [], {}, 0]]}))
            await wait_for(lambda: len(held) == 2, what="the native SEND handed to the engine")
            native.writer.write(encode_frame(Op.PING, 6, {}))
            with pytest.raises(asyncio.TimeoutError):
                await native.next_frame(timeout=0.5)

            s, rid, _ = held[0]  # the gRPC send is stored: the native connection is read again
            s.reply(rid, {"p": "0A" * 8, "r": [[1, 0, 0]]})
            assert (await first).status.code == pb.Code.OK
            assert (await native.next_frame())[:2] == (Op.REPLY, 6)
            s, rid, _ = held[1]
            s.reply(rid, {"p": "", "r": [[2, 0, 1]]})
            assert (await native.next_frame())[:2] == (Op.REPLY, 5)
            assert b.native.inflight_bytes == 0

            again = asyncio.ensure_future(api.SendMessage(send_req("budget", BODY), metadata=md()))
            await wait_for(lambda: len(held) == 3, what="a gRPC send taken again")
            s, rid, _ = held[2]
            s.reply(rid, {"p": "0B" * 8, "r": [[3, 0, 1]]})
            assert (await again).status.code == pb.Code.OK and b.native.inflight_bytes == 0
        finally:
            native.close()
            await channel.close()
