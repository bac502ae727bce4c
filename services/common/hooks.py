"""In-process lifecycle hooks: Python callables called with typed events.

Handlers come from two places, both validated when the service starts
(:func:`load_handlers`):

* the ``runyard.plugins`` entry-point group (``hooks.entry_points``, on by
  default). An entry point names a callable decorated with :func:`hook`, or a
  list of them; ``[hooks.plugins.NAME]`` can disable one or replace its
  events and timeout;
* ``[[hooks.handlers]]`` in the configuration: a dotted path
  (``package.module:function``), the event types and a timeout.

Example plugin::

    from runyard.common.hooks import SessionEnd, hook

    @hook("session.end", timeout_ms=500)
    async def forget(event: SessionEnd) -> None:
        await memory_store.close(event.session_id, reason=event.reason)

A handler receives one frozen dataclass per event (:class:`SessionStart`,
:class:`SessionEnd`, ... see :func:`from_proto`), never a dict. Coroutine
functions run on the service's event loop; plain functions run in a daemon
thread of their own, so neither can block the service. Each handler has its
own queue and gets the events in order, one call at a time, each call bounded
by the handler's timeout. An exception or a timeout is logged and counted in
``runyard_hook_errors_total{hook, reason}`` (reason ``exception``, ``timeout``
or ``overflow`` when the handler's queue is full) and never stops other
handlers or the service.

Delivery is in-process and best effort: handlers see the events their process
commits, after the commit. A consumer that must not miss one across crashes
reads the durable stream instead (gateway ``WatchEvents``, ``runyard events``).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import importlib
import importlib.metadata
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from runyard._proto.v1 import common_pb2
from runyard.common import metrics
from runyard.common.config import HOOK_EVENT_TYPES, LIFECYCLE_EVENT_TYPES, Config, ConfigError

__all__ = [
    "ENTRY_POINT_GROUP",
    "Event",
    "Handler",
    "HookRunner",
    "HookSpec",
    "MessageEvent",
    "ModelEvent",
    "RunLifecycleEvent",
    "ServiceEvent",
    "SessionCompacted",
    "SessionEnd",
    "SessionStart",
    "SessionUpdated",
    "TaskEvent",
    "from_proto",
    "hook",
    "load_handlers",
]

log = logging.getLogger(__name__)

#: Entry-point group that plugins register under.
ENTRY_POINT_GROUP = "runyard.plugins"


# ---------------------------------------------------------------- typed events


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Fields every lifecycle event has.

    ``id`` is the outbox position (0 until the event is sequenced, which
    in-process handlers usually see); ``time`` is timezone-aware UTC;
    ``source`` is the emitting service instance.
    """

    type: str
    time: dt.datetime
    id: int = 0
    org_id: str = ""
    session_id: str = ""
    session_key: str = ""
    agent_id: str = ""
    run_id: str = ""
    task_id: str = ""
    source: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStart(Event):
    """``session.start``: an activation began. ``reason`` is ``NEW`` or ``RESUMED``."""

    reason: str = ""
    resumed_from_session_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnd(Event):
    """``session.end``: an activation ended, exactly once.

    ``reason``: RESET, DELETED, COMPACTION, IDLE, SHUTDOWN, RESTART or
    CRASH_RECOVERED; ``duration_ms`` is the activation's length;
    ``next_session_id``/``next_session_key`` are set for rollovers (reset,
    compaction).
    """

    reason: str = ""
    message_count: int = 0
    duration_ms: int = 0
    next_session_id: str = ""
    next_session_key: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionUpdated(Event):
    """``session.updated``: a run's transcript was committed (``run_id``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionCompacted(Event):
    """``session.compacted``: ``previous_session_id``'s older turns were
    summarised into this (new) session."""

    previous_session_id: str = ""
    summarized_message_count: int = 0
    kept_message_count: int = 0
    tokens_before: int = 0
    tokens_after: int = 0
    model: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceEvent(Event):
    """``service.startup`` / ``service.shutdown``; ``mode`` is ``shutdown`` or ``restart``."""

    service: str = ""
    instance_id: str = ""
    version: str = ""
    mode: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunLifecycleEvent(Event):
    """``run.queued`` / ``run.started`` / ``run.completed`` / ``run.failed``."""

    status: str = ""
    model: str = ""
    error_code: str = ""
    error_reason: str = ""
    error_message: str = ""
    attempt: int = 0
    queue_wait_ms: int = 0
    duration_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelEvent(Event):
    """``model.request`` / ``model.response`` / ``model.failover``."""

    model: str = ""
    from_model: str = ""
    to_model: str = ""
    reason: str = ""
    provider: str = ""
    auth_profile: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageEvent(Event):
    """``message.received`` / ``message.sent``; ``length`` in characters."""

    role: str = ""
    length: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskEvent(Event):
    """``task.spawned`` / ``task.started`` / ``task.completed``."""

    status: str = ""
    parent_session_id: str = ""
    description: str = ""
    result: str = ""


def from_proto(event: common_pb2.LifecycleEvent) -> Event:
    """The typed event for a ``LifecycleEvent`` message (by its ``type``).

    Unknown types give a plain :class:`Event`.
    """
    base: dict[str, Any] = {
        "type": event.type,
        "time": event.time.ToDatetime(tzinfo=dt.UTC),
        "id": event.id,
        "org_id": event.org_id,
        "session_id": event.session_id,
        "session_key": event.session_key,
        "agent_id": event.agent_id,
        "run_id": event.run_id,
        "task_id": event.task_id,
        "source": event.source,
    }
    kind = event.type
    if kind == "session.start":
        data = event.session_start
        return SessionStart(
            **base,
            reason=_enum_name(common_pb2.SessionStartReason, data.reason, "SESSION_START_REASON_"),
            resumed_from_session_id=data.resumed_from_session_id,
        )
    if kind == "session.end":
        end = event.session_end
        return SessionEnd(
            **base,
            reason=_enum_name(common_pb2.SessionEndReason, end.reason, "SESSION_END_REASON_"),
            message_count=end.message_count,
            duration_ms=end.duration_ms,
            next_session_id=end.next_session_id,
            next_session_key=end.next_session_key,
        )
    if kind == "session.updated":
        return SessionUpdated(**base)
    if kind == "session.compacted":
        compacted = event.session_compacted
        return SessionCompacted(
            **base,
            previous_session_id=compacted.previous_session_id,
            summarized_message_count=compacted.summarized_message_count,
            kept_message_count=compacted.kept_message_count,
            tokens_before=compacted.tokens_before,
            tokens_after=compacted.tokens_after,
            model=compacted.model,
        )
    if kind.startswith("service."):
        service = event.service
        return ServiceEvent(
            **base,
            service=service.service,
            instance_id=service.instance_id,
            version=service.version,
            mode=service.mode,
        )
    if kind.startswith("run."):
        run = event.run
        return RunLifecycleEvent(
            **base,
            status=_enum_name(common_pb2.RunStatus, run.status, "RUN_STATUS_"),
            model=run.model,
            error_code=run.error.code,
            error_reason=run.error.reason,
            error_message=run.error.message,
            attempt=run.attempt,
            queue_wait_ms=run.queue_wait_ms,
            duration_ms=run.duration_ms,
        )
    if kind.startswith("model."):
        model = event.model
        return ModelEvent(
            **base,
            model=model.model,
            from_model=model.from_model,
            to_model=model.to_model,
            reason=_enum_name(common_pb2.FailoverReason, model.reason, "FAILOVER_REASON_")
            if model.reason
            else "",
            provider=model.provider,
            auth_profile=model.auth_profile,
            message=model.message,
        )
    if kind.startswith("message."):
        return MessageEvent(
            **base, role=_enum_name(common_pb2.Role, event.message.role, "ROLE_"), length=event.message.length
        )
    if kind.startswith("task."):
        task = event.task.task
        return TaskEvent(
            **base,
            status=_enum_name(common_pb2.TaskStatus, task.status, "TASK_STATUS_"),
            parent_session_id=task.parent_session_id,
            description=task.description,
            result=task.result,
        )
    return Event(**base)


# ---------------------------------------------------------------- declaring handlers


@dataclass(frozen=True, slots=True)
class HookSpec:
    """What :func:`hook` attaches to a handler: its events, timeout and name."""

    events: tuple[str, ...]
    timeout_ms: int | None = None
    name: str | None = None


def hook(*events: str, timeout_ms: int | None = None, name: str | None = None) -> Callable[[Any], Any]:
    """Mark a callable as a hook handler for ``events`` (validated when loaded).

    Args:
        events: event types, e.g. ``"session.end"``.
        timeout_ms: bound on each call (default ``hooks.default_timeout_ms``).
        name: label in logs and metrics (default: the entry point's name).
    """

    def mark(func: Any) -> Any:
        func.__runyard_hook__ = HookSpec(tuple(events), timeout_ms, name)
        return func

    return mark


def _is_async(func: Any) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    if inspect.iscoroutinefunction(func):
        return True
    return not inspect.isroutine(func) and inspect.iscoroutinefunction(type(func).__call__)


class _SyncCaller:
    """Runs one sync handler's calls, in order, on a daemon thread of its own.

    A daemon thread never keeps the process alive, so a call that never
    returns cannot hold up shutdown.
    """

    def __init__(self, name: str, func: Callable[[Event], Any]):
        self.func = func
        self._calls: queue.SimpleQueue[tuple[Event, asyncio.AbstractEventLoop, asyncio.Future[None]]] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name=f"hook-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            event, loop, future = self._calls.get()
            error: BaseException | None = None
            try:
                self.func(event)
            except BaseException as exc:  # noqa: BLE001 - reported to the loop
                error = exc
            try:
                loop.call_soon_threadsafe(_settle, future, error)
            except RuntimeError:
                return  # the loop is closed: the service has stopped

    def submit(self, event: Event) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._calls.put((event, loop, future))
        return future


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class Handler:
    """One loaded handler: its callable, events, timeout and queue.

    Args:
        name: label in logs and in the ``hook`` metric label.
        func: the callable; called with one :class:`Event` subclass.
        events: event types it receives.
        timeout_s: bound on one call, seconds.
        origin: where it came from (config path or entry point), for messages.
    """

    def __init__(
        self,
        name: str,
        func: Callable[[Event], Any],
        events: Iterable[str],
        timeout_s: float,
        *,
        origin: str = "",
    ):
        self.name = name
        self.func = func
        self.events = frozenset(events)
        self.timeout_s = timeout_s
        self.origin = origin or name
        self.is_async = _is_async(func)
        self.queue: collections.deque[Event] = collections.deque()
        self.busy = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._sync: _SyncCaller | None = None
        self._overflowing = False
        #: Calls cancelled (timeout, or the runner closing) that have not stopped yet.
        self.stuck: set[asyncio.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"Handler({self.name!r}, events={sorted(self.events)}, timeout_s={self.timeout_s})"

    @property
    def idle(self) -> bool:
        """Nothing queued and no call running."""
        return not self.queue and not self.busy

    def _error(self, reason: str) -> None:
        metrics.HOOK_ERRORS_TOTAL.labels(self.name, reason).inc()

    def _abandon(self, call: asyncio.Future[Any]) -> None:
        """Cancel ``call`` without awaiting it. A coroutine call is tracked in
        :attr:`stuck` until it actually stops, so a handler that ignores
        cancellation neither holds up this queue nor, unnoticed, the exit
        (``asyncio.run`` would wait for it forever)."""
        call.cancel()
        if self.is_async and not call.done():
            self.stuck.add(call)
            call.add_done_callback(self.stuck.discard)

    async def _call(self, event: Event) -> None:
        metrics.HOOK_CALLS_TOTAL.labels(self.name).inc()
        started = time.monotonic()
        if self.is_async:
            call: asyncio.Future[Any] = asyncio.ensure_future(self.func(event))
        else:
            if self._sync is None:
                self._sync = _SyncCaller(self.name, self.func)
            call = self._sync.submit(event)
        try:
            done, _ = await asyncio.wait({call}, timeout=self.timeout_s)
        except asyncio.CancelledError:
            # The runner is closing (after the drain bound): the call may
            # ignore its cancellation too, and must not hold up the exit.
            self._abandon(call)
            raise
        if not done:
            self._abandon(call)
            self._error("timeout")
            log.warning(
                "hook %s timed out after %.0f ms on %s (session %s)",
                self.name,
                self.timeout_s * 1000,
                event.type,
                event.session_id or "-",
            )
            return
        exc = call.exception() if not call.cancelled() else None
        if exc is not None:
            self._error("exception")
            log.error(
                "hook %s raised on %s (session %s) after %.0f ms: %s: %s",
                self.name,
                event.type,
                event.session_id or "-",
                (time.monotonic() - started) * 1000,
                type(exc).__name__,
                exc,
                exc_info=exc,
            )

    async def run(self) -> None:
        """Deliver queued events one at a time until cancelled."""
        while True:
            while not self.queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            event = self.queue.popleft()
            self.busy = True
            try:
                await self._call(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._error("exception")
                log.exception("hook %s failed on %s", self.name, event.type)
            finally:
                self.busy = False

    def offer(self, event: Event, limit: int) -> None:
        """Queue ``event`` (dropped and counted as ``overflow`` beyond ``limit``)."""
        if len(self.queue) >= limit:
            self._error("overflow")
            if not self._overflowing:
                self._overflowing = True
                log.warning(
                    "hook %s queue is full (%d events, hooks.queue_size); dropping events until it drains",
                    self.name,
                    limit,
                )
            return
        self._overflowing = False
        self.queue.append(event)
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Return once the queue is empty and no call is running."""
        while not self.idle:
            await self._idle.wait()
            if not self.idle:
                await asyncio.sleep(0)


# ---------------------------------------------------------------- loading


def _import_path(path: str) -> Any:
    """The object at ``package.module:attr`` (or ``package.module.attr``)."""
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
        if not module_name:
            raise ImportError(f"{path!r} names no module")
    target: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        target = getattr(target, part)
    return target


def _check_events(events: Sequence[str], where: str) -> list[tuple[str, str]]:
    problems = []
    if not events:
        problems.append((where, "names no events"))
    for name in events:
        if name not in LIFECYCLE_EVENT_TYPES:
            problems.append(
                (where, f"unknown event name {name!r}; known: {', '.join(LIFECYCLE_EVENT_TYPES)}")
            )
        elif name not in HOOK_EVENT_TYPES:
            problems.append(
                (
                    where,
                    (
                        f"{name!r} is not delivered to in-process handlers "
                        f"(they receive {', '.join(HOOK_EVENT_TYPES)}); "
                        "read it with WatchEvents"
                    ),
                )
            )
    return problems


def load_handlers(
    config: Config,
    *,
    entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
) -> list[Handler]:
    """Import and validate every configured handler.

    Args:
        config: the service configuration (``hooks`` section).
        entry_points: the ``runyard.plugins`` entry points (default: the
            installed ones); for tests.

    Returns:
        The handlers, in configuration order (entry points first).

    Raises:
        ConfigError: listing every problem with the config path it concerns:
            a path that does not import or is not callable, an entry point
            that fails to load, an unknown or undeliverable event name, a
            missing or bad timeout, a duplicate name, an override for a
            plugin that is not installed.
    """
    cfg = config.hooks
    problems: list[tuple[str, str]] = []
    handlers: list[Handler] = []
    seen: set[str] = set()

    def add(name: str, func: Any, events: Sequence[str], timeout_ms: Any, where: str) -> None:
        if not callable(func):
            problems.append((where, f"{name} is not callable ({type(func).__name__})"))
            return
        event_problems = _check_events(events, where)
        if event_problems:
            problems.extend(event_problems)
            return
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or not 1 <= timeout_ms <= 600_000:
            problems.append(
                (where, f"timeout_ms must be a whole number of milliseconds in 1..600000, got {timeout_ms!r}")
            )
            return
        if name in seen:
            problems.append((where, f"a hook handler named {name!r} is already configured"))
            return
        seen.add(name)
        handlers.append(Handler(name, func, events, timeout_ms / 1000, origin=where))

    if cfg.entry_points:
        found = (
            list(entry_points)
            if entry_points is not None
            else list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        )
        installed = {ep.name for ep in found}
        for name in sorted(set(cfg.plugins) - installed):
            problems.append(
                (
                    f"hooks.plugins.{name}",
                    (
                        f"no installed plugin {name!r} in the {ENTRY_POINT_GROUP} entry-point group "
                        f"(installed: {', '.join(sorted(installed)) or 'none'})"
                    ),
                )
            )
        for ep in sorted(found, key=lambda e: e.name):
            override = cfg.plugins.get(ep.name)
            if override is not None and not override.enabled:
                continue
            where = (
                f"hooks.plugins.{ep.name}"
                if override is not None
                else f"entry point {ENTRY_POINT_GROUP}:{ep.name}"
            )
            try:
                loaded = ep.load()
            except Exception as exc:  # noqa: BLE001 - reported as a config problem
                problems.append((where, f"cannot load {ep.value!r}: {type(exc).__name__}: {exc}"))
                continue
            members = list(loaded) if isinstance(loaded, (list, tuple)) else [loaded]
            for member in members:
                spec: HookSpec | None = getattr(member, "__runyard_hook__", None)
                events = (
                    override.events
                    if override is not None and override.events is not None
                    else (spec.events if spec else ())
                )
                if not events:
                    problems.append(
                        (
                            where,
                            (
                                f"{ep.value} declares no events: decorate it with "
                                f"runyard.common.hooks.hook(...) or set hooks.plugins.{ep.name}.events"
                            ),
                        )
                    )
                    continue
                timeout = (
                    override.timeout_ms
                    if override is not None and override.timeout_ms is not None
                    else (spec.timeout_ms if spec and spec.timeout_ms is not None else cfg.default_timeout_ms)
                )
                label = (
                    ep.name
                    if len(members) == 1
                    else f"{ep.name}:{getattr(member, '__name__', len(handlers))}"
                )
                if spec is not None and spec.name and len(members) == 1:
                    label = spec.name
                add(label, member, events, timeout, where)
    elif cfg.plugins:
        problems.append(("hooks.plugins", "entry-point plugins are off (hooks.entry_points = false)"))

    for index, item in enumerate(cfg.handlers):
        where = f"hooks.handlers.{index}.path"
        try:
            func = _import_path(item.path)
        except Exception as exc:  # noqa: BLE001 - reported as a config problem
            problems.append((where, f"cannot import {item.path!r}: {type(exc).__name__}: {exc}"))
            continue
        add(item.name or item.path, func, item.events, item.timeout_ms, where)

    if problems:
        raise ConfigError(problems)
    return handlers


# ---------------------------------------------------------------- running


class HookRunner:
    """Delivers events to handlers (one queue and task per handler).

    Args:
        handlers: from :func:`load_handlers`.
        queue_size: events waiting per handler before new ones are dropped.
    """

    def __init__(self, handlers: Sequence[Handler], *, queue_size: int = 10_000):
        self.handlers = list(handlers)
        self.queue_size = queue_size
        self._tasks: list[asyncio.Task[None]] = []
        self._by_type: dict[str, list[Handler]] = {}
        for handler in self.handlers:
            for event_type in handler.events:
                self._by_type.setdefault(event_type, []).append(handler)

    def start(self) -> None:
        """Start one delivery task per handler (needs a running loop)."""
        for handler in self.handlers:
            self._tasks.append(asyncio.create_task(handler.run(), name=f"hook-{handler.name}"))

    def dispatch(self, events: Iterable[common_pb2.LifecycleEvent]) -> None:
        """Queue committed events for their handlers (never blocks)."""
        for message in events:
            targets = self._by_type.get(message.type)
            if not targets:
                continue
            event = from_proto(message)
            for handler in targets:
                handler.offer(event, self.queue_size)

    async def drain(self, timeout_s: float) -> list[Handler]:
        """Wait, at most ``timeout_s`` in total, for every queue to empty.

        Returns the handlers that did not finish; each is logged and counted
        in ``runyard_drain_timed_out_handlers_total{hook}``.
        """
        pending = [h for h in self.handlers if not h.idle]
        if pending:
            waits = [asyncio.ensure_future(h.wait_idle()) for h in pending]
            _, not_done = await asyncio.wait(waits, timeout=max(timeout_s, 0))
            for wait in not_done:
                wait.cancel()
        late = [h for h in self.handlers if not h.idle]
        for handler in late:
            metrics.DRAIN_TIMED_OUT_HANDLERS_TOTAL.labels(handler.name).inc()
            log.warning(
                "hook %s did not finish within the drain bound (%.0f ms): %d event(s) not delivered (%s)",
                handler.name,
                timeout_s * 1000,
                len(handler.queue) + (1 if handler.busy else 0),
                handler.origin,
            )
        return late

    @property
    def stuck(self) -> int:
        """Handler calls cancelled (timeout or :meth:`close`) that have not stopped."""
        return sum(len(h.stuck) for h in self.handlers)

    async def close(self) -> None:
        """Stop the delivery tasks (queued events are dropped)."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=0.5)
        self._tasks.clear()
