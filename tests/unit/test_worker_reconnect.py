"""How the worker stays connected to its gateway (Worker.run), against a hub
of our own on real gRPC: a gateway that refuses the worker is retried with a
growing backoff; once a gateway has welcomed the worker, the backoff starts
afresh and a lost connection is retried at once; shutdown ends a backoff."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from runyard._proto.v1 import worker_hub_pb2, worker_hub_pb2_grpc
from runyard.worker.main import Worker
from tests.support import serving
from tests.support.worker import running_worker

pytestmark = pytest.mark.timeout(30)


class _Gateway(worker_hub_pb2_grpc.WorkerHubServiceServicer):
    """Refuses the first ``refuse`` calls (UNAVAILABLE, as a draining
    gateway does), then welcomes the worker and ends the stream after
    ``keep_s`` seconds. Records when each call arrived."""

    def __init__(self, refuse: int, keep_s: float = 0.0):
        self.refuse = refuse
        self.keep_s = keep_s
        self.calls: list[float] = []
        self.welcomed = asyncio.Event()
        self.called = asyncio.Event()

    async def wait_calls(self, count: int) -> None:
        """Until the worker has called ``count`` times (10 s at most)."""
        async with asyncio.timeout(10):
            while len(self.calls) < count:
                self.called.clear()
                await self.called.wait()

    async def Connect(  # noqa: N802 - the gRPC method's name
        self,
        request_iterator: AsyncIterator[worker_hub_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[worker_hub_pb2.ConnectResponse]:
        self.calls.append(time.monotonic())
        self.called.set()
        if len(self.calls) <= self.refuse:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        await anext(aiter(request_iterator))  # the hello
        yield worker_hub_pb2.ConnectResponse(
            welcome=worker_hub_pb2.HubWelcome(gateway_id="gw", heartbeat_interval_ms=60_000, lease_ms=60_000)
        )
        self.welcomed.set()
        await asyncio.sleep(self.keep_s)


@contextlib.asynccontextmanager
async def _running(
    gateway: _Gateway, initial_ms: int, max_ms: int
) -> AsyncIterator[tuple[Worker, asyncio.Task[None]]]:
    """A real worker running against ``gateway`` with the given backoff."""
    backoff = {"reconnect_initial_ms": initial_ms, "reconnect_max_ms": max_ms}
    async with (
        serving(worker_hub_pb2_grpc.add_WorkerHubServiceServicer_to_server, gateway) as address,
        running_worker(address, backoff) as running,
    ):
        yield running


async def test_a_refusing_gateway_is_retried_with_a_growing_backoff_until_it_welcomes():
    gateway = _Gateway(refuse=4, keep_s=60)
    async with _running(gateway, initial_ms=50, max_ms=10_000) as (worker, _):
        await asyncio.wait_for(worker.connected.wait(), 15)
        gaps = [later - earlier for earlier, later in zip(gateway.calls, gateway.calls[1:], strict=False)]
        assert len(gaps) == 4
        # initial * 2**n plus up to `initial` of jitter: 50, 100, 200, 400 ms at least.
        for n, gap in enumerate(gaps):
            assert gap >= 0.05 * 2**n * 0.95, gaps


async def test_after_a_welcome_a_lost_connection_is_retried_at_once():
    # A backoff of 3 s or more would show; a welcomed connection resets it.
    gateway = _Gateway(refuse=0, keep_s=0.05)
    async with _running(gateway, initial_ms=3_000, max_ms=10_000):
        await gateway.wait_calls(4)
        gaps = [later - earlier for earlier, later in zip(gateway.calls, gateway.calls[1:], strict=False)]
        assert max(gaps) < 1.5, gaps


async def test_shutdown_ends_a_backoff_at_once():
    gateway = _Gateway(refuse=1_000)
    async with _running(gateway, initial_ms=20_000, max_ms=60_000) as (worker, running):
        await gateway.wait_calls(1)
        await asyncio.sleep(0.2)  # now in a backoff of 20 s or more
        started = time.monotonic()
        await worker.shutdown(grace_s=0)
        await asyncio.wait_for(running, 5)
        assert time.monotonic() - started < 2
        assert len(gateway.calls) == 1
