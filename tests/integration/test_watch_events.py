"""WatchEvents: replay then live, scoped and resumable across gateway and
sessions restarts without a gap or a repeat (DESIGN.md section 6)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter

import grpc
import pytest

from runyard._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from runyard.common.errors import from_rpc_error
from tests.fakes.openai_server import FakeOpenAI, provider_config

pytestmark = pytest.mark.timeout(120)


async def read_events(
    stack,
    after_id: int = 0,
    types: tuple[str, ...] = (),
    *,
    until: int | None = None,
    quiet_s: float = 1.5,
    timeout_s: float = 20.0,
) -> list[common_pb2.LifecycleEvent]:
    """Events after ``after_id``: until ``until`` events arrived, else until none came for ``quiet_s``."""
    channel = grpc.aio.insecure_channel(stack.gateway_address)
    stub = gateway_pb2_grpc.GatewayServiceStub(channel)
    call = stub.WatchEvents(gateway_pb2.WatchEventsRequest(after_id=after_id, types=list(types)))
    events: list[common_pb2.LifecycleEvent] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and (until is None or len(events) < until):
            try:
                event = await asyncio.wait_for(
                    call.read(), quiet_s if until is None else deadline - time.monotonic()
                )
            except TimeoutError:
                break
            if event is grpc.aio.EOF:
                break
            events.append(event)
    finally:
        call.cancel()
        await channel.close()
    return events


async def interrupt(process: asyncio.subprocess.Process, timeout_s: float = 30.0) -> tuple[bytes, bytes]:
    """Ctrl-C (SIGINT) ``process`` and collect the rest of its output; waits up
    to ``timeout_s`` (a loaded machine can be slow to wind down), then kills it
    and fails with what it printed on stderr."""
    process.send_signal(signal.SIGINT)
    try:
        return await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        _, err = await process.communicate()
        raise AssertionError(
            f"no exit within {timeout_s:g} s of SIGINT; stderr:\n{err.decode()[-2000:]}"
        ) from None


def types_of(events) -> Counter:
    return Counter(e.type for e in events)


async def test_watch_replays_then_tails_and_resumes_across_gateway_and_sessions_restarts(
    stack_factory, fake_openai: FakeOpenAI
):
    stack = await stack_factory(provider_config(fake_openai)).start()
    # `runyard events --follow` follows the same stream through both restarts.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runyard",
        "events",
        "--follow",
        "--json",
        "--gateway",
        stack.gateway_address,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        live_task = asyncio.create_task(read_events(stack, until=8, timeout_s=30))
        await asyncio.sleep(0.5)  # the watcher is tailing before anything happens
        async with stack.client() as client:
            first = [e async for e in client.send("watch:1", "hello there")]
        live = await live_task
        run_id, session_id = first[0].run_id, first[0].session_id

        assert [e.id for e in live] == sorted({e.id for e in live})  # increasing, no repeats
        assert types_of(live) == {
            name: 1
            for name in (
                "service.startup",
                "session.start",
                "run.queued",
                "message.received",
                "run.started",
                "session.updated",
                "run.completed",
                "message.sent",
            )
        }
        completed = next(e for e in live if e.type == "run.completed")
        assert (completed.run_id, completed.session_id, completed.session_key) == (
            run_id,
            session_id,
            "watch:1",
        )
        assert (
            completed.run.status == common_pb2.RUN_STATUS_COMPLETED and completed.run.model == "fake/model-a"
        )
        sent = next(e for e in live if e.type == "message.sent")
        assert sent.message.length == len("Hello from model-a.")
        last_seen = live[-1].id

        # Both services restart; the sessions drain writes session.end SHUTDOWN
        # while the gateway is down. Then the conversation goes on.
        await stack.stop("gateway", signal.SIGTERM)
        await stack.stop("sessions", signal.SIGTERM)
        await stack.start_service("sessions")
        await stack.start_service("gateway")
        async with stack.client() as client:
            second = [e async for e in client.send("watch:1", "still there?")]
        assert second[-1].HasField("completed")

        everything = await read_events(stack, 0)
        ids = [e.id for e in everything]
        # A relayed event may land between the two reads; compare up to the first read's end.
        resumed = [e for e in await read_events(stack, last_seen) if e.id <= ids[-1]]
        assert ids == sorted(set(ids)), "ids repeat or go backwards"
        assert [e.SerializeToString() for e in resumed] == [
            e.SerializeToString() for e in everything if e.id > last_seen
        ]
        assert [e.SerializeToString() for e in everything if e.id <= last_seen] == [
            e.SerializeToString() for e in live
        ]
        later = types_of(resumed)
        assert later["session.end"] == 1 and later["service.shutdown"] == 1 and later["service.startup"] == 1
        end = next(e for e in resumed if e.type == "session.end")
        assert (
            end.session_end.reason == common_pb2.SESSION_END_REASON_SHUTDOWN and end.session_id == session_id
        )
        restart = next(e for e in resumed if e.type == "session.start")
        assert restart.session_start.reason == common_pb2.SESSION_START_REASON_RESUMED
        assert later["run.completed"] == 1 and later["run.queued"] == 1

        # Let the follower print up to the last event read above, then stop it.
        printed: list[dict] = []

        async def caught_up() -> None:
            assert follower.stdout is not None
            while not printed or int(printed[-1]["id"]) < ids[-1]:
                line = await follower.stdout.readline()
                if not line:
                    return
                printed.append(json.loads(line))

        with contextlib.suppress(TimeoutError):  # the assertion below reports what it printed
            await asyncio.wait_for(caught_up(), 30)
        out, err = await interrupt(follower)
        printed += [json.loads(line) for line in out.decode().splitlines()]
        assert [int(e["id"]) for e in printed][: len(ids)] == ids, err.decode()[-2000:]
        assert "resuming after" in err.decode()  # it did lose the gateway, and resumed

        # A filter by type, from the start.
        only_ends = await read_events(stack, 0, ("session.end", "run.failed"))
        assert [e.type for e in only_ends] == ["session.end"]
    finally:
        # Never left running: a stray follower fails later tests (ResourceWarnings).
        if follower.returncode is None:
            follower.kill()
            await follower.communicate()  # reaps it and reads its pipes to the end


async def test_unknown_event_types_are_refused(stack_factory):
    stack = stack_factory()
    await stack.start_service("sessions")
    await stack.start_service("gateway")
    channel = grpc.aio.insecure_channel(stack.gateway_address)
    call = gateway_pb2_grpc.GatewayServiceStub(channel).WatchEvents(
        gateway_pb2.WatchEventsRequest(types=["session.ended"])
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call.read()
    await channel.close()
    refused = from_rpc_error(error.value)
    assert (refused.code, refused.reason, refused.field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "UNKNOWN_EVENT_TYPE",
        "types",
    )


async def test_a_new_sessions_start_comes_before_its_first_run_in_the_stream(
    stack_factory, fake_openai: FakeOpenAI
):
    """The sessions service's session.start of a conversation's first message is
    recorded with the run it starts (ResolveSession hands it to the gateway),
    so `runyard events --follow` shows it before that run's run.queued, and the
    relay, catching up later, does not copy it a second time."""
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        for n in range(3):
            [e async for e in client.send(f"order:{n}", "hello")]
    kinds = ("session.start", "run.queued", "run.completed")
    events = await read_events(stack, 0, kinds, until=9)
    await asyncio.sleep(1.0)  # the relay's rounds (every 250 ms at most) have run by now
    again = await read_events(stack, 0, kinds)
    assert [e.id for e in again] == [e.id for e in events]  # nothing copied twice
    for n in range(3):
        mine = [e.type for e in events if e.session_key == f"order:{n}"]
        assert mine == ["session.start", "run.queued", "run.completed"], mine
