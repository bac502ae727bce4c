"""The one service lifecycle (runyard.common.lifecycle), in process on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
from grpc_health.v1 import health_pb2

from runyard.common import lifecycle
from runyard.common.config import Config, load_config
from runyard.common.lifecycle import Build, Service, run_service, server_settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

#: A router on a free loopback port, no metrics port.
CONFIG = load_config(environ={"RUNYARD_ROUTER__LISTEN": "127.0.0.1:0", "RUNYARD_ROUTER__METRICS_PORT": "0"})


@pytest.fixture(autouse=True)
def _unfreeze() -> Iterator[None]:
    """run_service freezes the objects of the process it runs in: here, the test run's."""
    try:
        yield
    finally:
        gc.unfreeze()


def recorder(steps: list[str], name: str):
    async def step() -> None:
        steps.append(name)

    return step


async def test_a_stop_drains_then_closes_in_reverse_order():
    steps: list[str] = []

    async def build(service: Service) -> None:
        service.on_close(recorder(steps, "close database"))
        service.on_exit(lambda error: steps.append(f"exit {error!r}"))
        server = service.serve([])
        service.on_close(recorder(steps, "close part"))

        async def serving() -> None:
            steps.append(f"serving {server.health.overall == SERVING}")
            server.stop_requested.set()  # what SIGTERM does

        async def drain() -> None:
            steps.append(f"drain {server.health.overall == NOT_SERVING} {server.interceptor.draining}")

        service.on_serving(serving)
        service.on_drain(drain)

    await run_service("router", CONFIG, build, tls=None)
    assert steps == ["serving True", "drain True True", "close part", "exit None", "close database"]


async def test_what_start_up_made_is_frozen_out_of_full_collections_while_serving():
    gc.unfreeze()
    frozen: list[int] = []

    async def build(service: Service) -> None:
        server = service.serve([])

        async def serving() -> None:
            server.stop_requested.set()

        async def drain() -> None:
            frozen.append(gc.get_freeze_count())

        service.on_serving(serving)
        service.on_drain(drain)

    await run_service("router", CONFIG, build, tls=None)
    # Every object alive once the service serves (this test process's included)
    # is left out of the collections made while it serves.
    assert frozen and frozen[0] > 10_000


async def test_a_failed_start_closes_what_had_started_and_re_raises(caplog):
    steps: list[str] = []

    async def build(service: Service) -> None:
        service.on_exit(lambda error: steps.append(f"exit {type(error).__name__}"))
        service.on_close(recorder(steps, "close database"))
        service.task(never(), name="background", stop=stop_task(steps))
        raise RuntimeError("migration failed")

    async def never() -> None:
        await asyncio.Event().wait()

    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="migration failed"):
        await run_service("router", CONFIG, build, tls=None)
    assert steps == ["stop background", "close database", "exit RuntimeError"]
    assert "router failed to start (RuntimeError); closing what had started" in caplog.text


def stop_task(steps: list[str]):
    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        steps.append(f"stop {task.get_name()}")

    return stop


async def test_a_close_that_raises_does_not_keep_the_others_from_running():
    steps: list[str] = []

    async def build(service: Service) -> None:
        service.on_close(recorder(steps, "close database"))

        async def broken() -> None:
            raise OSError("channel already gone")

        service.on_close(broken)
        server = service.serve([])

        async def serving() -> None:
            server.stop_requested.set()

        service.on_serving(serving)

    with pytest.raises(OSError, match="channel already gone"):
        await run_service("router", CONFIG, build, tls=None)
    assert steps == ["close database"]


async def test_build_must_make_a_server():
    async def build(service: Service) -> None:
        return None

    with pytest.raises(RuntimeError, match="made no server"):
        await run_service("router", CONFIG, build, tls=None)


def test_an_unknown_service_name_is_refused():
    with pytest.raises(ValueError, match="unknown service 'nope'"):
        server_settings(CONFIG, "nope")


def _config(shutdown_grace_s: float) -> Config:
    """CONFIG with the router's ``shutdown_grace_s``."""
    return load_config(
        environ={
            "RUNYARD_ROUTER__LISTEN": "127.0.0.1:0",
            "RUNYARD_ROUTER__METRICS_PORT": "0",
            "RUNYARD_ROUTER__SHUTDOWN_GRACE_S": str(shutdown_grace_s),
        }
    )


def _stopped_once_serving(*closes: Callable[[], Awaitable[object]]) -> Build:
    """A build whose service registers ``closes`` and is told to stop
    (what SIGTERM does) as soon as it serves."""

    async def build(service: Service) -> None:
        server = service.serve([])
        for close in closes:
            service.on_close(close)

        async def serving() -> None:
            server.stop_requested.set()

        service.on_serving(serving)

    return build


async def test_a_stop_that_outlasts_its_grace_names_what_it_waits_on(caplog, monkeypatch):
    monkeypatch.setattr(lifecycle, "SLOW_STOP_MARGIN_S", 0.3)
    released = asyncio.Event()

    async def stuck_flush() -> None:
        await asyncio.wait_for(released.wait(), 2.0)  # a close that hangs (until the test lets it go)

    with caplog.at_level(logging.WARNING, logger="runyard.common.lifecycle"):
        with contextlib.suppress(TimeoutError):
            await run_service("router", _config(0.2), _stopped_once_serving(stuck_flush), tls=None)
    reports = [r.getMessage() for r in caplog.records if "still shutting down" in r.getMessage()]
    assert len(reports) == 1
    assert reports[0].startswith("router still shutting down after 0.5 s")  # grace + margin
    assert "stuck_flush (test_lifecycle.py:" in reports[0] and "wait_for" in reports[0]


async def test_a_stop_within_its_grace_reports_nothing(caplog, monkeypatch):
    monkeypatch.setattr(lifecycle, "SLOW_STOP_MARGIN_S", 0.3)

    with caplog.at_level(logging.WARNING, logger="runyard.common.lifecycle"):
        await run_service("router", CONFIG, _stopped_once_serving(), tls=None)
        await asyncio.sleep(0.5)  # past where a report of this stop would have come
    assert not [r for r in caplog.records if "still shutting down" in r.getMessage()]


async def test_a_stop_that_blocks_the_event_loop_still_shows_where(capfd, monkeypatch):
    """The report is a callback of the event loop; a close that blocks the
    loop (a busy loop, a blocking call) is shown by faulthandler's thread."""
    monkeypatch.setattr(lifecycle, "SLOW_STOP_MARGIN_S", 0.1)
    monkeypatch.setattr(lifecycle, "SLOW_STOP_DUMP_DELAY_S", 0.1)

    async def blocking_close() -> None:
        time.sleep(1.0)  # noqa: ASYNC251 - the point: the event loop cannot run meanwhile

    await run_service("router", _config(0), _stopped_once_serving(blocking_close), tls=None)
    err = capfd.readouterr().err
    assert "Timeout (0:00:00" in err and "in blocking_close" in err
