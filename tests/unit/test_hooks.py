"""In-process hooks: loading and validation, typed events, per-handler
timeouts and errors, the bounded drain."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import REGISTRY

from runyard._proto.v1 import common_pb2
from runyard.common.config import ConfigError, load_config
from runyard.common.hooks import (
    Handler,
    HookRunner,
    ServiceEvent,
    SessionEnd,
    SessionStart,
    from_proto,
    hook,
    load_handlers,
)
from runyard.common.protoutil import now
from tests.stack import INTERNAL_SECRET, RUN_TOKEN_PUBLIC_KEY
from tests.support import ROOT

pytestmark = pytest.mark.timeout(30)

RECEIVED: list[object] = []


# Handlers named by dotted path in the tests below.
async def record(event: object) -> None:
    RECEIVED.append(event)


@hook("session.end", timeout_ms=250, name="decorated")
def decorated(event: object) -> None:
    RECEIVED.append(("decorated", event))


@hook("session.start")
async def plugin_start(event: object) -> None:
    RECEIVED.append(("plugin_start", event))


def undecorated(event: object) -> None:
    RECEIVED.append(event)


NOT_CALLABLE = 42


def end_event(
    session: str = "s1", reason: int = common_pb2.SESSION_END_REASON_SHUTDOWN
) -> common_pb2.LifecycleEvent:
    return common_pb2.LifecycleEvent(
        type="session.end",
        time=now(),
        org_id="org",
        session_id=session,
        session_key=f"key:{session}",
        agent_id="agent",
        source="sessions-1",
        session_end=common_pb2.SessionEndData(reason=reason, message_count=4, duration_ms=1500),
    )


def start_event(session: str = "s1") -> common_pb2.LifecycleEvent:
    return common_pb2.LifecycleEvent(
        type="session.start",
        time=now(),
        org_id="org",
        session_id=session,
        session_key=f"key:{session}",
        session_start=common_pb2.SessionStartData(
            reason=common_pb2.SESSION_START_REASON_RESUMED, resumed_from_session_id="s0"
        ),
    )


def errors(hook_name: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value("runyard_hook_errors_total", {"hook": hook_name, "reason": reason}) or 0.0
    )


def config_with(handlers: list[dict], **hooks: object):
    import json

    env = {"RUNYARD_HOOKS__HANDLERS": json.dumps(handlers), "RUNYARD_HOOKS__ENTRY_POINTS": "false"}
    for name, value in hooks.items():
        env[f"RUNYARD_HOOKS__{name.upper()}"] = (
            json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        )
    return load_config(environ=env)


def entry_point(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group="runyard.plugins")


# ---------------------------------------------------------------- typed events


def test_events_are_typed_dataclasses_not_dicts():
    end = from_proto(end_event())
    assert isinstance(end, SessionEnd)
    assert (end.reason, end.message_count, end.duration_ms, end.session_key) == (
        "SHUTDOWN",
        4,
        1500,
        "key:s1",
    )
    assert end.time.tzinfo is not None
    start = from_proto(start_event())
    assert isinstance(start, SessionStart) and (start.reason, start.resumed_from_session_id) == (
        "RESUMED",
        "s0",
    )
    service = from_proto(
        common_pb2.LifecycleEvent(
            type="service.shutdown",
            time=now(),
            service=common_pb2.ServiceLifecycleData(service="sessions", mode="restart"),
        )
    )
    assert isinstance(service, ServiceEvent) and service.mode == "restart"
    with pytest.raises(AttributeError):
        end.reason = "x"  # type: ignore[misc]  # frozen


# ---------------------------------------------------------------- loading and validation


def test_dotted_paths_and_entry_points_load_with_their_events_and_timeouts():
    config = load_config(
        environ={
            "RUNYARD_HOOKS__HANDLERS": '[{"path": "tests.unit.test_hooks:record", "events": ["session.end"], '
            '"timeout_ms": 1500}, {"path": "tests.unit.test_hooks.undecorated", '
            '"events": ["session.start", "session.end"], "name": "plain"}]',
            "RUNYARD_HOOKS__PLUGINS": '{"bare": {"events": ["service.shutdown"], "timeout_ms": 40}}',
        }
    )
    handlers = load_handlers(
        config,
        entry_points=[
            entry_point("memory", "tests.unit.test_hooks:decorated"),
            entry_point("starts", "tests.unit.test_hooks:plugin_start"),
            entry_point("bare", "tests.unit.test_hooks:undecorated"),
        ],
    )
    summary = {h.name: (sorted(h.events), h.timeout_s, h.is_async) for h in handlers}
    assert summary == {
        "bare": (["service.shutdown"], 0.04, False),
        "decorated": (["session.end"], 0.25, False),
        "starts": (["session.start"], 1.0, True),
        "tests.unit.test_hooks:record": (["session.end"], 1.5, True),
        "plain": (["session.end", "session.start"], 1.0, False),
    }


@pytest.mark.parametrize(
    ("handlers", "path", "fragment"),
    [
        (
            [{"path": "no_such_module_xyz:f", "events": ["session.end"]}],
            "hooks.handlers.0.path",
            "cannot import",
        ),
        (
            [{"path": "tests.unit.test_hooks:missing", "events": ["session.end"]}],
            "hooks.handlers.0.path",
            "AttributeError",
        ),
        (
            [{"path": "tests.unit.test_hooks:NOT_CALLABLE", "events": ["session.end"]}],
            "hooks.handlers.0.path",
            "not callable",
        ),
        (
            [
                {"path": "tests.unit.test_hooks:record", "events": ["session.end"]},
                {"path": "tests.unit.test_hooks:record", "events": ["session.start"]},
            ],
            "hooks.handlers.1.path",
            "already configured",
        ),
    ],
)
def test_bad_handlers_are_refused_naming_the_config_path(handlers, path, fragment):
    with pytest.raises(ConfigError) as error:
        load_handlers(config_with(handlers))
    assert [p for p, _ in error.value.problems] == [path]
    assert fragment in str(error.value)


@pytest.mark.parametrize(
    ("handler", "path", "fragment"),
    [
        (
            {"path": "tests.unit.test_hooks:record", "events": ["session.ended"]},
            "hooks.handlers.0.events",
            "unknown event name 'session.ended'",
        ),
        (
            {"path": "tests.unit.test_hooks:record", "events": ["run.completed"]},
            "hooks.handlers.0.events",
            "WatchEvents",
        ),
        ({"path": "tests.unit.test_hooks:record", "events": []}, "hooks.handlers.0.events", "at least one"),
        (
            {"path": "tests.unit.test_hooks:record", "events": ["session.end"], "timeout_ms": 0},
            "hooks.handlers.0.timeout_ms",
            "greater than or equal to 1",
        ),
        (
            {"path": "tests.unit.test_hooks:record", "events": ["session.end"], "timeout_ms": "soon"},
            "hooks.handlers.0.timeout_ms",
            "integer",
        ),
        (
            {"path": "not a path", "events": ["session.end"]},
            "hooks.handlers.0.path",
            "package.module:function",
        ),
    ],
)
def test_bad_hook_settings_fail_config_validation_with_their_path(handler, path, fragment):
    with pytest.raises(ConfigError) as error:
        config_with([handler])
    assert path in [p for p, _ in error.value.problems]
    assert fragment in str(error.value)


def test_bad_entry_points_are_refused():
    config = load_config(environ={"RUNYARD_HOOKS__PLUGINS": '{"ghost": {"enabled": false}}'})
    with pytest.raises(ConfigError) as error:
        load_handlers(
            config,
            entry_points=[
                entry_point("broken", "no_such_module_xyz:thing"),
                entry_point("quiet", "tests.unit.test_hooks:undecorated"),
                entry_point("fine", "tests.unit.test_hooks:decorated"),
            ],
        )
    problems = dict(error.value.problems)
    assert set(problems) == {
        "hooks.plugins.ghost",
        "entry point runyard.plugins:broken",
        "entry point runyard.plugins:quiet",
    }
    assert "no installed plugin 'ghost'" in problems["hooks.plugins.ghost"]
    assert "declares no events" in problems["entry point runyard.plugins:quiet"]
    disabled = load_config(environ={"RUNYARD_HOOKS__PLUGINS": '{"broken": {"enabled": false}}'})
    assert [
        h.name
        for h in load_handlers(
            disabled,
            entry_points=[
                entry_point("broken", "no_such_module_xyz:thing"),
                entry_point("fine", "tests.unit.test_hooks:decorated"),
            ],
        )
    ] == ["decorated"]


def test_the_service_refuses_to_start_with_a_bad_hook_and_names_the_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
    env.update(
        {
            "RUNYARD_DATABASE_URL": "postgresql://127.0.0.1:1/none",
            "RUNYARD_INTERNAL_SECRET": INTERNAL_SECRET,
            "RUNYARD_RUN_TOKEN_PUBLIC_KEY": RUN_TOKEN_PUBLIC_KEY,
            "RUNYARD_HOOKS__HANDLERS": '[{"path": "no_such_module_xyz:on_end", "events": ["session.end"]}]',
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "runyard", "serve", "sessions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "hooks.handlers.0.path: cannot import 'no_such_module_xyz:on_end'" in result.stderr


# ---------------------------------------------------------------- running


async def test_handlers_get_their_events_in_order_and_failures_stay_contained():
    got: list[tuple[str, str]] = []
    calls: list[str] = []

    async def good(event):
        got.append((event.type, event.session_id))

    def sync_good(event):
        calls.append(threading.current_thread().name)

    async def raises(event):
        raise RuntimeError("boom")

    async def slow(event):
        await asyncio.sleep(10)

    handlers = [
        Handler("t-good", good, ["session.start", "session.end"], 1.0),
        Handler("t-sync", sync_good, ["session.end"], 1.0),
        Handler("t-raises", raises, ["session.end"], 1.0),
        Handler("t-slow", slow, ["session.end"], 0.05),
    ]
    runner = HookRunner(handlers)
    runner.start()
    before = (errors("t-raises", "exception"), errors("t-slow", "timeout"))
    runner.dispatch([start_event("a"), end_event("a"), end_event("b"), end_event("c")])
    assert await runner.drain(5.0) == []
    assert got == [("session.start", "a"), ("session.end", "a"), ("session.end", "b"), ("session.end", "c")]
    assert calls == ["hook-t-sync"] * 3
    assert errors("t-raises", "exception") - before[0] == 3
    assert errors("t-slow", "timeout") - before[1] == 3
    await runner.close()


async def test_drain_is_bounded_even_with_handlers_that_never_return():
    release = threading.Event()

    def blocks_forever(event):
        release.wait()

    async def never(event):
        await asyncio.Event().wait()

    give_up = threading.Event()

    async def ignores_cancel(event):
        while not give_up.is_set():  # swallows cancellation until the test ends
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                continue

    done: list[str] = []

    async def quick(event):
        done.append(event.session_id)

    handlers = [
        Handler("d-sync-forever", blocks_forever, ["session.end"], 60.0),
        Handler("d-never", never, ["session.end"], 60.0),
        Handler("d-stubborn", ignores_cancel, ["session.end"], 0.05),
        Handler("d-quick", quick, ["session.end"], 1.0),
    ]
    runner = HookRunner(handlers)
    runner.start()
    runner.dispatch([end_event(f"s{i}") for i in range(50)])
    started = time.monotonic()
    late = await runner.drain(0.3)
    elapsed = time.monotonic() - started
    assert 0.25 <= elapsed < 1.5  # the 0.3 s bound, not the handlers that never return
    assert sorted(h.name for h in late) == ["d-never", "d-stubborn", "d-sync-forever"]
    assert len(done) == 50
    timed_out = REGISTRY.get_sample_value("runyard_drain_timed_out_handlers_total", {"hook": "d-never"})
    assert timed_out == 1.0
    assert runner.stuck >= 1  # the stubborn call is reported, not awaited
    close_started = time.monotonic()
    await runner.close()
    assert time.monotonic() - close_started < 2.0
    release.set()
    give_up.set()
    await asyncio.sleep(0.1)


async def test_a_call_cut_off_by_close_that_ignores_cancellation_is_reported_as_stuck():
    # Its own timeout is far beyond the drain bound, so only close() cancels
    # it; the service must then know not to wait for it (asyncio.run would).
    give_up = threading.Event()

    async def stubborn(event):
        while not give_up.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                continue

    runner = HookRunner([Handler("c-stubborn", stubborn, ["session.end"], 60.0)])
    runner.start()
    runner.dispatch([end_event()])
    assert [h.name for h in await runner.drain(0.1)] == ["c-stubborn"]
    await runner.close()
    await asyncio.sleep(0.1)
    assert runner.stuck == 1
    give_up.set()
    await asyncio.sleep(0.1)
    assert runner.stuck == 0


async def test_a_full_queue_drops_and_counts_instead_of_growing():
    gate = asyncio.Event()

    async def blocked(event):
        await gate.wait()

    runner = HookRunner([Handler("q-blocked", blocked, ["session.end"], 30.0)], queue_size=5)
    runner.start()
    before = errors("q-blocked", "overflow")
    runner.dispatch([end_event(f"s{i}") for i in range(3)])
    await asyncio.sleep(0.05)  # the first event is being handled
    runner.dispatch([end_event(f"t{i}") for i in range(10)])
    # One event is being handled and two wait: three more fit, seven are dropped.
    assert errors("q-blocked", "overflow") - before == 7
    gate.set()
    assert await runner.drain(2.0) == []
    await runner.close()
