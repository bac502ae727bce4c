"""A real worker against a gateway or a router of a test's own (no tests
here): a running Worker, or one run of a RunExecutor."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from runyard._proto.v1 import common_pb2, router_pb2_grpc, sessions_pb2, sessions_pb2_grpc
from runyard.common.clients import InternalChannels
from runyard.common.config import Config
from runyard.worker.main import Worker
from runyard.worker.runner import RunExecutor, RunOutcome
from tests.support import serving

__all__ = ["execute_run", "running_worker"]


@contextlib.asynccontextmanager
async def running_worker(
    gateway_address: str, settings: dict[str, Any] | None = None
) -> AsyncIterator[tuple[Worker, asyncio.Task[None]]]:
    """A real :class:`Worker` running (``Worker.run``) against the hub at
    ``gateway_address``, with ``settings`` as its ``[worker]`` table; the
    sessions service and the router are unreachable (a run it takes is
    handed back). Yields the worker and its task; on exit the task is
    cancelled and the worker closed, even when the test fails."""
    config = Config.model_validate(
        {
            "endpoints": {
                "gateway_internal": gateway_address,
                "sessions": "127.0.0.1:1",
                "router": "127.0.0.1:1",
            },
            "worker": settings or {},
        }
    )
    worker = Worker(config, InternalChannels(None, ""), worker_id="worker-1")
    task = asyncio.create_task(worker.run())
    try:
        yield worker, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.aclose()


async def execute_run(
    router: router_pb2_grpc.RouterServiceServicer, config: dict[str, Any] | None = None
) -> tuple[RunOutcome, list[common_pb2.RunEvent]]:
    """One run ("hi", agent ``default``, an empty transcript) executed by a
    real :class:`RunExecutor` whose router is ``router`` on real gRPC (the
    sessions service is unreachable): its outcome and the events it emitted.
    ``config`` is the worker's configuration tree (defaults otherwise)."""
    async with serving(router_pb2_grpc.add_RouterServiceServicer_to_server, router) as address:
        channel = grpc.aio.insecure_channel(address)
        unreachable = grpc.aio.insecure_channel("127.0.0.1:1")
        try:
            executor = RunExecutor(
                Config.model_validate(config or {}),
                "worker-1",
                sessions_pb2_grpc.SessionServiceStub(unreachable),
                router_pb2_grpc.RouterServiceStub(channel),
            )
            session_id = str(uuid.uuid4())
            payload = common_pb2.RunPayload(
                run_id=str(uuid.uuid4()),
                org_id="org",
                session_id=session_id,
                agent_id="default",
                run_token="t",
                input=common_pb2.RunInput(text="hi"),
            )
            events: list[common_pb2.RunEvent] = []
            outcome = await executor.execute(
                payload, events.append, transcript=sessions_pb2.GetTranscriptResponse(session_id=session_id)
            )
            return outcome, events
        finally:
            await channel.close()
            await unreachable.close()
