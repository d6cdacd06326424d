"""bank2 on the official RocketMQ 5 client: the same service, consuming through halfmq's
gRPC endpoint with Apache's ``rocketmq-python-client`` instead of halfmq's SDK.

    python -m examples.bank.bank2_rocketmq --grpc 127.0.0.1:8081 --port 8082 [--db URL]

The listener is :meth:`Bank2Service.on_message`, unchanged: the official ``PushConsumer``
calls its listener on one of its own threads, so each call is handed to the service's
event loop (where its database lives) and its answer mapped back (SUCCESS, or FAILURE for
RECONSUME_LATER). A RocketMQ client cannot tell the broker how many times to retry: the
consumer group's ``max_attempts`` is a setting of the broker (``halfmq admin
group-settings consumer_bank2 --max-attempts 3``), which the demo sets. Retry delays come
from the broker too, in whole seconds (the client reads no fractions).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

from consumer_sdk import ConsumeResult, Message
from examples.bank.bank1 import TOPIC
from examples.bank.bank2 import CONSUMER_GROUP, Bank2Service
from examples.bank.runner import run_service

__all__ = ["RocketMQBank2Service", "main"]

log = logging.getLogger("halfmq.examples.bank2")


class RocketMQBank2Service(Bank2Service):
    """bank2 whose consumer is the official RocketMQ ``PushConsumer`` (``grpc``: the
    broker's gRPC address)."""

    def __init__(self, db_url: str, grpc: str, **kw: Any) -> None:
        super().__init__(db_url, grpc, **kw)
        self.rocketmq: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> RocketMQBank2Service:
        from rocketmq import (  # type: ignore[import-untyped]
            ClientConfiguration,
            Credentials,
            FilterExpression,
            MessageListener,
            PushConsumer,
        )

        await self.db.open(reset=self.reset)
        await self._start_http()
        self._loop = asyncio.get_running_loop()
        service = self

        class Listener(MessageListener):  # type: ignore[misc]
            def consume(self, message: Any) -> Any:
                return service._consume(message)

        consumer = PushConsumer(ClientConfiguration(self.broker, Credentials()), self.group, Listener(),
                                {self.topic: FilterExpression("*")}, consumption_thread_count=4)
        await asyncio.to_thread(consumer.startup)
        self.rocketmq = consumer
        return self

    def _consume(self, rm: Any) -> Any:
        """On a client thread: run the service's listener on its loop, wait for its answer."""
        from rocketmq import ConsumeResult as RocketResult  # type: ignore[import-untyped]

        message = Message(msg_id=rm.message_id, topic=rm.topic, body=rm.body, tags=rm.tag,
                          keys=tuple(sorted(rm.keys)), properties=dict(rm.properties),
                          reconsume_times=(rm.delivery_attempt or 1) - 1)
        assert self._loop is not None
        result = asyncio.run_coroutine_threadsafe(self.on_message(message), self._loop).result()
        return RocketResult.SUCCESS if result is ConsumeResult.SUCCESS else RocketResult.FAILURE

    async def close(self) -> None:
        if self.rocketmq is not None:
            consumer, self.rocketmq = self.rocketmq, None
            await asyncio.to_thread(consumer.shutdown)
        await super().close()


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with RocketMQBank2Service(args.db, args.grpc, host=args.host, port=args.port, topic=args.topic,
                                    group=args.group) as bank:
        print(f"bank2 ready http={bank.url} db={bank.db.url.describe()} grpc={args.grpc}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m examples.bank.bank2_rocketmq",
                                description="bank2 on the official RocketMQ client (halfmq's gRPC port)")
    p.add_argument("--grpc", default="127.0.0.1:8081", help="the broker's gRPC address [127.0.0.1:8081]")
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address [127.0.0.1]")
    p.add_argument("--port", type=int, default=8082, help="HTTP port, 0 = any free one [8082]")
    p.add_argument("--db", default="bank2.db", help="sqlite file or mysql://user:pass@host:3306/name [bank2.db]")
    p.add_argument("--topic", default=TOPIC, help=f"[{TOPIC}]")
    p.add_argument("--group", default=CONSUMER_GROUP, help=f"consumer group [{CONSUMER_GROUP}]")
    return run_service("bank2", _run(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
