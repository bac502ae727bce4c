"""ServiceServer's AdminService and its metrics start-up, in process on loopback."""

from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

import runyard
from runyard._proto.v1 import admin_pb2, admin_pb2_grpc, gateway_pb2
from runyard.common import metrics
from runyard.common.auth import internal_metadata
from runyard.common.clients import internal_channel
from runyard.common.server import ServiceServer
from runyard.gateway.hub import RunState, WorkerConn
from runyard.gateway.status import GatewayStatus
from tests.stack import free_port

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


@pytest.fixture
async def served():
    servers: list[ServiceServer] = []
    channels: list[grpc.aio.Channel] = []

    async def start(
        name: str = "sessions", service_names: tuple[str, ...] = (), internal_secret: str = ""
    ) -> tuple[ServiceServer, grpc.aio.Channel]:
        server = ServiceServer(
            name, "127.0.0.1:0", service_names, shutdown_grace_s=0.5, internal_secret=internal_secret
        )
        servers.append(server)
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return server, channel

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(0)


async def test_status_reports_service_version_and_in_flight_rpcs(served):
    server, channel = await served("router")
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    reply = await stub.GetStatus(admin_pb2.GetStatusRequest())
    assert (reply.service, reply.version, reply.draining) == ("router", runyard.__version__, False)
    assert (reply.rpcs_in_flight, reply.streams_in_flight) == (0, 0)
    assert reply.started_at.seconds > 0
    assert not reply.HasField("gateway")

    # An open health Watch stream is an RPC (and a stream) in flight.
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    reply = await stub.GetStatus(admin_pb2.GetStatusRequest())
    assert (reply.rpcs_in_flight, reply.streams_in_flight) == (1, 1)
    watch.cancel()

    # While the server drains, AdminService still answers (and says so).
    await server.begin_shutdown()
    reply = await stub.GetStatus(admin_pb2.GetStatusRequest())
    assert reply.draining is True


async def test_status_requires_the_internal_secret_when_one_is_set(served):
    _, channel = await served(internal_secret="s" * 32)
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.GetStatus(admin_pb2.GetStatusRequest())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetStatus(admin_pb2.GetStatusRequest(), metadata=internal_metadata("wrong" * 8))
    reply = await stub.GetStatus(admin_pb2.GetStatusRequest(), metadata=internal_metadata("s" * 32))
    assert reply.service == "sessions"


class FakeStore:
    def __init__(self, depth: int):
        self.depth = depth

    async def queue_depth(self) -> int:
        return self.depth


class FakeDispatcher:
    def __init__(self, *workers: WorkerConn):
        self.workers = {w.worker_id: w for w in workers}


async def test_gateway_status_lists_workers_and_samples_the_queue(served):
    store = FakeStore(7)
    busy, draining = WorkerConn("w-b", 4), WorkerConn("w-a", 2)
    busy.runs[uuid.uuid4()] = RunState(1, "org", "session", "agent")
    busy.reserved = 1  # a claim in flight: a moment's state, not a busy slot
    draining.draining = True
    dispatcher = FakeDispatcher(busy, draining)
    server = ServiceServer("gateway", "127.0.0.1:0", [GATEWAY])
    source = GatewayStatus(store, dispatcher, sample_interval_s=0.05)
    server.admin.add_source(source)
    await server.start()
    try:
        # The background sampler keeps runyard_queue_depth current.
        for _ in range(100):
            if REGISTRY.get_sample_value("runyard_queue_depth") == 7:
                break
            await asyncio.sleep(0.01)
        assert REGISTRY.get_sample_value("runyard_queue_depth") == 7
        store.depth = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            reply = await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(admin_pb2.GetStatusRequest())
        assert reply.HasField("gateway")
        assert reply.gateway.queue_depth == 0
        workers = [(w.worker_id, w.capacity, w.running, w.free, w.draining) for w in reply.gateway.workers]
        assert workers == [("w-a", 2, 0, 0, True), ("w-b", 4, 1, 3, False)]
    finally:
        await server.stop(0)


async def test_start_creates_every_method_series_and_build_info(served):
    await served("gateway", (GATEWAY,))
    labels = {"grpc_type": "server_stream", "grpc_service": GATEWAY, "grpc_method": "SendMessage"}
    for code in metrics.GO_CODE_NAMES.values():
        assert (
            REGISTRY.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code}) is not None
        ), code
    assert REGISTRY.get_sample_value("grpc_server_started_total", labels) is not None
    assert REGISTRY.get_sample_value("grpc_server_handling_seconds_count", labels) is not None
    unary = {"grpc_type": "unary", "grpc_service": "runyard.v1.AdminService", "grpc_method": "GetStatus"}
    assert REGISTRY.get_sample_value("grpc_server_started_total", unary) is not None
    chat = {"grpc_type": "bidi_stream", "grpc_service": GATEWAY, "grpc_method": "Chat"}
    assert REGISTRY.get_sample_value("grpc_server_msg_received_total", chat) is not None
    assert (
        REGISTRY.get_sample_value(
            "runyard_build_info", {"version": runyard.__version__, "service": "gateway"}
        )
        == 1
    )
    assert REGISTRY.get_sample_value("runyard_runs_total", {"status": "failed"}) is not None


def test_no_metric_is_labelled_with_an_id():
    found = 0
    for value in vars(metrics).values():
        if isinstance(value, (metrics.Counter, metrics.Gauge, metrics.Histogram)):
            found += 1
            for label in value._labelnames:
                assert label != "id" and not label.endswith("_id"), (value, label)
    assert found >= 30


async def test_internal_channel_reaches_a_peer_soon_after_it_comes_up():
    """A call that failed because the peer was down does not leave the channel
    failing fast for gRPC's default reconnect backoff (1 s, growing to 120 s)."""
    port = free_port()
    channel = internal_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        server = ServiceServer("router", f"127.0.0.1:{port}", ())
        await server.start()
        try:
            started = asyncio.get_running_loop().time()
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    await asyncio.sleep(0.02)
            elapsed = asyncio.get_running_loop().time() - started
        finally:
            await server.stop(0)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert elapsed < 0.6, f"reconnected only after {elapsed:.2f}s"
    finally:
        await channel.close()
