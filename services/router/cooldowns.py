"""Cooldowns: which provider / auth profile / model to avoid, and until when.

A cooldown is keyed by ``(provider, auth_profile, model)`` where an empty
model means "every model of that key": what a model did (rate limit,
SERVER_ERROR, TIMEOUT, NETWORK, OVERLOADED, MODEL_NOT_FOUND) cools *that
model on that key*, so a sibling model on the same key stays usable; what
the key did (AUTH, AUTH_PERMANENT, BILLING, a key-wide rate limit) cools
*the key* (see :mod:`runyard.router.policy`). Rows with an empty profile
(a model on every key) were written by earlier versions and are still read.

The schedule is exponential with a cap: the n-th failure of an episode
cools for ``initial * multiplier^(n-1)``, at most ``max``; BILLING and
AUTH_PERMANENT *disable* the profile on the ``disable_*`` schedule (5 h
doubling to 24 h by default). A further failure during a cooldown extends it
(never shortens it); a Retry-After longer than the schedule wins. One
request escalates a key at most once (its same-model retries and a failed
probe extend, never escalate). A success clears the state of the model it
succeeded on and of its key, never another model's. A failure (or success)
of an attempt that started *before* the episode's latest failure is the
same incident seen late by a request that was already in flight: it neither
escalates nor clears.

State is shared by every router replica through the ``router.cooldowns``
table: the hot path reads only an in-memory cache; each failure updates the
cache at once and is written (with its ``model.failover`` outbox event, in
one transaction) by a background writer, which then NOTIFYs the new row on
:data:`CHANNEL`. Every replica LISTENs and applies rows whose per-row
``version`` is newer than its own, and reloads the whole table every
``cooldown_sync_interval_ms`` as a safety net. Replicas therefore agree
within milliseconds; a replica that cannot reach PostgreSQL keeps working
from its cache and writes later.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from runyard._proto.v1 import common_pb2
from runyard.common.config import RouterConfig
from runyard.common.db import Listener
from runyard.common.outbox import Outbox
from runyard.router.policy import DISABLE_REASONS, policy_for

__all__ = [
    "CHANNEL",
    "CooldownKey",
    "CooldownState",
    "CooldownStore",
    "Failure",
    "Schedules",
    "cleared_state",
    "fill_cooldown",
    "next_state",
]

log = logging.getLogger(__name__)

#: Errors of a database that is unreachable or busy: the cooldown writer keeps its operations and retries.
_OUTAGE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)

#: NOTIFY channel carrying changed cooldown rows (JSON) to every replica.
CHANNEL = "runyard_router_cooldowns"
#: Health values (``router.cooldowns.health``, ProviderHealth without prefix).
OK, COOLING, DISABLED = "ok", "cooling", "disabled"
_MAX_PENDING_OPS = 10_000
_MESSAGE_LIMIT = 300


@dataclass(frozen=True, slots=True, order=True)
class CooldownKey:
    """What a cooldown applies to; ``""`` profile/model means every one."""

    provider: str
    profile: str
    model: str

    def label(self) -> str:
        """``provider/profile/model`` with ``*`` for "every"."""
        return f"{self.provider}/{self.profile or '*'}/{self.model or '*'}"


@dataclass(frozen=True, slots=True)
class CooldownState:
    """One key's state. Times are seconds since the Unix epoch.

    ``until`` is None when the key is not cooling; ``version`` orders the
    committed states of one row (0 = never written).
    """

    key: CooldownKey
    health: str = OK
    until: float | None = None
    failure_count: int = 0
    last_reason: str = ""
    last_message: str = ""
    last_failure_at: float | None = None
    version: int = 0

    def active(self, now: float) -> bool:
        """Whether the key is cooling (or disabled) at ``now``."""
        return self.until is not None and self.until > now

    def health_at(self, now: float) -> str:
        """``ok``, ``cooling`` or ``disabled`` at ``now``."""
        return self.health if self.active(now) else OK


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt: ``reason`` (failover reason name), a short
    ``message``, the provider's ``retry_after_s`` hint, when the attempt
    started and when it failed (epoch seconds)."""

    reason: str
    message: str
    retry_after_s: float | None
    attempt_started_at: float
    at: float
    #: The attempt was a probe of a cooling key: it extends the cooldown but
    #: does not escalate it (steady traffic would otherwise push every
    #: cooldown to its cap within seconds).
    probe: bool = False
    #: The same request already failed on this key (a same-model retry, a
    #: rotation back): it extends the cooldown but does not escalate it, so
    #: one request counts as one failure.
    repeat: bool = False


class Schedules:
    """Cooldown durations from :class:`RouterConfig` (seconds)."""

    def __init__(self, config: RouterConfig):
        self.multiplier = config.cooldown_multiplier
        self.window_s = float(config.failure_window_s)
        self._bounds = {
            "standard": (config.cooldown_initial_ms / 1000, config.cooldown_max_ms / 1000),
            "transient": (
                config.transient_cooldown_initial_ms / 1000,
                config.transient_cooldown_max_ms / 1000,
            ),
            "disable": (float(config.disable_initial_s), float(config.disable_max_s)),
        }

    def duration(self, schedule: str, count: int) -> float:
        """Seconds of cooldown after the ``count``-th failure (1-based) on ``schedule``."""
        initial, cap = self._bounds[schedule]
        exponent = min(max(count - 1, 0), 64)
        return min(initial * self.multiplier**exponent, cap)


def next_state(
    prev: CooldownState | None, key: CooldownKey, failure: Failure, schedules: Schedules
) -> CooldownState:
    """The state of ``key`` after ``failure`` (pure; the version is unchanged).

    * An attempt that started before the episode's latest failure does not
      escalate: it only lets a longer Retry-After extend the cooldown.
    * Otherwise the failure count grows (it restarts at 1 when the key has
      been out of cooldown for ``failure_window_s``; a failed probe and a
      repeat failure of the same request keep it), and the cooldown becomes
      ``max(current end, now + schedule(count), now + Retry-After)``.
    """
    now = failure.at
    schedule = policy_for(failure.reason).schedule
    if schedule == "none":
        raise ValueError(f"{failure.reason} sets no cooldown")
    message = failure.message[:_MESSAGE_LIMIT]
    retry_until = now + failure.retry_after_s if failure.retry_after_s else None
    base = prev or CooldownState(key)
    if (
        prev is not None
        and prev.active(now)
        and prev.last_failure_at is not None
        and failure.attempt_started_at < prev.last_failure_at
    ):
        until = max(prev.until or now, retry_until or now)
        return replace(prev, until=until)
    fresh = (
        prev is None or prev.failure_count == 0 or prev.until is None or now > prev.until + schedules.window_s
    )
    count = 1 if fresh else base.failure_count + (0 if failure.probe or failure.repeat else 1)
    until = now + schedules.duration(schedule, count)
    if prev is not None and prev.active(now):
        until = max(until, prev.until or now)
    if retry_until is not None:
        until = max(until, retry_until)
    disabled = failure.reason in DISABLE_REASONS or (prev is not None and prev.health_at(now) == DISABLED)
    return replace(
        base,
        health=DISABLED if disabled else COOLING,
        until=until,
        failure_count=count,
        last_reason=failure.reason,
        last_message=message,
        last_failure_at=now,
    )


def cleared_state(prev: CooldownState | None, attempt_started_at: float) -> CooldownState | None:
    """The state after a success, or None when there is nothing to clear
    (no state, already clear, or a success of an attempt older than the
    episode's latest failure)."""
    if prev is None or (prev.failure_count == 0 and prev.until is None):
        return None
    if prev.last_failure_at is not None and attempt_started_at < prev.last_failure_at:
        return None
    return replace(prev, health=OK, until=None, failure_count=0)


def _ts(value: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(value, dt.UTC) if value is not None else None


def _epoch(value: dt.datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _from_row(row: asyncpg.Record) -> CooldownState:
    return CooldownState(
        key=CooldownKey(row["provider"], row["auth_profile"], row["model"]),
        health=row["health"],
        until=_epoch(row["until"]),
        failure_count=row["failure_count"],
        last_reason=row["last_reason"],
        last_message=row["last_message"],
        last_failure_at=_epoch(row["last_failure_at"]),
        version=row["version"],
    )


def _to_json(state: CooldownState) -> str:
    return json.dumps(
        {
            "p": state.key.provider,
            "a": state.key.profile,
            "m": state.key.model,
            "h": state.health,
            "u": state.until,
            "c": state.failure_count,
            "r": state.last_reason,
            "s": state.last_message[:200],
            "f": state.last_failure_at,
            "v": state.version,
        }
    )


def _from_json(payload: str) -> CooldownState:
    data = json.loads(payload)
    return CooldownState(
        key=CooldownKey(data["p"], data["a"], data["m"]),
        health=data["h"],
        until=data["u"],
        failure_count=data["c"],
        last_reason=data["r"],
        last_message=data["s"],
        last_failure_at=data["f"],
        version=data["v"],
    )


@dataclass(slots=True)
class _Op:
    seq: int
    kind: str  # "failure", "success", "event"
    key: CooldownKey | None = None
    failure: Failure | None = None
    attempt_started_at: float = 0.0
    event: common_pb2.LifecycleEvent | None = None


class CooldownStore:
    """The shared cooldown table with an in-memory cache (see the module doc).

    Args:
        config: the router section (schedules, sync interval, retention).
        pool: asyncpg pool on a database where the ``router`` schema is
            migrated; None keeps state in this process only (tests, tools).
        database_url: for the LISTEN connection (required with a pool to
            hear other replicas; without it only the periodic reload syncs).
        outbox: the ``router`` outbox that receives ``model.failover`` events
            in the same transaction as the cooldown change.
        clock: wall clock in epoch seconds (tests may pass their own).
        on_change: called (no arguments) after the cache changed.
    """

    def __init__(
        self,
        config: RouterConfig,
        pool: asyncpg.Pool | None = None,
        *,
        database_url: str = "",
        outbox: Outbox | None = None,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[], None] | None = None,
    ):
        self.config = config
        self.schedules = Schedules(config)
        self.pool = pool
        self.database_url = database_url
        self.outbox = outbox
        self.clock = clock
        self.on_change = on_change
        self._cache: dict[CooldownKey, CooldownState] = {}
        self._pending_keys: dict[CooldownKey, int] = {}
        self._ops: list[_Op] = []
        self._seq = 0
        self._done_seq = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._listener: Listener | None = None
        self.write_errors = 0

    # ------------------------------------------------------------ hot path

    def get(self, key: CooldownKey) -> CooldownState | None:
        """The cached state of ``key`` (None if never seen)."""
        return self._cache.get(key)

    def keys_for(
        self, provider: str, profile: str, model: str
    ) -> tuple[CooldownKey, CooldownKey, CooldownKey]:
        """The three keys that can block ``model`` on ``profile``: the model
        on the profile, the whole profile, the model on every profile."""
        return (
            CooldownKey(provider, profile, model),
            CooldownKey(provider, profile, ""),
            CooldownKey(provider, "", model),
        )

    def blocking(self, provider: str, profile: str, model: str, now: float) -> CooldownState | None:
        """The active state that blocks ``model`` on ``profile`` the longest, or None."""
        worst: CooldownState | None = None
        cache = self._cache
        for key in self.keys_for(provider, profile, model):
            state = cache.get(key)
            if (
                state is not None
                and state.until is not None
                and state.until > now
                and (worst is None or state.until > (worst.until or 0))
            ):
                worst = state
        return worst

    def record_failure(
        self, key: CooldownKey, failure: Failure, event: common_pb2.LifecycleEvent | None = None
    ) -> CooldownState:
        """:meth:`apply_failure` then :meth:`enqueue_failure`; returns the new cached state."""
        state = self.apply_failure(key, failure)
        self.enqueue_failure(key, failure, event)
        return state

    def apply_failure(self, key: CooldownKey, failure: Failure) -> CooldownState:
        """Cool ``key`` down in this replica's cache at once; returns the new state."""
        state = next_state(self._cache.get(key), key, failure, self.schedules)
        if self.pool is None:
            state = replace(state, version=state.version + 1)
        self._set(state)
        return state

    def enqueue_failure(
        self, key: CooldownKey, failure: Failure, event: common_pb2.LifecycleEvent | None = None
    ) -> None:
        """Write ``failure`` to the shared table soon (the writer recomputes the
        state under a row lock from the committed row). ``event`` (a
        ``model.failover`` LifecycleEvent) goes in the same transaction, with
        ``cooldown_until``/``cooldown_key`` set from the committed state."""
        self._enqueue(_Op(0, "failure", key=key, failure=failure, event=event))

    def record_success(self, provider: str, profile: str, model: str, attempt_started_at: float) -> None:
        """Clear the keys of ``model`` on ``profile`` after a success of an
        attempt started at ``attempt_started_at`` (epoch seconds): the
        model's own state and its key's (the key evidently works); never the
        state of another model on the same key."""
        for key in self.keys_for(provider, profile, model):
            prev = self._cache.get(key)
            state = cleared_state(prev, attempt_started_at)
            if state is None:
                continue
            if self.pool is None:
                state = replace(state, version=state.version + 1)
            self._set(state)
            self._enqueue(_Op(0, "success", key=key, attempt_started_at=attempt_started_at))

    def record_event(self, event: common_pb2.LifecycleEvent) -> None:
        """Write a lifecycle event that changes no cooldown (an abort)."""
        self._enqueue(_Op(0, "event", event=event))

    def states(self) -> list[CooldownState]:
        """Every cached state."""
        return list(self._cache.values())

    # ------------------------------------------------------------ plumbing

    def _set(self, state: CooldownState) -> None:
        self._cache[state.key] = state
        if self.on_change is not None:
            self.on_change()

    def _apply(self, state: CooldownState) -> bool:
        """Take a committed state if it is newer than the cached one."""
        current = self._cache.get(state.key)
        if current is not None and current.version >= state.version:
            return False
        self._set(state)
        return True

    def _enqueue(self, op: _Op) -> None:
        if self.pool is None:
            return
        self._seq += 1
        op.seq = self._seq
        if op.key is not None:
            self._pending_keys[op.key] = self._pending_keys.get(op.key, 0) + 1
        self._ops.append(op)
        if len(self._ops) > _MAX_PENDING_OPS:
            dropped = self._ops.pop(0)
            self._done_seq = max(self._done_seq, dropped.seq)
            self._unpend([dropped])
            log.error("cooldown writer is %d operations behind; dropped the oldest", _MAX_PENDING_OPS)
        self._wake.set()

    def _unpend(self, ops: Iterable[_Op]) -> None:
        for op in ops:
            if op.key is not None:
                left = self._pending_keys.get(op.key, 0) - 1
                if left > 0:
                    self._pending_keys[op.key] = left
                else:
                    self._pending_keys.pop(op.key, None)

    async def start(self) -> None:
        """Load the table, LISTEN for other replicas, start the writer and the
        periodic reload. No-op without a pool."""
        if self.pool is None:
            return
        await self.refresh()
        if self.database_url:
            self._listener = Listener(
                self.database_url, [CHANNEL], self._notified, on_reconnect=self._reload_soon
            )
            await self._listener.start()
        self._tasks = [
            asyncio.create_task(self._writer(), name="cooldown-writer"),
            asyncio.create_task(self._syncer(), name="cooldown-sync"),
        ]

    async def close(self, flush_timeout_s: float = 5.0) -> None:
        """Write what is pending (bounded), then stop the background tasks."""
        if self.pool is not None and self._tasks:
            with contextlib.suppress(TimeoutError):
                await self.flush(flush_timeout_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every operation recorded so far is committed.

        Raises:
            TimeoutError: not done within ``timeout_s``.
        """
        if self.pool is None:
            return
        target = self._seq
        async with asyncio.timeout(timeout_s):
            while self._done_seq < target:
                self._progress.clear()
                self._wake.set()
                await self._progress.wait()

    async def refresh(self) -> None:
        """Reload every row from the database (newer versions win)."""
        if self.pool is None:
            return
        rows = await self.pool.fetch("SELECT * FROM router.cooldowns")
        seen = set()
        for row in rows:
            state = _from_row(row)
            seen.add(state.key)
            self._apply(state)
        for key in [k for k in self._cache if k not in seen and k not in self._pending_keys]:
            if not self._cache[key].active(self.clock()):
                del self._cache[key]

    def _notified(self, _channel: str, payload: str) -> None:
        try:
            self._apply(_from_json(payload))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a malformed cooldown notification: %s", exc)

    def _reload_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self.try_refresh())
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(task)

    async def try_refresh(self) -> bool:
        """:meth:`refresh`, or False (logged) when the database cannot be
        reached: the cache stays as it is."""
        try:
            await self.refresh()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("reloading cooldowns failed: %s", exc)
            return False
        return True

    async def _syncer(self) -> None:
        interval = self.config.cooldown_sync_interval_ms / 1000
        purge_every = max(int(3600 / interval), 1)
        ticks = 0
        while True:
            await asyncio.sleep(interval)
            ticks += 1
            await self.try_refresh()
            if ticks % purge_every == 0:
                with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    assert self.pool is not None
                    await self.pool.execute(
                        "DELETE FROM router.cooldowns WHERE (until IS NULL OR until < now()) "
                        "AND updated_at < now() - make_interval(secs => $1)",
                        float(self.config.cooldown_retention_s),
                    )

    async def _writer(self) -> None:
        while True:
            if not self._ops:
                self._wake.clear()
                if not self._ops:
                    await self._wake.wait()
            # The database unreachable or busy: keep the ops and retry the
            # oldest (with whatever came meanwhile), backing off from 0.05 s to 5 s.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_OUTAGE_ERRORS),
                wait=wait_exponential(multiplier=0.05, max=5.0),
                before_sleep=self._log_write_failure,
            ):
                with attempt:
                    done = await self._write_oldest()
            if done is None:
                continue
            last, committed = done
            # Only now drop the ops (a failed write keeps them for the retry);
            # by sequence number, since the overflow guard may have dropped some.
            written = [op for op in self._ops if op.seq <= last]
            self._ops = [op for op in self._ops if op.seq > last]
            self._unpend(written)
            for state in committed:
                self._apply(state)
            self._done_seq = max(self._done_seq, last)
            self._progress.set()

    async def _write_oldest(self) -> tuple[int, list[CooldownState]] | None:
        """Write the oldest pending operations (up to 500): the last sequence
        number written and the rows as committed; None when nothing is pending.

        Raises:
            OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError:
                the database is unreachable or busy (counted in ``write_errors``).
        """
        batch = self._ops[:500]
        if not batch:
            return None
        last = batch[-1].seq
        try:
            return last, await self._write(batch)
        except _OUTAGE_ERRORS:
            self.write_errors += 1
            raise
        except Exception:
            # A bug, not an outage: retrying the same batch cannot help.
            self.write_errors += 1
            log.exception("dropping %d cooldown operation(s) that cannot be written", len(batch))
            return last, []

    def _log_write_failure(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "writing %d cooldown operation(s) failed (%s); retrying in %.2fs",
            min(len(self._ops), 500),
            error,
            delay,
        )

    async def _write(self, batch: Sequence[_Op]) -> list[CooldownState]:
        """One transaction: lock the batch's rows in key order, apply every
        operation, write the events, NOTIFY the changed rows."""
        assert self.pool is not None
        failure_keys = sorted({op.key for op in batch if op.kind == "failure" and op.key is not None})
        keys = sorted({op.key for op in batch if op.key is not None})
        changed: dict[CooldownKey, CooldownState] = {}
        events: list[common_pb2.LifecycleEvent] = []
        async with self.pool.acquire() as conn, conn.transaction():
            if failure_keys:
                await conn.execute(
                    """
                    INSERT INTO router.cooldowns (provider, auth_profile, model)
                    SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
                    ON CONFLICT DO NOTHING
                    """,
                    [k.provider for k in failure_keys],
                    [k.profile for k in failure_keys],
                    [k.model for k in failure_keys],
                )
            current: dict[CooldownKey, CooldownState] = {}
            if keys:
                rows = await conn.fetch(
                    """
                    SELECT c.* FROM router.cooldowns c
                    JOIN unnest($1::text[], $2::text[], $3::text[]) AS k(provider, auth_profile, model)
                      USING (provider, auth_profile, model)
                    ORDER BY c.provider, c.auth_profile, c.model
                    FOR UPDATE OF c
                    """,
                    [k.provider for k in keys],
                    [k.profile for k in keys],
                    [k.model for k in keys],
                )
                current = {state.key: state for state in map(_from_row, rows)}
            for op in batch:
                if op.kind == "failure" and op.key is not None and op.failure is not None:
                    prev = current.get(op.key)
                    state = next_state(prev, op.key, op.failure, self.schedules)
                    state = replace(state, version=(prev.version if prev else 0) + 1)
                    current[op.key] = changed[op.key] = state
                    if op.event is not None:
                        fill_cooldown(op.event, state)
                        events.append(op.event)
                elif op.kind == "success" and op.key is not None:
                    prev = current.get(op.key)
                    cleared = cleared_state(prev, op.attempt_started_at)
                    if cleared is not None and prev is not None:
                        state = replace(cleared, version=prev.version + 1)
                        current[op.key] = changed[op.key] = state
                elif op.event is not None:
                    events.append(op.event)
            if changed:
                states = list(changed.values())
                await conn.execute(
                    """
                    UPDATE router.cooldowns c SET
                        health = u.health, until = u.until, failure_count = u.failure_count,
                        last_reason = u.last_reason, last_message = u.last_message,
                        last_failure_at = u.last_failure_at, version = u.version, updated_at = now()
                    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::int[],
                                $7::text[], $8::text[], $9::timestamptz[], $10::bigint[])
                      AS u(provider, auth_profile, model, health, until, failure_count,
                           last_reason, last_message, last_failure_at, version)
                    WHERE c.provider = u.provider AND c.auth_profile = u.auth_profile AND c.model = u.model
                    """,
                    [s.key.provider for s in states],
                    [s.key.profile for s in states],
                    [s.key.model for s in states],
                    [s.health for s in states],
                    [_ts(s.until) for s in states],
                    [s.failure_count for s in states],
                    [s.last_reason for s in states],
                    [s.last_message for s in states],
                    [_ts(s.last_failure_at) for s in states],
                    [s.version for s in states],
                )
                for state in states:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, _to_json(state))
            if events and self.outbox is not None:
                await self.outbox.emit(conn, events)
        return list(changed.values())


def fill_cooldown(event: common_pb2.LifecycleEvent, state: CooldownState) -> None:
    """Set ``event.model.cooldown_until`` and ``cooldown_key`` from ``state``."""
    if state.until is not None:
        event.model.cooldown_until.FromNanoseconds(int(state.until * 1e9))
    else:
        event.model.ClearField("cooldown_until")
    event.model.cooldown_key = state.key.label()
