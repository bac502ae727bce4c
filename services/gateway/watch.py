"""Lifecycle events on the gateway: the relay and ``WatchEvents``.

Every service that emits lifecycle events owns an outbox in its own schema
(DESIGN.md section 6). The gateway serves them all from one stream:

* **Its own events** (``run.queued``, ``run.started``, ``run.completed``,
  ``run.failed``, ``message.received``, ``message.sent``) are written to
  ``gateway.outbox`` by :func:`emit_run_events` in the same transaction as
  the run's status change (see :mod:`runyard.gateway.runs`).
* **Other services' events** are copied by :class:`EventRelay`, which reads
  each source's internal ``ListEvents(after_id)`` RPC (sessions:
  ``session.*`` and ``service.*``; router: ``model.failover``) and inserts
  the events into ``gateway.outbox`` together with the source's new cursor
  (``gateway.event_cursors``), in one transaction, with the cursor row locked
  so concurrent gateway replicas never copy an event twice (a replica that
  finds the row locked skips the round). It wakes on the sources' NOTIFY
  channels and polls every ``poll_interval_s`` otherwise. A source that
  answers UNIMPLEMENTED (an older router) is skipped and retried later.
* :class:`Watcher` serves ``WatchEvents(after_id, types)``: events of the
  caller's org with ``id > after_id`` in id order (replay), then live (LISTEN
  on ``runyard_gateway_events`` plus polling). Ids are ``gateway.outbox``
  positions (:class:`runyard.common.outbox.Outbox`): a reader only sees rows
  of transactions that have ended, so a subscriber that resumes after the
  last id it saw, across gateway or sessions restarts, misses nothing and
  sees nothing twice.

``service.*`` events belong to no org; callers with the ``admin`` scope see
them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import asyncpg
import grpc
from tenacity import AsyncRetrying, retry_if_exception_type, wait_fixed

from runyard._proto.v1 import common_pb2, gateway_pb2, sessions_pb2
from runyard.common import db, metrics
from runyard.common.auth import internal_metadata
from runyard.common.clients import InternalChannels, call
from runyard.common.config import LIFECYCLE_EVENT_TYPES, Config
from runyard.common.db import Listener
from runyard.common.errors import InvalidArgument, RunyardError, Unavailable
from runyard.common.outbox import HORIZON_SQL, Outbox, xid_of
from runyard.common.protoutil import now
from runyard.gateway.run_status import TO_PROTO, RunStatus

__all__ = [
    "EVENTS_CHANNEL",
    "OUTBOX",
    "SOURCE_CHANNELS",
    "EventRelay",
    "LifecycleStream",
    "Watcher",
    "emit_run_events",
    "fetch_with_events",
    "fetchrow_with_events",
    "list_events_source",
]

log = logging.getLogger(__name__)

#: NOTIFY channel announcing newly sequenced gateway outbox events.
EVENTS_CHANNEL = "runyard_gateway_events"
#: The gateway's outbox (``gateway.outbox``).
OUTBOX = Outbox("gateway", EVENTS_CHANNEL, relay_columns=True)
#: Relayed sources and the NOTIFY channels their outboxes announce on.
SOURCE_CHANNELS = {"sessions": "runyard_sessions_events", "router": "runyard_router_events"}

_PAGE = 500
_SOURCE_OF_CHANNEL = {channel: source for source, channel in SOURCE_CHANNELS.items()}
#: First re-read delay when announced events are still above the horizon.
_HORIZON_RETRY_S = 0.005
_RETRY_UNIMPLEMENTED_S = 60.0

# ---------------------------------------------------------------- the gateway's own events


def _ms(delta: Any) -> int:
    return max(int(delta.total_seconds() * 1000), 0) if delta is not None else 0


def run_events(
    row: Any,
    *,
    source: str = "",
    run_event: bytes | None = None,
    only: Iterable[str] | None = None,
    message_length: int | None = None,
) -> list[common_pb2.LifecycleEvent]:
    """The lifecycle events of a run row that just changed status.

    ``row`` needs id, org_id, session_id, session_key, agent_id, status and,
    when present, attempt, model, error, input_text, created_at, started_at,
    ended_at, first_claimed_at, task_id. ``run_event`` is the terminal
    ``RunEvent`` bytes (for ``message.sent``'s length); ``only`` keeps just
    those event types; ``message_length`` overrides ``message.received``'s
    length (a message merged into a queued run).

    A queued run gives ``run.queued`` and ``message.received``; a running
    one ``run.started``; a completed one ``run.completed`` and
    ``message.sent``; a failed or cancelled one ``run.failed`` (status says
    which; DESIGN.md names no ``run.cancelled``).
    """
    status = row["status"]
    keys = set(row.keys())

    def get(name: str, default: Any = None) -> Any:
        return row[name] if name in keys and row[name] is not None else default

    base = {
        "time": now(),
        "org_id": row["org_id"],
        "session_id": str(row["session_id"]),
        "session_key": get("session_key", ""),
        "agent_id": get("agent_id", ""),
        "run_id": str(row["id"]),
        "task_id": str(get("task_id", "") or ""),
        "source": source,
    }
    data = common_pb2.RunLifecycleData(
        status=TO_PROTO.get(status, common_pb2.RUN_STATUS_UNSPECIFIED),
        model=get("model", ""),
        attempt=get("attempt", 0),
    )
    if get("error") is not None:
        data.error.ParseFromString(bytes(row["error"]))
    created, claimed, started, ended = (
        get("created_at"),
        get("first_claimed_at"),
        get("started_at"),
        get("ended_at"),
    )
    if created is not None and claimed is not None:
        data.queue_wait_ms = _ms(claimed - created)
    if started is not None and ended is not None:
        data.duration_ms = _ms(ended - started)
    events: list[common_pb2.LifecycleEvent] = []
    if status == RunStatus.QUEUED:
        events.append(common_pb2.LifecycleEvent(type="run.queued", run=data, **base))
        length = len(get("input_text", "")) if message_length is None else message_length
        events.append(
            common_pb2.LifecycleEvent(
                type="message.received",
                message=common_pb2.MessageLifecycleData(role=common_pb2.ROLE_USER, length=length),
                **base,
            )
        )
    elif status == RunStatus.RUNNING:
        events.append(common_pb2.LifecycleEvent(type="run.started", run=data, **base))
    elif status == RunStatus.COMPLETED:
        events.append(common_pb2.LifecycleEvent(type="run.completed", run=data, **base))
        length = 0
        if run_event:
            completed = common_pb2.RunEvent.FromString(run_event)
            length = len(completed.completed.message.content)
        events.append(
            common_pb2.LifecycleEvent(
                type="message.sent",
                message=common_pb2.MessageLifecycleData(role=common_pb2.ROLE_ASSISTANT, length=length),
                **base,
            )
        )
    elif status in (RunStatus.FAILED, RunStatus.CANCELLED):
        if status == RunStatus.CANCELLED and not data.HasField("error"):
            data.error.CopyFrom(
                common_pb2.RunError(code="CANCELLED", reason="CANCELLED", message="run cancelled")
            )
        events.append(common_pb2.LifecycleEvent(type="run.failed", run=data, **base))
    if only is not None:
        keep = set(only)
        events = [e for e in events if e.type in keep]
    return events


async def emit_run_events(
    conn: db.Executor,
    rows: Iterable[Any],
    *,
    source: str = "",
    run_event: bytes | None = None,
    statuses: Iterable[str] | None = None,
    only: Iterable[str] | None = None,
    message_length: int | None = None,
) -> None:
    """Write the lifecycle events of runs whose status just changed, in the
    caller's transaction (see :func:`run_events`); ``statuses`` limits the
    rows considered by their new status."""
    wanted = set(statuses) if statuses is not None else None
    events = [
        event
        for row in rows
        if wanted is None or row["status"] in wanted
        for event in run_events(
            row, source=source, run_event=run_event, only=only, message_length=message_length
        )
    ]
    await OUTBOX.emit(conn, events)


async def fetch_with_events(
    pool: asyncpg.Pool, query: str, *args: Any, source: str = "", statuses: Iterable[str] | None = None
) -> list[asyncpg.Record]:
    """Run a status-changing ``query`` (RETURNING the changed runs) and write
    their lifecycle events, in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(query, *args)
        await emit_run_events(conn, rows, source=source, statuses=statuses)
    return list(rows)


async def fetchrow_with_events(
    pool: asyncpg.Pool, query: str, *args: Any, source: str = ""
) -> asyncpg.Record | None:
    """:func:`fetch_with_events` for a query changing at most one run."""
    rows = await fetch_with_events(pool, query, *args, source=source)
    return rows[0] if rows else None


# ---------------------------------------------------------------- relay

#: ``fetch(after_id, limit)`` -> the source's events with ids > after_id.
Fetch = Callable[[int, int], Awaitable[Sequence[common_pb2.LifecycleEvent]]]


def list_events_source(
    channel: grpc.aio.Channel, service: str, metadata: Sequence[tuple[str, str]], timeout_s: float = 10.0
) -> Fetch:
    """A :data:`Fetch` calling ``runyard.v1.<service>/ListEvents`` on ``channel``."""
    method = channel.unary_unary(
        f"/runyard.v1.{service}/ListEvents",
        request_serializer=sessions_pb2.ListEventsRequest.SerializeToString,
        response_deserializer=sessions_pb2.ListEventsResponse.FromString,
    )

    async def fetch(after_id: int, limit: int) -> Sequence[common_pb2.LifecycleEvent]:
        response = await call(
            method(
                sessions_pb2.ListEventsRequest(after_id=after_id, limit=limit),
                metadata=metadata,
                timeout=timeout_s,
            )
        )
        return list(response.events)

    return fetch


class EventRelay:
    """Copies other services' outbox events into ``gateway.outbox``.

    Rounds are at least ``min_interval_s`` apart: the events a run needs in
    order (its session's start, its commit's ``session.updated``) are
    recorded by the gateway with the run itself, so the relay only has to
    catch up in batches, and a busy stack does not pay a relay round (a
    cursor read, a ``ListEvents`` call and an insert) per run.

    Args:
        pool: the gateway's pool.
        sources: source name -> :data:`Fetch`.
        poll_interval_s: polling period when no NOTIFY arrives.
        min_interval_s: shortest time between two rounds.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        sources: dict[str, Fetch],
        *,
        poll_interval_s: float = 1.0,
        min_interval_s: float = 0.25,
    ):
        self.pool = pool
        self.sources = sources
        self.poll_interval_s = poll_interval_s
        self.min_interval_s = min_interval_s
        self._wake = asyncio.Event()
        self._announced: set[str] = set()
        #: Each source's cursor as this replica last moved it (the table is
        #: the truth; a failed compare-and-set drops the cached value).
        self._after: dict[str, int] = {}
        self._skip_until: dict[str, float] = {}
        self._failing: set[str] = set()

    def wake(self, source: str | None = None) -> None:
        """Relay soon: ``source`` announced events (None: every source)."""
        self._announced.update([source] if source is not None else self.sources)
        self._wake.set()

    async def relay_once(self, source: str) -> int:
        """Copy one page of ``source``'s new events; returns how many.

        Returns 0 when another replica relayed the same page first.
        """
        fetch = self.sources[source]
        after = self._after.get(source)
        if after is None:  # not known here yet, or another replica moved it
            after = await self.pool.fetchval(
                "SELECT after_id FROM gateway.event_cursors WHERE source = $1", source
            )
            if after is None:
                return 0
        # Fetch outside any transaction (no pooled connection or row lock is
        # held during the call), then advance the cursor compare-and-set: of
        # two replicas that fetched the same page, only the first commits it.
        events = list(await fetch(int(after), _PAGE))
        if not events:
            return 0
        last = max(e.id for e in events)
        async with self.pool.acquire() as conn, conn.transaction():
            moved = await conn.fetchval(
                """
                UPDATE gateway.event_cursors SET after_id = $3, updated_at = now()
                WHERE source = $1 AND after_id = $2 RETURNING 1
                """,
                source,
                int(after),
                last,
            )
            if moved is None:
                self._after.pop(source, None)
                return 0  # another replica relayed this page first
            # Recorded with the source's position: events the gateway already
            # recorded with the change they belong to are skipped.
            await OUTBOX.emit(conn, events, [source] * len(events))
        self._after[source] = last
        metrics.EVENTS_RELAYED_TOTAL.labels(source).inc(len(events))
        return len(events)

    async def _round(self, sources: Iterable[str] | None = None) -> int:
        """Relay ``sources`` (default every source) until they have nothing
        new; returns how many events moved."""
        moved = 0
        for source in list(sources) if sources is not None else list(self.sources):
            if time.monotonic() < self._skip_until.get(source, 0.0):
                continue
            try:
                while (count := await self.relay_once(source)) > 0:
                    moved += count
                    if count < _PAGE:
                        break
                if source in self._failing:
                    self._failing.discard(source)
                    log.info("relaying %s events again", source)
            except RunyardError as exc:
                if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                    if source not in self._skip_until:
                        log.info(
                            "%s does not serve ListEvents; its events are not relayed "
                            "(retrying every %.0f s)",
                            source,
                            _RETRY_UNIMPLEMENTED_S,
                        )
                    self._skip_until[source] = time.monotonic() + _RETRY_UNIMPLEMENTED_S
                elif source not in self._failing:
                    self._failing.add(source)
                    log.warning(
                        "relaying %s events failed (%s %s); retrying", source, exc.reason, exc.message
                    )
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("relaying %s events failed: %s", source, exc)
            except Exception:  # noqa: BLE001 - a bad page must not stop every other source for good
                if source not in self._failing:
                    self._failing.add(source)
                    log.exception("relaying %s events failed; retrying", source)
        return moved

    async def _ensure_cursors(self) -> None:
        await self.pool.executemany(
            "INSERT INTO gateway.event_cursors (source) VALUES ($1) ON CONFLICT (source) DO NOTHING",
            [(s,) for s in self.sources],
        )

    async def run(self) -> None:
        """Relay until cancelled (database errors are retried, never fatal)."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((OSError, asyncpg.PostgresError, asyncpg.InterfaceError)),
            wait=wait_fixed(self.poll_interval_s),
            before_sleep=lambda state: log.warning(
                "preparing the event relay failed (%s); retrying",
                state.outcome.exception() if state.outcome is not None else None,
            ),
        ):
            with attempt:
                await self._ensure_cursors()
        woken: list[str] | None = None
        while True:
            started = time.monotonic()
            moved = await self._round(woken)
            if woken and not moved:
                # A source announced events its readers cannot see yet (an
                # older transaction on the server is still open; see
                # runyard.common.outbox): look again shortly, a few times.
                for delay in (0.005, 0.02, 0.08):
                    await asyncio.sleep(delay)
                    if await self._round(woken):
                        break
            woken = None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval_s):  # not wait_for: it can swallow a cancel
                    await self._wake.wait()
                    woken = []
            if woken is not None:
                await asyncio.sleep(max(started + self.min_interval_s - time.monotonic(), 0.0))
                woken = sorted(self._announced)
            self._announced.clear()
            self._wake.clear()


# ---------------------------------------------------------------- WatchEvents


def check_types(types: Sequence[str]) -> list[str]:
    """Validate ``WatchEventsRequest.types``.

    Raises:
        InvalidArgument: an unknown event name (reason UNKNOWN_EVENT_TYPE, field ``types``).
    """
    unknown = [t for t in types if t not in LIFECYCLE_EVENT_TYPES]
    if unknown:
        raise InvalidArgument(
            f"unknown event type {unknown[0]!r}; known: {', '.join(LIFECYCLE_EVENT_TYPES)}",
            reason="UNKNOWN_EVENT_TYPE",
            field="types",
        )
    return list(dict.fromkeys(types))


class Watcher:
    """Serves ``WatchEvents`` from ``gateway.outbox``.

    Args:
        pool: the gateway's pool.
        poll_interval_s: re-read period when no NOTIFY arrives.
    """

    def __init__(self, pool: asyncpg.Pool, *, poll_interval_s: float = 2.0):
        self.pool = pool
        self.poll_interval_s = poll_interval_s
        self._subscribers: set[asyncio.Event] = set()
        #: Newest transaction id announced on the events channel.
        self.notified_xid = 0

    def notify(self, payload: str = "") -> None:
        """Events were committed (``payload``: the writer's transaction id):
        wake every stream."""
        with contextlib.suppress(ValueError):
            self.notified_xid = max(self.notified_xid, int(payload))
        for wake in self._subscribers:
            wake.set()

    async def _page(
        self, after: int, org_id: str, service_events: bool, types: list[str]
    ) -> tuple[list[asyncpg.Record], int]:
        """Final events after ``after`` and the horizon they were read under."""
        rows = await self.pool.fetch(
            f"""
            WITH h AS (SELECT {HORIZON_SQL} AS horizon)
            SELECT h.horizon, o.pos, o.data FROM h LEFT JOIN LATERAL (
                SELECT pos, data FROM gateway.outbox
                WHERE pos > $1 AND pos < h.horizon AND (org_id = $2 OR ($3 AND org_id = ''))
                  AND (cardinality($4::text[]) = 0 OR type = ANY($4::text[]))
                ORDER BY pos LIMIT $5
            ) o ON true
            """,
            after,
            org_id,
            service_events,
            types,
            _PAGE,
        )
        horizon = rows[0]["horizon"] if rows else 0
        return [r for r in rows if r["pos"] is not None], horizon

    async def follow(
        self,
        org_id: str,
        request: gateway_pb2.WatchEventsRequest,
        closing: asyncio.Event,
        *,
        service_events: bool = False,
    ) -> AsyncIterator[common_pb2.LifecycleEvent]:
        """Events of ``org_id`` after ``request.after_id``, then live.

        Ends with UNAVAILABLE (reason DRAINING, metadata ``after_id``) when
        ``closing`` is set, so the client resumes on another gateway.

        Raises:
            InvalidArgument: an unknown type in ``request.types``.
        """
        types = check_types(request.types)
        wake = asyncio.Event()
        self._subscribers.add(wake)
        metrics.WATCH_STREAMS.inc()
        last = request.after_id
        retry_s = _HORIZON_RETRY_S
        try:
            while True:
                wake.clear()
                rows, horizon = await self._page(last, org_id, service_events, types)
                for row in rows:
                    event = common_pb2.LifecycleEvent.FromString(row["data"])
                    event.id = row["pos"]
                    last = row["pos"]
                    yield event
                if len(rows) == _PAGE:
                    continue
                # Announced events of a transaction the horizon has not passed
                # yet (an older writer is still open): look again shortly.
                lagging = self.notified_xid >= xid_of(horizon)
                timeout = retry_s if lagging else self.poll_interval_s
                retry_s = min(retry_s * 2, self.poll_interval_s) if lagging else _HORIZON_RETRY_S
                if closing.is_set():
                    raise Unavailable(
                        f"gateway is shutting down; resume with WatchEvents(after_id={last})",
                        reason="DRAINING",
                        retry_after_s=0.5,
                        metadata={"after_id": str(last)},
                    )
                waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(closing.wait())]
                try:
                    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in waits:
                        waiter.cancel()
        finally:
            self._subscribers.discard(wake)
            metrics.WATCH_STREAMS.dec()

    async def trim(self, retention_s: float, batch: int = 1000) -> int:
        """Delete events older than ``retention_s`` (never the newest one)."""
        return await OUTBOX.trim(self.pool, retention_s, batch)


# ---------------------------------------------------------------- wiring


class LifecycleStream:
    """Everything the gateway runs for lifecycle events: the relay of the
    sessions and router outboxes, the :class:`Watcher` behind ``WatchEvents``,
    and the hourly trim of events older than ``maintenance.event_retention_s``.

    The relay has channels of its own: its polling of a source that is down
    must not put the channels that serve client calls into reconnect backoff.
    Its notifications come over the gateway's one LISTEN connection
    (``listener``, subscribed to here; its owner starts it before
    :meth:`start` and closes it).

    Args:
        config: the configuration (endpoints, internal secret, retention).
        pool: the gateway's pool.
        channels: opens the relay's channels to the sessions service and the
            router (closed by :meth:`close`).
        listener: the gateway's Listener, not yet started.
    """

    def __init__(self, config: Config, pool: asyncpg.Pool, channels: InternalChannels, listener: Listener):
        self.config = config
        self.pool = pool
        metadata = internal_metadata(config.auth.internal_secret)
        self._channels = [channels.open(config.endpoints.sessions), channels.open(config.endpoints.router)]
        self.relay = EventRelay(
            pool,
            {
                "sessions": list_events_source(self._channels[0], "SessionService", metadata),
                "router": list_events_source(self._channels[1], "RouterService", metadata),
            },
        )
        self.watcher = Watcher(pool)
        listener.subscribe(
            [EVENTS_CHANNEL, *SOURCE_CHANNELS.values()], self._on_notify, on_reconnect=self._on_reconnect
        )
        self._tasks: list[asyncio.Task[None]] = []

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == EVENTS_CHANNEL:
            self.watcher.notify(payload)
        else:
            self.relay.wake(_SOURCE_OF_CHANNEL.get(channel))

    def _on_reconnect(self) -> None:
        self.relay.wake()
        self.watcher.notify()

    async def _trim(self) -> None:
        retention = self.config.maintenance.event_retention_s
        while True:
            await asyncio.sleep(3600)
            if retention > 0:
                try:
                    trimmed = await self.watcher.trim(retention)
                    if trimmed:
                        log.info("trimmed %d lifecycle event(s) older than %.0f s", trimmed, retention)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("trimming lifecycle events failed: %s", exc)

    async def start(self) -> None:
        """Start the relay and the trim (the listener is LISTENing already, so
        the relay's first round misses no notification)."""
        self._tasks = [
            asyncio.create_task(self.relay.run(), name="event-relay"),
            asyncio.create_task(self._trim(), name="event-trim"),
        ]

    async def close(self) -> None:
        """Stop everything."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # noqa: BLE001 - shutdown goes on; the failure is logged
                log.exception("a lifecycle-event task failed")
        self._tasks = []
        for channel in self._channels:
            await channel.close()
