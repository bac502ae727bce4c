"""Run events: gap-free ``seq`` per run, delivered from memory, stored in chunks.

* :class:`RunLog` holds a :class:`RunStream` for every run this gateway
  executes (a worker connected here holds it). An event from the worker gets
  the run's next ``seq`` on arrival and goes to this gateway's followers at
  once (:class:`Broker`); its persistence is coalesced: a flusher writes the
  pending events of every run as one chunk row per run (``gateway.run_events``
  holds seq ranges), one statement for all runs, every
  ``event_flush_interval_ms`` or sooner when a run has many events pending,
  and the run's last events go into the transaction that ends it. A run with
  hundreds of deltas writes a few rows.
* Memory runs ahead of the table by at most :data:`PUBLISH_WINDOW` events: an
  event beyond the window waits for the next flush before it is published.
  If this gateway dies, a worker that re-attaches elsewhere resends exactly
  the events that were not persisted (``worker_seq``) and they get the same
  seqs again (a run's events are numbered in the worker's order from the
  persisted ``last_seq``), so a client that saw them from memory resumes with
  ``JoinRun`` without a gap or a duplicate. If the worker is lost too, the
  run's lease lapses and the requeue fills the window with empty deltas
  before the next attempt's ``started`` (see :meth:`RunStore.requeue`).
* Followers on other gateways learn of new events by NOTIFY (sent by every
  write) and read them from the table.
* :func:`follow` replays a run's events after ``after_seq`` (table, then what
  memory holds beyond it) and then follows live, without gaps or duplicates,
  until the terminal event.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from runyard._proto.v1 import common_pb2
from runyard.common import metrics
from runyard.common.errors import Unavailable
from runyard.common.faults import transient_database_error
from runyard.gateway.run_status import TERMINAL
from runyard.gateway.runs import EVENTS_CHANNEL, EventChunk, RunStore, encode_batch
from runyard.gateway.tool_events import TOOL_EVENT_KINDS, tool_lifecycle

__all__ = [
    "PUBLISH_WINDOW",
    "TERMINAL_EVENTS",
    "Broker",
    "FinishPending",
    "RunLog",
    "RunStream",
    "Subscription",
    "follow",
]

log = logging.getLogger(__name__)

#: ``RunEvent`` oneof members that end a run's stream: named after the
#: run's terminal statuses.
TERMINAL_EVENTS: frozenset[str] = frozenset(TERMINAL)
#: Events a run may publish from memory beyond what is persisted. A lapsed
#: run's requeue writes this many empty deltas to cover what a dead gateway
#: may have published (RunStore.requeue).
PUBLISH_WINDOW = 256
_SUBSCRIBER_BUFFER = 4096
_SAFETY_POLL_S = 5.0


class Subscription:
    """A follower's mailbox for one run (bounded; overflow means re-read)."""

    def __init__(self) -> None:
        self.events: collections.deque[common_pb2.RunEvent] = collections.deque()
        self.overflow = False
        self.poked_seq = 0
        self.wake = asyncio.Event()

    def push(self, events: Sequence[common_pb2.RunEvent]) -> None:
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
    """In-process fan-out of run events to followers on this gateway."""

    def __init__(self) -> None:
        self._subs: dict[uuid.UUID, set[Subscription]] = {}
        #: ``(run_id, seq) -> bool``: whether this gateway delivers that event
        #: itself, from memory (set by :class:`RunLog`); its NOTIFY is then
        #: not a reason for followers to read the table.
        self.delivers_locally: Callable[[uuid.UUID, int], bool] | None = None

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

    def publish(self, run_id: uuid.UUID, events: Sequence[common_pb2.RunEvent]) -> None:
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
        subs = self._subs.get(run_id)
        if not subs or (self.delivers_locally is not None and self.delivers_locally(run_id, seq)):
            return
        for sub in subs:
            sub.poke(seq)

    def wake_all(self) -> None:
        """Wake every follower (it re-checks whether the gateway is closing)."""
        for subs in self._subs.values():
            for sub in subs:
                sub.wake.set()

    def poke_all(self) -> None:
        """Wake every follower to re-read (after a LISTEN reconnect)."""
        for subs in self._subs.values():
            for sub in subs:
                sub.poke(1 << 62)

    @property
    def followers(self) -> int:
        return sum(len(s) for s in self._subs.values())


@dataclass(slots=True)
class RunStream:
    """The in-memory event log of one run this gateway executes.

    ``pending`` holds the events after ``durable_seq`` (in seq order) with
    their stored form (``raw``: the worker's event as received, without
    ids); events up to ``published_seq`` have gone to followers.
    """

    run_id: uuid.UUID
    session_id: str
    epoch: int
    durable_seq: int
    durable_worker_seq: int
    next_seq: int = 0
    last_worker_seq: int = 0
    published_seq: int = 0
    pending: list[tuple[common_pb2.RunEvent, bytes, int]] = field(default_factory=list)
    pending_bytes: int = 0
    first_pending_at: float = 0.0
    finishing: bool = False
    stale: bool = False
    flushing: asyncio.Future[None] | None = None
    #: The run's lifecycle fields (Claim.row): its tool events' lifecycle
    #: events (tool.called, tool.completed) are written with them.
    info: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        self.next_seq = self.durable_seq + 1
        self.last_worker_seq = self.durable_worker_seq
        self.published_seq = self.durable_seq


@dataclass(frozen=True, slots=True)
class FinishPending:
    """A run's unpersisted events handed to the transaction that ends it:
    ``expected_last_seq`` is the persisted ``last_seq`` they follow, and the
    terminal event gets ``terminal_seq``."""

    expected_last_seq: int
    raws: list[bytes]
    terminal_seq: int


class RunLog:
    """Sequencing, live delivery and coalesced persistence of run events.

    Args:
        store: the runs store (writes chunks).
        broker: this gateway's fan-out.
        flush_interval_s: longest time an event stays only in memory.
        flush_events: a run with this many pending events is flushed at once.
        flush_bytes: ... or with this many pending bytes.
    """

    def __init__(
        self,
        store: RunStore,
        broker: Broker,
        *,
        flush_interval_s: float = 0.1,
        flush_events: int = PUBLISH_WINDOW // 2,
        flush_bytes: int = 64 * 1024,
    ):
        self.store = store
        self.broker = broker
        self.flush_interval_s = flush_interval_s
        self.flush_events = flush_events
        self.flush_bytes = flush_bytes
        self.streams: dict[uuid.UUID, RunStream] = {}
        broker.delivers_locally = self._delivers_locally
        self._wake = asyncio.Event()
        self._urgent = False
        self._waiters: list[asyncio.Future[None]] = []
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="run-event-flusher")

    async def close(self) -> None:
        """Persist what is pending, then stop the flusher."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 10.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ------------------------------------------------------------ streams

    def open(
        self,
        run_id: uuid.UUID,
        session_id: str,
        epoch: int,
        last_seq: int,
        worker_seq: int = 0,
        info: Mapping[str, Any] | None = None,
    ) -> RunStream:
        """Start (or restart, for a new epoch) the stream of a run assigned
        here; ``last_seq``/``worker_seq`` are what the table holds, ``info``
        the run's lifecycle fields (for its tool events)."""
        stream = RunStream(
            run_id, session_id, epoch, durable_seq=last_seq, durable_worker_seq=worker_seq, info=info
        )
        self.streams[run_id] = stream
        return stream

    def _delivers_locally(self, run_id: uuid.UUID, seq: int) -> bool:
        """Whether event ``seq`` of the run is (or is about to be) published
        from memory here: an event of a stream this gateway holds, up to its
        next seq (the terminal event of a run being ended)."""
        stream = self.streams.get(run_id)
        return stream is not None and not stream.stale and seq <= stream.next_seq

    def drop(self, run_id: uuid.UUID, epoch: int | None = None) -> None:
        """Forget a run's stream (it is no longer executed here)."""
        stream = self.streams.get(run_id)
        if stream is not None and (epoch is None or stream.epoch == epoch):
            del self.streams[run_id]

    def append(self, run_id: uuid.UUID, epoch: int, event: common_pb2.RunEvent, worker_seq: int = 0) -> None:
        """An event from the run's worker: give it the next seq and deliver it.

        Events of another epoch, of a finishing run, and repeats of a
        ``worker_seq`` already received (a resend after a re-attach) are
        ignored.
        """
        stream = self.streams.get(run_id)
        if stream is None or stream.epoch != epoch or stream.stale or stream.finishing:
            return
        if worker_seq and worker_seq <= stream.last_worker_seq:
            return
        if not event.HasField("time"):
            event.time.FromNanoseconds(time.time_ns())
        raw = event.SerializeToString()
        event.run_id = str(run_id)
        event.session_id = stream.session_id
        event.seq = stream.next_seq
        stream.next_seq += 1
        if worker_seq:
            stream.last_worker_seq = worker_seq
        if not stream.pending:
            stream.first_pending_at = time.monotonic()
        stream.pending.append((event, raw, stream.last_worker_seq))
        stream.pending_bytes += len(raw)
        self._publish(stream)
        if len(stream.pending) >= self.flush_events or stream.pending_bytes >= self.flush_bytes:
            self._urgent = True
            self._wake.set()
        elif len(stream.pending) == 1:
            self._wake.set()  # the flusher arms its timer

    def _publish(self, stream: RunStream) -> None:
        """Deliver the pending events the window allows."""
        limit = min(stream.next_seq - 1, stream.durable_seq + PUBLISH_WINDOW)
        if limit <= stream.published_seq:
            return
        start = stream.published_seq - stream.durable_seq
        ready = [event for event, _, _ in stream.pending[start : limit - stream.durable_seq]]
        stream.published_seq = limit
        self.broker.publish(stream.run_id, ready)

    def memory_after(self, run_id: uuid.UUID, after_seq: int) -> list[common_pb2.RunEvent]:
        """Published events of a run held here with ``seq > after_seq`` that
        may not be in the table yet (for a follower that just read it)."""
        stream = self.streams.get(run_id)
        if stream is None:
            return []
        return [event for event, _, _ in stream.pending if after_seq < event.seq <= stream.published_seq]

    # ------------------------------------------------------------ ending

    async def begin_finish(self, run_id: uuid.UUID, epoch: int) -> FinishPending | None:
        """Hand the run's pending events to the transaction that ends it;
        the flusher leaves the run alone until :meth:`finished` or
        :meth:`abort_finish`. None when the run is not held here."""
        stream = self.streams.get(run_id)
        if stream is None or stream.epoch != epoch or stream.stale:
            return None
        stream.finishing = True
        if stream.flushing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(stream.flushing)
            if stream.stale:
                return None
        return FinishPending(stream.durable_seq, [raw for _, raw, _ in stream.pending], stream.next_seq)

    def abort_finish(self, run_id: uuid.UUID) -> None:
        """The ending transaction failed: the run's events wait for the flusher again."""
        stream = self.streams.get(run_id)
        if stream is not None:
            stream.finishing = False
            if stream.pending:
                self._wake.set()

    def finished(self, run_id: uuid.UUID, terminal: common_pb2.RunEvent | None) -> None:
        """The run ended durably: deliver what was held back and the terminal
        event, and forget the stream."""
        stream = self.streams.pop(run_id, None)
        if stream is None:
            if terminal is not None:
                self.broker.publish(run_id, [terminal])
            return
        held = [event for event, _, _ in stream.pending if event.seq > stream.published_seq]
        if terminal is not None:
            held.append(terminal)
        if held:
            self.broker.publish(run_id, held)

    # ------------------------------------------------------------ flushing

    async def flush(self, run_ids: Iterable[uuid.UUID] | None = None) -> None:
        """Persist the pending events (of ``run_ids``, else of every run) now
        and wait until they are written (or found stale)."""
        wanted = set(run_ids) if run_ids is not None else None
        while True:
            streams = [
                s
                for s in self.streams.values()
                if (wanted is None or s.run_id in wanted)
                and not s.stale
                and (s.pending or s.flushing is not None)
            ]
            if not streams:
                return
            busy = [s.flushing for s in streams if s.flushing is not None]
            if busy:
                await asyncio.gather(*busy, return_exceptions=True)
                continue
            await self._write([s for s in streams if not s.finishing and s.pending])
            if all(not s.pending or s.stale or s.finishing for s in streams):
                return

    async def _run(self) -> None:
        while True:
            timeout = self._next_due()
            try:
                if timeout is None:
                    await self._wake.wait()
                elif timeout > 0:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            due = self._due()
            self._urgent = False
            if due:
                try:
                    await self._write(due)
                except Exception:  # noqa: BLE001 - the flusher must outlive a bad batch; it retries
                    log.exception("writing run events failed; retrying")
                    await asyncio.sleep(0.5)
            elif timeout is not None and timeout <= 0:
                # Never loop without yielding: the event loop (the gateway) must go on.
                await asyncio.sleep(0)

    def _writable(self) -> list[RunStream]:
        """The runs whose pending events the flusher may write now: not ending
        (their result writes them), not stale, and not being written already
        (an explicit :meth:`flush`; when it settles, the flusher is woken)."""
        return [
            s
            for s in self.streams.values()
            if s.pending and not s.finishing and not s.stale and s.flushing is None
        ]

    def _next_due(self) -> float | None:
        """Seconds until the oldest pending event the flusher may write is due
        (None: none). Over the same runs as :meth:`_due`, so that an overdue
        one is always in the write: a run due but left out (a flush writing
        it) had the flusher loop without ever awaiting, freezing the gateway."""
        oldest = min((s.first_pending_at for s in self._writable()), default=None)
        if oldest is None:
            return None
        return oldest + self.flush_interval_s - time.monotonic()

    def _due(self) -> list[RunStream]:
        now = time.monotonic()
        active = self._writable()
        if self._urgent or any(now - s.first_pending_at >= self.flush_interval_s for s in active):
            return active  # group commit: every run with pending events goes in the same statement
        return []

    async def _write(self, streams: list[RunStream]) -> None:
        """One statement for ``streams``' pending events (retried while the
        database is unreachable; idempotent, so a retry after a commit whose
        answer was lost stores nothing twice)."""
        if not streams:
            return
        loop = asyncio.get_running_loop()
        chunks: list[EventChunk] = []
        for stream in streams:
            stream.flushing = loop.create_future()
            count = len(stream.pending)
            chunks.append(
                EventChunk(
                    run_id=stream.run_id,
                    epoch=stream.epoch,
                    first_seq=stream.durable_seq + 1,
                    last_seq=stream.durable_seq + count,
                    data=encode_batch(raw for _, raw, _ in stream.pending),
                    worker_seq=stream.pending[-1][2],
                    lifecycle=tuple(
                        tool_lifecycle(
                            stream.info,
                            (
                                event
                                for event, _, _ in stream.pending
                                if event.WhichOneof("event") in TOOL_EVENT_KINDS
                            ),
                            source=self.store.gateway_id,
                        )
                    ),
                )
            )
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(transient_database_error),
                wait=wait_exponential(multiplier=0.05, max=2.0),
                stop=stop_after_attempt(8),
                reraise=True,
            ):
                with attempt:
                    outcome = await self.store.write_events(chunks)
        except BaseException:
            for stream in streams:
                self._settle(stream)
            raise
        written = 0
        for stream, chunk in zip(streams, chunks, strict=True):
            if outcome.get(chunk.run_id, False):
                count = chunk.last_seq - chunk.first_seq + 1
                del stream.pending[:count]
                stream.pending_bytes = sum(len(raw) for _, raw, _ in stream.pending)
                stream.durable_seq = chunk.last_seq
                stream.durable_worker_seq = chunk.worker_seq
                stream.first_pending_at = time.monotonic() if stream.pending else 0.0
                written += count
                self._publish(stream)
            else:
                # The run was re-queued or ended elsewhere (lease lost): its
                # events of this epoch are not ours to write any more.
                log.warning(
                    "run %s epoch %d is no longer held here; %d event(s) dropped",
                    stream.run_id,
                    stream.epoch,
                    len(stream.pending),
                )
                stream.stale = True
                stream.pending.clear()
            self._settle(stream)
        metrics.RUN_EVENTS_PERSISTED.inc(written)

    def _settle(self, stream: RunStream) -> None:
        """The write of ``stream`` is over: wake who waits on it, and the
        flusher if events are still pending (it left the run out while it
        was being written; the write may have failed)."""
        future, stream.flushing = stream.flushing, None
        if future is not None and not future.done():
            future.set_result(None)
        if stream.pending and not stream.stale and not stream.finishing:
            self._wake.set()


async def follow(
    store: RunStore,
    broker: Broker,
    run_id: uuid.UUID,
    session_id: str,
    after_seq: int,
    *,
    memory: Callable[[uuid.UUID, int], list[common_pb2.RunEvent]] | None = None,
    subscription: Subscription | None = None,
    known: Sequence[common_pb2.RunEvent] = (),
    closing: asyncio.Event | None = None,
) -> AsyncGenerator[common_pb2.RunEvent, None]:
    """Every event of the run with ``seq > after_seq``, then live, until it ends.

    Subscribes before reading, so an event is either read or delivered live;
    what the table does not hold yet comes from ``memory`` (the run log of
    this gateway). Duplicates are dropped by ``seq`` and a gap triggers a
    re-read, so the caller sees each seq exactly once, in order.

    Args:
        subscription: made by the caller before any event after ``known``
            could exist (a run it just queued); then ``known`` (the events
            right after ``after_seq``) replaces the first read.
        closing: when set (and the broker woken, :meth:`Broker.wake_all`),
            the follow ends with UNAVAILABLE (DRAINING) naming the run and
            the ``after_seq`` to resume from on another gateway.

    Raises:
        Unavailable: ``closing`` was set.
    """
    sub = subscription or broker.subscribe(run_id)
    last = after_seq
    try:
        need_read = subscription is None
        for event in known:
            if event.seq == last + 1:
                last = event.seq
                yield event
                if event.WhichOneof("event") in TERMINAL_EVENTS:
                    return
        while True:
            if closing is not None and closing.is_set():
                raise Unavailable(
                    f"gateway is shutting down; resume with JoinRun(run_id={run_id}, after_seq={last})",
                    reason="DRAINING",
                    retry_after_s=0.5,
                    metadata={"run_id": str(run_id), "after_seq": str(last)},
                )
            if need_read:
                sub.overflow = False
                events, full = await store.events_after(run_id, session_id, last)
                if not full and memory is not None:
                    events += [e for e in memory(run_id, events[-1].seq if events else last)]
                for event in events:
                    if event.seq != last + 1:
                        continue
                    last = event.seq
                    yield event
                    if event.WhichOneof("event") in TERMINAL_EVENTS:
                        return
                if full:
                    continue
                need_read = False
            if not sub.wake.is_set():
                try:
                    # asyncio.timeout, not wait_for: no task per wait.
                    async with asyncio.timeout(_SAFETY_POLL_S):
                        await sub.wake.wait()
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
