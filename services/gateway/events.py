"""Run events: gap-free ``seq`` per run, batched persistence, live fan-out.

* :class:`EventLog` receives events from the worker hub and writes them with
  group commit: one multi-row statement per flush, covering every run with
  pending events, that assigns ``seq`` in PostgreSQL (``runs.last_seq``) and
  only for the run's current epoch (events of a worker that lost its lease
  are dropped). Events are published to followers *after* they are durable,
  so a follower never sees an event that a crash could take back.
* :class:`Broker` fans published events out to followers on this gateway;
  followers on other gateways learn of new events by NOTIFY and read them
  from the table.
* :func:`follow` replays a run's events after ``after_seq`` and then follows
  live, without gaps or duplicates, until the terminal event.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg

from runyard._proto.v1 import common_pb2
from runyard.common import metrics
from runyard.gateway.runs import EVENTS_CHANNEL, RunStore

__all__ = ["Broker", "EventLog", "TERMINAL_EVENTS", "follow"]

log = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset({"completed", "failed", "cancelled"})
_SUBSCRIBER_BUFFER = 4096
_SAFETY_POLL_S = 5.0


@dataclass(slots=True)
class _Pending:
    run_id: uuid.UUID
    session_id: str
    epoch: int
    data: bytes
    event: common_pb2.RunEvent
    worker_seq: int


@dataclass(slots=True)
class _Flush:
    items: list[_Pending] = field(default_factory=list)
    done: asyncio.Future[None] | None = None


class Subscription:
    """A follower's mailbox for one run (bounded; overflow means re-read the table)."""

    def __init__(self) -> None:
        self.events: collections.deque[common_pb2.RunEvent] = collections.deque()
        self.overflow = False
        self.poked_seq = 0
        self.wake = asyncio.Event()

    def push(self, events: list[common_pb2.RunEvent]) -> None:
        if len(self.events) + len(events) > _SUBSCRIBER_BUFFER:
            self.events.clear()
            self.overflow = True
        else:
            self.events.extend(events)
        self.wake.set()

    def poke(self, seq: int) -> None:
        self.poked_seq = max(self.poked_seq, seq)
        self.wake.set()


class Broker:
    """In-process fan-out of persisted run events to followers."""

    def __init__(self) -> None:
        self._subs: dict[uuid.UUID, set[Subscription]] = {}

    def subscribe(self, run_id: uuid.UUID) -> Subscription:
        sub = Subscription()
        self._subs.setdefault(run_id, set()).add(sub)
        return sub

    def unsubscribe(self, run_id: uuid.UUID, sub: Subscription) -> None:
        subs = self._subs.get(run_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[run_id]

    def publish(self, run_id: uuid.UUID, events: list[common_pb2.RunEvent]) -> None:
        for sub in self._subs.get(run_id, ()):
            sub.push(events)

    def notify(self, channel: str, payload: str) -> None:
        """LISTEN callback for ``runyard_run_events`` (``run_id:last_seq``)."""
        if channel != EVENTS_CHANNEL:
            return
        run_text, _, seq_text = payload.partition(":")
        try:
            run_id = uuid.UUID(run_text)
            seq = int(seq_text)
        except ValueError:
            return
        for sub in self._subs.get(run_id, ()):
            sub.poke(seq)

    def poke_all(self) -> None:
        """Wake every follower to re-read (after a LISTEN reconnect)."""
        for subs in self._subs.values():
            for sub in subs:
                sub.poke(1 << 62)

    @property
    def followers(self) -> int:
        return sum(len(s) for s in self._subs.values())


_FLUSH_SQL = f"""
WITH b AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::int[], $4::bytea[], $5::bigint[])
        AS b(run_id, epoch, idx, data, wseq)
), n AS (
    SELECT run_id, epoch, count(*)::bigint AS cnt, max(wseq) AS max_wseq FROM b GROUP BY run_id, epoch
), upd AS (
    UPDATE gateway.runs r
    SET last_seq = r.last_seq + n.cnt, worker_seq = greatest(r.worker_seq, n.max_wseq)
    FROM n
    WHERE r.id = n.run_id AND r.epoch = n.epoch AND r.status = 'running'
    RETURNING r.id, r.last_seq - n.cnt AS base, r.last_seq AS last
), ins AS (
    INSERT INTO gateway.run_events (run_id, seq, data)
    SELECT b.run_id, upd.base + b.idx, b.data FROM b JOIN upd ON upd.id = b.run_id
)
SELECT upd.id, upd.base, pg_notify('{EVENTS_CHANNEL}', upd.id::text || ':' || upd.last) FROM upd
"""


class EventLog:
    """Group-commit writer of run events (one flusher task per gateway)."""

    def __init__(self, pool: asyncpg.Pool, broker: Broker):
        self.pool = pool
        self.broker = broker
        self._pending: list[_Pending] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-flusher")

    async def close(self) -> None:
        await self.flush()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def append(
        self, run_id: uuid.UUID, session_id: str, epoch: int, event: common_pb2.RunEvent, worker_seq: int = 0
    ) -> None:
        """Queue one event (its ``seq`` is assigned when it is written)."""
        if not event.HasField("time"):
            event.time.GetCurrentTime()
        self._pending.append(
            _Pending(run_id, session_id, epoch, event.SerializeToString(), event, worker_seq)
        )
        self._wake.set()

    async def flush(self) -> None:
        """Wait until everything appended so far is written (or dropped as stale),
        including a batch being written right now."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._wake.set()
        await future

    async def _run(self) -> None:
        delay = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            waiters, self._waiters = self._waiters, []
            failures = 0
            while batch:
                try:
                    await self._write(batch)
                    delay = 0.05
                    break
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    # The database is unreachable or restarting: keep the batch.
                    log.warning("writing %d run events failed (%s); retrying", len(batch), exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                except Exception:  # noqa: BLE001 - a poison batch must not stop every run's events
                    failures += 1
                    log.exception("writing %d run events failed", len(batch))
                    if failures >= 3:
                        log.error("dropping %d run events that cannot be written", len(batch))
                        break
                    await asyncio.sleep(delay)
            for future in waiters:
                if not future.done():
                    future.set_result(None)

    async def _write(self, batch: list[_Pending]) -> None:
        counters: dict[tuple[uuid.UUID, int], int] = {}
        idx: list[int] = []
        for item in batch:
            key = (item.run_id, item.epoch)
            counters[key] = counters.get(key, 0) + 1
            idx.append(counters[key])
        rows = await self.pool.fetch(
            _FLUSH_SQL,
            [i.run_id for i in batch],
            [i.epoch for i in batch],
            idx,
            [i.data for i in batch],
            [i.worker_seq for i in batch],
        )
        bases = {row["id"]: row["base"] for row in rows}
        metrics.RUN_EVENTS_PERSISTED.inc(sum(1 for i in batch if i.run_id in bases))
        published: dict[uuid.UUID, list[common_pb2.RunEvent]] = {}
        for item, position in zip(batch, idx, strict=True):
            base = bases.get(item.run_id)
            if base is None:
                continue  # stale epoch or run no longer running: dropped
            event = item.event
            event.run_id = str(item.run_id)
            event.session_id = item.session_id
            event.seq = base + position
            published.setdefault(item.run_id, []).append(event)
        for run_id, events in published.items():
            self.broker.publish(run_id, events)


def decode_event(run_id: uuid.UUID, session_id: str, seq: int, data: bytes) -> common_pb2.RunEvent:
    """A stored event with its ids and seq filled in."""
    event = common_pb2.RunEvent.FromString(data)
    event.run_id = str(run_id)
    event.session_id = session_id
    event.seq = seq
    return event


async def follow(
    store: RunStore, broker: Broker, run_id: uuid.UUID, session_id: str, after_seq: int
) -> AsyncIterator[common_pb2.RunEvent]:
    """Every event of the run with ``seq > after_seq``, then live, until it ends.

    Subscribes before reading the table, so an event is either read or
    delivered live; duplicates are dropped by ``seq`` and a gap triggers a
    re-read, so the caller sees each seq exactly once, in order.
    """
    sub = broker.subscribe(run_id)
    last = after_seq
    try:
        need_read = True
        while True:
            if need_read:
                sub.overflow = False
                rows = await store.events_after(run_id, last)
                for row in rows:
                    event = decode_event(run_id, session_id, row["seq"], bytes(row["data"]))
                    last = event.seq
                    yield event
                    if event.WhichOneof("event") in TERMINAL_EVENTS:
                        return
                if len(rows) == 500:
                    continue
                need_read = False
            try:
                await asyncio.wait_for(sub.wake.wait(), _SAFETY_POLL_S)
            except TimeoutError:
                need_read = True
                continue
            sub.wake.clear()
            if sub.overflow:
                sub.events.clear()
                need_read = True
                continue
            while sub.events:
                event = sub.events.popleft()
                if event.seq <= last:
                    continue
                if event.seq != last + 1:
                    need_read = True
                    sub.events.clear()
                    break
                last = event.seq
                yield event
                if event.WhichOneof("event") in TERMINAL_EVENTS:
                    return
            if sub.poked_seq > last:
                need_read = True
    finally:
        broker.unsubscribe(run_id, sub)
