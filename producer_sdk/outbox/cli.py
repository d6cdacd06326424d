"""``halfmq outbox-relay``: the outbox relay as a process of its own, and the operator's tools.

How this works
--------------
``outbox_relay_main(argv)`` parses the flags below (``--help`` lists them with their
defaults). Without an operator flag it starts a ``Producer`` (waiting for the broker if it
is not up yet), connects to the database, prints one ready line on standard output::

    halfmq outbox-relay ready db=postgresql://app@127.0.0.1:5432/app table=halfmq_outbox claim=skip-locked broker=127.0.0.1:7600 pending=12 failed=0

and relays until SIGTERM or SIGINT, which finish the batch in progress and exit 0. Log
lines go to standard error: what it connected to, every row marked FAILED (with the
command that retries it), errors (once per distinct error while it retries), and a
progress line every ``--progress-interval`` when something changed::

    outbox relay: sent 1200 rows in 10.0s (120.0/s), failed 0; total sent 5000, failed 0, removed 0; pending 3 (oldest 0.2s), failed rows 0

With ``--status``, ``--retry-failed`` or ``--discard`` it does that one thing and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from typing import Any

from producer_sdk.outbox.outbox import OUTBOX_TABLE, Outbox
from producer_sdk.outbox.relay import CLAIM_MODES, OutboxRelay, OutboxTableMissingError
from producer_sdk.producer import Producer
from protocol import HalfMQError

__all__ = ["outbox_relay_main", "build_parser"]

log = logging.getLogger("halfmq.outbox")


def _option(parse_name: str) -> Any:
    """An argparse ``type`` for ``broker.config.<parse_name>`` (``parse_duration``, ``parse_size``)."""

    def parse(text: str) -> Any:
        from broker import config

        try:
            return getattr(config, parse_name)(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


_duration = _option("parse_duration")
_size = _option("parse_size")


def build_parser() -> argparse.ArgumentParser:
    """The ``halfmq outbox-relay`` argument parser (every flag documented in ``--help``)."""
    p = argparse.ArgumentParser(
        prog="halfmq outbox-relay",
        description="Send the rows of an outbox table to the broker (see the README's "
                    "'Transactional outbox' section). Durations: 250ms, 6s, 1m, 2h.")
    p.add_argument("--db", required=True, metavar="URL",
                   help="the application's database: sqlite:PATH (or a file path), "
                        "mysql://user:pass@host:3306/db, postgresql://user@host:5432/db")
    p.add_argument("--broker", default="127.0.0.1:7600", metavar="ADDR",
                   help="broker address [127.0.0.1:7600]")
    p.add_argument("--table", default=OUTBOX_TABLE,
                   help=f"outbox table name [{OUTBOX_TABLE}]")
    p.add_argument("--group", default="outbox_relay",
                   help="producer group announced to the broker [outbox_relay]")
    p.add_argument("--create-table", action="store_true",
                   help="create the outbox table if it is missing (otherwise a missing "
                        "table is an error)")
    p.add_argument("--batch-size", type=int, default=500, metavar="N",
                   help="rows claimed per batch [500]")
    p.add_argument("--max-batch-bytes", type=_size, default=1 << 20, metavar="SIZE",
                   help="message bodies per send_batch call; halved by itself if the "
                        "broker's limit is smaller [1MiB]")
    p.add_argument("--poll-interval", type=_duration, default=0.1, metavar="DUR",
                   help="poll while idle this often (PostgreSQL is also woken by NOTIFY "
                        "at once) [100ms]")
    p.add_argument("--claim", choices=CLAIM_MODES, default="auto",
                   help="how rows are claimed: skip-locked (row locks, PostgreSQL, MySQL 8, "
                        "MariaDB 10.6+) or lease (a lease column; SQLite) [auto]")
    p.add_argument("--lease", type=_duration, default=30.0, metavar="DUR",
                   help="lease mode: how long claimed rows are ours; a crashed relay's rows "
                        "are sent by another after it (at once by one on the same machine); "
                        "at least 2 x --send-timeout [30s]")
    p.add_argument("--send-timeout", type=_duration, default=3.0, metavar="DUR",
                   help="a send_batch call, retries included, gives up after this [3s]")
    p.add_argument("--retention", type=_duration, default=3600.0, metavar="DUR",
                   help="sent and discarded rows are deleted after this [1h]")
    p.add_argument("--archive", action="store_true",
                   help="move rows past --retention to TABLE_archive instead of deleting them")
    p.add_argument("--cleanup-interval", type=_duration, default=60.0, metavar="DUR",
                   help="how often rows past --retention are removed [1m]")
    p.add_argument("--max-attempts", type=int, default=10, metavar="N",
                   help="sends of a row failing with an unexplained broker error before it "
                        "is marked FAILED; a poison row (too large, bad topic) fails at once [10]")
    p.add_argument("--max-backoff", type=_duration, default=5.0, metavar="DUR",
                   help="longest pause after an error [5s]")
    p.add_argument("--message-groups", action="store_true",
                   help="send each row's order key as its message group, so a FIFO consumer "
                        "group receives a key's rows in order too (slower on the broker)")
    p.add_argument("--no-notify", action="store_true",
                   help="PostgreSQL: do not LISTEN for the insert trigger's NOTIFY (poll only)")
    p.add_argument("--progress-interval", type=_duration, default=10.0, metavar="DUR",
                   help="log a progress line this often when something changed; 0: never [10s]")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    ops = p.add_argument_group("operator commands (do one thing and exit)")
    ops.add_argument("--status", action="store_true",
                     help="print row counts by status and the FAILED rows with their errors")
    ops.add_argument("--retry-failed", nargs="*", type=int, metavar="ID",
                     help="make FAILED rows pending again: the IDs given, or all of them")
    ops.add_argument("--discard", nargs="+", type=int, metavar="ID",
                     help="give up on FAILED rows: never sent; later rows of their keys go on")
    return p


def outbox_relay_main(argv: list[str]) -> int:
    """``halfmq outbox-relay``: returns the exit status (0 ok, 1 failure, 2 usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        outbox = Outbox.from_url(args.db, table=args.table, archive=args.archive,
                                 **({"notify": not args.no_notify}
                                    if args.db.startswith(("postgres://", "postgresql://")) else {}))
    except ValueError as exc:
        print(f"halfmq outbox-relay: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is not on Windows
        runner = asyncio.Runner()
    with runner:
        if args.status or args.retry_failed is not None or args.discard:
            return runner.run(_operate(outbox, args))
        return runner.run(_relay(outbox, args))


async def _operate(outbox: Outbox, args: argparse.Namespace) -> int:
    try:
        if args.retry_failed is not None:
            n = await outbox.retry_failed(args.retry_failed or None)
            print(f"{n} FAILED rows made pending again")
        if args.discard:
            n = await outbox.discard(args.discard)
            print(f"{n} FAILED rows discarded")
        status = await outbox.status()
        print(f"{outbox.describe} table {outbox.table.t}: {status.describe()}")
        if args.status:
            for row in await outbox.failed(limit=1000):
                print(f"FAILED id={row.id} topic={row.topic} key={row.order_key} "
                      f"attempts={row.attempts} error={row.last_error}")
    except Exception as exc:  # noqa: BLE001 - a message, not a traceback
        print(f"halfmq outbox-relay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _relay(outbox: Outbox, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    producer = Producer(args.broker, group=args.group, send_timeout=args.send_timeout)
    try:
        relay = OutboxRelay(
            outbox, producer, batch_size=args.batch_size, max_batch_bytes=args.max_batch_bytes,
            poll_interval=args.poll_interval, claim=args.claim, lease=args.lease,
            retention=args.retention, cleanup_interval=args.cleanup_interval,
            max_attempts=args.max_attempts, max_backoff=args.max_backoff,
            message_groups=args.message_groups)
    except ValueError as exc:
        print(f"halfmq outbox-relay: {exc}", file=sys.stderr)
        return 2
    try:
        where = f"the database {outbox.describe}"
        if args.create_table and await _until_stopped(stop, outbox.create_table, where) is _STOPPED:
            return 0
        status = await _until_stopped(stop, relay.prepare, where)
        if status is _STOPPED:
            return 0
        if await _until_stopped(stop, producer.start, f"the broker at {args.broker}") is _STOPPED:
            return 0
    except OutboxTableMissingError as exc:
        print(f"halfmq outbox-relay: {exc} (or pass --create-table)", file=sys.stderr)
        await producer.close()
        return 1
    print(f"halfmq outbox-relay ready db={outbox.describe} table={outbox.table.t} "
          f"claim={relay.mode} broker={args.broker} pending={status.pending} "
          f"failed={status.failed}", flush=True)
    task = asyncio.create_task(relay.run())
    progress = asyncio.create_task(_progress(outbox, relay, args.progress_interval))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        relay.stop()
        await task
    except OutboxTableMissingError as exc:
        print(f"halfmq outbox-relay: {exc}", file=sys.stderr)
        return 1
    finally:
        for t in (progress, stopped):
            t.cancel()
        await producer.close()
    s = relay.stats
    log.info("outbox relay stopped after %.1fs: sent %d rows, failed %d", time.monotonic()
             - s.started, s.sent, s.failed)
    return 0


_STOPPED: Any = object()


async def _until_stopped(stop: asyncio.Event, attempt: Any, what: str) -> Any:
    """Call ``attempt()`` until it works (backoff up to 5 s, a log line per new error), or
    return ``_STOPPED`` once ``stop`` is set. ``OutboxTableMissingError`` is raised."""
    delay, said = 0.2, ""
    while not stop.is_set():
        try:
            return await attempt()
        except (OutboxTableMissingError, asyncio.CancelledError):
            raise
        except (HalfMQError, OSError, Exception) as exc:  # noqa: BLE001 - reported, retried
            text = f"{type(exc).__name__}: {exc}"
            if text != said:
                log.warning("outbox relay: cannot reach %s yet (%s); retrying", what, text)
                said = text
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            delay = min(5.0, delay * 2)
    return _STOPPED


async def _progress(outbox: Outbox, relay: OutboxRelay, interval: float) -> None:
    """Log what the relay did since the last line, when something changed."""
    if interval <= 0:
        return
    s = relay.stats
    last = (s.sent, s.failed, s.removed)
    last_t = time.monotonic()
    while True:
        await asyncio.sleep(interval)
        now_t = time.monotonic()
        current = (s.sent, s.failed, s.removed)
        if current == last:
            continue
        try:
            async with outbox.connection() as conn:
                pending, failed_rows, oldest = await outbox.table.backlog(conn)
            backlog = (f"pending {pending}" + ("" if oldest is None else f" (oldest {oldest:.1f}s)")
                       + f", failed rows {failed_rows}")
        except Exception as exc:  # noqa: BLE001 - the relay reports database errors itself
            backlog = f"backlog unknown ({type(exc).__name__})"
        sent = current[0] - last[0]
        log.info("outbox relay: sent %d rows in %.1fs (%.1f/s), failed %d; total sent %d, "
                 "failed %d, removed %d; %s", sent, now_t - last_t, sent / (now_t - last_t),
                 current[1] - last[1], s.sent, s.failed, s.removed, backlog)
        last, last_t = current, now_t


if __name__ == "__main__":
    sys.exit(outbox_relay_main(sys.argv[1:]))
