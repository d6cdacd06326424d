"""A consumer that takes leases and never acks: prints each msg_id, then hangs (for kill -9)."""

import asyncio
import sys

from consumer_sdk import PushConsumer


async def main(address: str, group: str, topic: str) -> None:
    async def hold(message):
        print(message.msg_id, message.reconsume_times, flush=True)
        await asyncio.Event().wait()

    async with PushConsumer(address, group=group, topic=topic, listener=hold, prefetch=8, concurrency=8):
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
