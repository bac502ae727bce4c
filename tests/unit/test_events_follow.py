"""`runyard events --follow` (runyard.cli.events_commands.watch) against a
gateway of our own on real gRPC: it resumes after the last event it
printed when the gateway goes away, backs off while it stays away, and
gives up after ``max_reconnect_s`` of one outage."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from runyard._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from runyard.cli.events_commands import watch
from runyard.client import Client
from tests.support import serving

pytestmark = pytest.mark.timeout(30)


class _Gateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Plays ``script``, one entry per WatchEvents call: a list of event ids
    to send before failing with UNAVAILABLE, or "refuse" (UNAVAILABLE at
    once), or "end" (the stream ends). Calls past the script are refused."""

    def __init__(self, script: list[list[int] | str]):
        self.script = script
        self.calls: list[tuple[float, int]] = []  # (when, after_id)

    async def WatchEvents(  # noqa: N802 - the gRPC method's name
        self, request: gateway_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.LifecycleEvent]:
        self.calls.append((time.monotonic(), request.after_id))
        step = self.script[len(self.calls) - 1] if len(self.calls) <= len(self.script) else "refuse"
        if step == "end":
            return
        if step != "refuse":
            for event_id in step:
                yield common_pb2.LifecycleEvent(id=event_id, type="run.queued")
        await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway restarting")


async def _follow(gateway: _Gateway, max_reconnect_s: float = 30.0) -> tuple[int, list[int], str]:
    """Follow ``gateway``'s events: exit code, ids printed, what went to stderr."""
    out = io.StringIO()
    err = io.StringIO()
    async with (
        serving(gateway_pb2_grpc.add_GatewayServiceServicer_to_server, gateway) as address,
        Client(address) as client,
    ):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sys.stderr", err)
            code = await asyncio.wait_for(
                watch(client, as_json=True, out=out, max_reconnect_s=max_reconnect_s), 20
            )
    return code, [int(json.loads(line)["id"]) for line in out.getvalue().splitlines()], err.getvalue()


async def test_a_lost_gateway_is_followed_again_after_the_last_event_printed():
    gateway = _Gateway([[1, 2], "refuse", "refuse", [3], "end"])
    code, ids, err = await _follow(gateway)

    assert (code, ids) == (0, [1, 2, 3])
    assert [after for _, after in gateway.calls] == [0, 2, 2, 2, 3]
    # At once after events came through, then 0.2 and 0.4 s of backoff.
    gaps = [
        later - earlier for (earlier, _), (later, _) in zip(gateway.calls, gateway.calls[1:], strict=False)
    ]
    assert gaps[0] < 0.15 and gaps[1] >= 0.19 and gaps[2] >= 0.39, gaps
    assert "resuming after 2" in err and "resuming after 3" in err


async def test_an_outage_longer_than_max_reconnect_s_ends_the_follow():
    gateway = _Gateway([[1]])  # then refused for good
    started = time.monotonic()
    code, ids, err = await _follow(gateway, max_reconnect_s=1.0)

    assert (code, ids) == (1, [1])
    assert time.monotonic() - started < 3
    assert 3 <= len(gateway.calls) <= 6
    assert "UNAVAILABLE" in err
