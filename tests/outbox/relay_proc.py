"""A relay process for the fault tests: ``Outbox.relay`` through a ``RecordingProducer``.

    python -m tests.outbox.relay_proc --db URL --broker ADDR --log FILE [--kill-after N] ...

Prints ``relay_proc ready mode=<claim mode>`` once connected to the database and the
broker, relays until SIGTERM (graceful: exit 0). ``--kill-after N``: SIGKILL itself right
after its N-th acknowledged ``send_batch``, before the rows are recorded SENT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from producer_sdk.outbox import Outbox, OutboxRelay
from tests.outbox.outbox_helpers import RecordingProducer


async def main(args: argparse.Namespace) -> int:
    outbox = Outbox.from_url(args.db)
    producer = RecordingProducer(args.broker, send_timeout=args.send_timeout,
                                 log_path=Path(args.log), kill_after=args.kill_after)
    await producer.start()
    relay = OutboxRelay(outbox, producer, batch_size=args.batch_size, claim=args.claim,
                        lease=args.lease, poll_interval=0.02, max_backoff=0.2)
    await relay.prepare()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    print(f"relay_proc ready mode={relay.mode}", flush=True)
    try:
        await relay.run()
    finally:
        await producer.close()
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--db", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--claim", default="auto")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lease", type=float, default=1.0)
    p.add_argument("--send-timeout", type=float, default=0.4)
    p.add_argument("--kill-after", type=int, default=0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s relay_proc %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(p.parse_args())))
