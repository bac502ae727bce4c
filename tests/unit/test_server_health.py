"""Health, reflection and the HTTP probes of :class:`ServiceServer`, in process
on loopback: ``grpc.health.v1.Health/List``, ``grpc.reflection.v1`` next to
``v1alpha``, ``/healthz`` and ``/readyz`` on the metrics port following the gRPC
health state through a drain, and ``/metrics`` without ``*_created`` series or
other services' families."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from runyard._proto.v1 import gateway_pb2
from runyard.common import metrics
from runyard.common.server import REFLECTION_V1, ServiceServer
from tests.stack import free_port

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def block_event_loop(seconds: float) -> None:
    """What a handler doing CPU work without yielding does to the event loop."""
    time.sleep(seconds)


@pytest.fixture
async def http():
    """A metrics/health HTTP server on a free port: ``get(path) -> (status, body)``."""
    metrics.set_health_probe(None)  # servers of earlier tests in this process registered theirs
    port = free_port()
    server = metrics.serve_metrics(port, "127.0.0.1")
    assert server is not None

    async def get(path: str) -> tuple[int, str]:
        return await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}{path}")

    yield get
    server.shutdown()
    server.server_close()
    metrics.set_health_probe(None)


async def test_health_list_answers_every_service():
    server = ServiceServer("gateway", "127.0.0.1:0", [GATEWAY], shutdown_grace_s=0.1)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
            assert {name: s.status for name, s in reply.statuses.items()} == {
                "": health_pb2.HealthCheckResponse.SERVING,
                GATEWAY: health_pb2.HealthCheckResponse.SERVING,
            }
            await server.begin_shutdown()
            reply = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=5)
            assert {s.status for s in reply.statuses.values()} == {health_pb2.HealthCheckResponse.NOT_SERVING}
    finally:
        await server.stop(0)


async def reflect(channel: grpc.aio.Channel, service: str, request: reflection_pb2.ServerReflectionRequest):
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )([request], timeout=5)
    return [reply async for reply in call]


@pytest.mark.parametrize("service", [REFLECTION_V1, "grpc.reflection.v1alpha.ServerReflection"])
async def test_reflection_answers_in_v1_and_v1alpha(service):
    server = ServiceServer("gateway", "127.0.0.1:0", [GATEWAY], shutdown_grace_s=0.1)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            (listed,) = await reflect(
                channel, service, reflection_pb2.ServerReflectionRequest(list_services="")
            )
            names = {s.name for s in listed.list_services_response.service}
            assert {
                GATEWAY,
                "grpc.health.v1.Health",
                REFLECTION_V1,
                "grpc.reflection.v1alpha.ServerReflection",
            } <= names
            for symbol in (GATEWAY, REFLECTION_V1):
                (found,) = await reflect(
                    channel, service, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
                )
                assert found.WhichOneof("message_response") == "file_descriptor_response", found
    finally:
        await server.stop(0)


async def test_http_probes_follow_the_grpc_health_state_through_a_drain(http):
    # Before any server exists (a service still opening its database): not ready.
    assert (await http("/readyz"))[0] == 503
    server = ServiceServer("worker", "127.0.0.1:0", [], shutdown_grace_s=0.1)
    try:
        assert await http("/readyz") == (503, "NOT_SERVING\n")  # constructed, not started
        await server.start()
        assert await http("/readyz") == (200, "SERVING\n")
        assert await http("/healthz") == (200, "alive (SERVING)\n")

        await server.begin_shutdown()  # what SIGTERM does first
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            check = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await http("/readyz") == (503, "NOT_SERVING\n")
        # Liveness stays up while draining: nothing restarts a process mid-drain.
        assert await http("/healthz") == (200, "alive (NOT_SERVING)\n")
    finally:
        await server.stop(0)


async def test_healthz_fails_when_the_event_loop_is_blocked(http):
    server = ServiceServer("worker", "127.0.0.1:0", [], shutdown_grace_s=0.1)
    await server.start()
    try:
        result: list[tuple[int, str]] = []
        prober = threading.Thread(target=lambda: result.append(server.http_probe("/healthz", 0.2)))
        prober.start()
        block_event_loop(1.0)
        prober.join()
        assert result == [(503, "event loop blocked for more than 0.2s (SERVING)")]
        assert await asyncio.to_thread(server.http_probe, "/healthz") == (200, "alive (SERVING)")
    finally:
        await server.stop(0)


async def test_metrics_show_only_this_services_families_and_no_created_series(http):
    server = ServiceServer("router", "127.0.0.1:0", [], shutdown_grace_s=0.1)
    await server.start()
    try:
        metrics.FAILOVERS_TOTAL.labels("RATE_LIMIT")
        metrics.RUNS_TOTAL.labels("completed")
        status, text = await http("/metrics")
    finally:
        await server.stop(0)
    assert status == 200
    assert "runyard_failovers_total" in text and "runyard_build_info" in text
    assert 'grpc_server_handled_total{grpc_code="OK"' in text
    # Set only by the gateway / the sessions service:
    assert "runyard_runs_total" not in text and "runyard_active_sessions" not in text
    assert "_created" not in text
