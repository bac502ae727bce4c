"""Tracing in process, with the OpenTelemetry SDK's in-memory exporter: off by
default (no interceptors, no spans), W3C trace context carried over gRPC
metadata and in ``RunPayload.trace_context``, run and session ids as span
attributes, gRPC status on server spans, and no trace started by background
client calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from runyard._proto.v1 import common_pb2
from runyard.common import tracing
from runyard.common.clients import internal_channel
from runyard.common.errors import InvalidArgument, Unavailable
from runyard.common.server import ServiceServer

SERVICE = "runyard.test.TracedService"


def test_off_by_default_and_without_an_endpoint(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.configured()
    assert tracing.setup("gateway") is False
    assert not tracing.ENABLED
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    payload = common_pb2.RunPayload(run_id="r")
    tracing.inject(payload.trace_context)
    assert dict(payload.trace_context) == {}
    with tracing.run_span(payload) as span:
        assert span is None
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert not tracing.configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}
    )
    assert not tracing.configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}
    )


def test_an_otlp_protocol_runyard_does_not_ship_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    with pytest.raises(ValueError, match="OTLP/gRPC only; set OTEL_EXPORTER_OTLP_PROTOCOL=grpc"):
        tracing.setup("router")
    assert not tracing.ENABLED


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    assert tracing.setup("router", exporter=exporter, set_global=False)
    yield exporter
    tracing.shutdown()
    assert not tracing.ENABLED


async def _handler(request: common_pb2.RunPayload, context: grpc.aio.ServicerContext) -> common_pb2.Run:
    if request.run_id == "bad":
        raise InvalidArgument("run_id is bad", reason="BAD", field="run_id")
    if request.run_id == "down":
        raise Unavailable("down", reason="DRAINING")
    return common_pb2.Run(id=request.run_id)


async def _stream(
    request: common_pb2.RunPayload, context: grpc.aio.ServicerContext
) -> AsyncIterator[common_pb2.Run]:
    for index in range(3):
        yield common_pb2.Run(id=f"{request.run_id}-{index}")


@pytest.fixture
async def traced_server(spans):
    server = ServiceServer("router", "127.0.0.1:0", [], shutdown_grace_s=0.1)
    server.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Get": grpc.unary_unary_rpc_method_handler(
                        _handler,
                        request_deserializer=common_pb2.RunPayload.FromString,
                        response_serializer=common_pb2.Run.SerializeToString,
                    ),
                    "Watch": grpc.unary_stream_rpc_method_handler(
                        _stream,
                        request_deserializer=common_pb2.RunPayload.FromString,
                        response_serializer=common_pb2.Run.SerializeToString,
                    ),
                },
            ),
        )
    )
    await server.start()
    channel = internal_channel(f"127.0.0.1:{server.port}")
    yield channel
    await channel.close()
    await server.stop(0)


def _call(channel: grpc.aio.Channel, method: str):
    make = channel.unary_stream if method == "Watch" else channel.unary_unary
    return make(
        f"/{SERVICE}/{method}",
        request_serializer=common_pb2.RunPayload.SerializeToString,
        response_deserializer=common_pb2.Run.FromString,
    )


async def test_a_run_span_continues_the_queued_trace_across_grpc_with_ids_as_attributes(spans, traced_server):
    # The gateway side: a request span whose context is stored in the payload.
    from opentelemetry import trace

    tracer = trace.get_tracer("test", tracer_provider=tracing._provider)
    payload = common_pb2.RunPayload(run_id="run-1", session_id="ses-1", agent_id="default", attempt=1)
    with tracer.start_as_current_span("SendMessage", kind=SpanKind.SERVER) as request_span:
        tracing.inject(payload.trace_context)
    assert set(payload.trace_context) >= {"traceparent"}
    trace_id = request_span.get_span_context().trace_id
    assert payload.trace_context["traceparent"].split("-")[1] == f"{trace_id:032x}"

    # The worker side, later and elsewhere: the run span joins that trace, and
    # gRPC calls made in it carry it on (traceparent in the metadata).
    with tracing.run_span(payload) as run_span:
        assert run_span is not None
        assert (await _call(traced_server, "Get")(common_pb2.RunPayload(run_id="run-1"))).id == "run-1"
        assert [r.id async for r in _call(traced_server, "Watch")(common_pb2.RunPayload(run_id="run-1"))] == [
            "run-1-0",
            "run-1-1",
            "run-1-2",
        ]
    wanted = {
        (f"/{SERVICE}/{m}", kind) for m in ("Get", "Watch") for kind in (SpanKind.CLIENT, SpanKind.SERVER)
    }
    for _ in range(200):  # a stream's spans end from gRPC's done callbacks, a moment after the last read
        finished = {(s.name, s.kind): s for s in spans.get_finished_spans()}
        if wanted <= finished.keys():
            break
        await asyncio.sleep(0.01)
    run = finished[("runyard.run", SpanKind.CONSUMER)]
    assert run.context.trace_id == trace_id and run.parent.span_id == request_span.get_span_context().span_id
    assert run.attributes["runyard.run_id"] == "run-1" and run.attributes["runyard.session_id"] == "ses-1"
    for method in ("Get", "Watch"):
        client = finished[(f"/{SERVICE}/{method}", SpanKind.CLIENT)]
        server = finished[(f"/{SERVICE}/{method}", SpanKind.SERVER)]
        assert client.context.trace_id == server.context.trace_id == trace_id
        assert client.parent.span_id == run.context.span_id
        assert server.parent.span_id == client.context.span_id  # W3C traceparent crossed the wire
        assert server.attributes["runyard.run_id"] == "run-1"  # from the request's run_id field


async def test_server_spans_carry_the_grpc_status(spans, traced_server):
    payload = common_pb2.RunPayload(run_id="r")
    with tracing.run_span(payload):
        for run_id in ("bad", "down"):
            with pytest.raises(grpc.aio.AioRpcError):
                await _call(traced_server, "Get")(common_pb2.RunPayload(run_id=run_id))
    for _ in range(200):  # a server span ends a moment after the client has the status
        servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
        by_run = {s.attributes["runyard.run_id"]: s for s in servers}
        if {"bad", "down"} <= by_run.keys():
            break
        await asyncio.sleep(0.01)
    assert by_run["bad"].attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert by_run["bad"].status.status_code == StatusCode.UNSET  # a client's mistake is no server error
    assert by_run["down"].attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert by_run["down"].status.status_code == StatusCode.ERROR


async def test_background_client_calls_start_no_trace(spans, traced_server):
    # A poll with no request or run around it (no current span): nothing is recorded, either side.
    assert (await _call(traced_server, "Get")(common_pb2.RunPayload(run_id="poll"))).id == "poll"
    assert spans.get_finished_spans() == ()
