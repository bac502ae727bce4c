"""One trace across the four service processes: the services export with their
real OTLP/gRPC exporter (OTEL_EXPORTER_OTLP_ENDPOINT) to an in-memory collector
in this test, and one ``SendMessage`` yields one trace through the gateway,
the worker's run, the router's Generate with its provider HTTP call, and the
sessions service writing the transcript (with its PostgreSQL queries).

Spans are matched by service, kind and attributes, not by internal RPC names
(only SendMessage and Generate are named), so the run path can change shape."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.fakes.openai_server import FakeOpenAI, provider_config
from tests.stack import free_port

pytestmark = pytest.mark.timeout(120)

SERVER, CLIENT, CONSUMER = (
    trace_pb2.Span.SPAN_KIND_SERVER,
    trace_pb2.Span.SPAN_KIND_CLIENT,
    trace_pb2.Span.SPAN_KIND_CONSUMER,
)


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver keeping every span in memory, with its service name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []

    async def Export(self, request, context):  # the OTLP method name
        for resource_spans in request.resource_spans:
            attributes = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                self.spans.extend((attributes.get("service.name", ""), span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def attrs(span: trace_pb2.Span) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


async def test_one_trace_from_send_message_through_worker_router_provider_and_sessions(
    stack_factory, fake_openai: FakeOpenAI, monkeypatch
):
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    # The services inherit these (tests.stack passes the environment on).
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    stacks = []
    try:
        stack = stack_factory(provider_config(fake_openai))
        stacks.append(stack)
        await stack.start()
        async with stack.client() as client:
            events = [e async for e in client.send("traced", "hello there")]
        assert events[-1].HasField("completed")
        run_id, session_id = events[0].run_id, events[0].session_id

        def trace_of_run() -> dict[str, list[trace_pb2.Span]]:
            roots = [
                s
                for name, s in collector.spans
                if name == "runyard-gateway"
                and s.kind == SERVER
                and s.name.endswith("GatewayService/SendMessage")
            ]
            if not roots:
                return {}
            by_service: dict[str, list[trace_pb2.Span]] = defaultdict(list)
            for name, span in collector.spans:
                if span.trace_id == roots[0].trace_id:
                    by_service[name].append(span)
            return by_service

        deadline = time.monotonic() + 30
        while True:
            found = trace_of_run()
            complete = (
                any(
                    s.kind == CLIENT and "http.request.method" in attrs(s) or "http.method" in attrs(s)
                    for s in found.get("runyard-router", [])
                )
                and any(
                    s.kind == SERVER and attrs(s).get("runyard.run_id") == run_id
                    for s in found.get("runyard-sessions", [])
                )
                and any(s.kind == CONSUMER for s in found.get("runyard-worker", []))
            )
            if complete or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        for made in stacks:
            await made.close()  # they flush their last spans to the collector while it still listens
        await server.stop(0)

    found = trace_of_run()  # with what the services flushed as they stopped
    everything = [s for spans in found.values() for s in spans]
    # One tree: a single root (SendMessage), every other span's parent is in the trace.
    ids = {s.span_id for s in everything}
    roots = [s for s in everything if not s.parent_span_id]
    assert [(r.name, r.kind) for r in roots] == [("/runyard.v1.GatewayService/SendMessage", SERVER)]
    orphans = [
        (n, s.name, s.kind)
        for n, spans in found.items()
        for s in spans
        if s.parent_span_id and s.parent_span_id not in ids
    ]
    assert not orphans, orphans
    assert attrs(roots[0])["runyard.run_id"] == run_id and attrs(roots[0])["runyard.session_id"] == session_id

    # The worker executed the run in that trace.
    (run,) = [s for s in found["runyard-worker"] if s.kind == CONSUMER]
    assert (attrs(run)["runyard.run_id"], attrs(run)["runyard.session_id"]) == (run_id, session_id)
    assert attrs(run)["runyard.model"] == "fake/model-a"

    # The router's Generate, called by the worker, chose the model and called the provider over HTTP.
    (generate,) = [s for s in found["runyard-router"] if s.kind == SERVER and s.name.endswith("/Generate")]
    assert attrs(generate)["runyard.model"] == "fake/model-a"
    assert attrs(generate)["runyard.run_id"] == run_id
    http = [s for s in found["runyard-router"] if s.kind == CLIENT]
    assert http and all(str(fake_openai.url.rsplit(":", 1)[1].split("/")[0]) in str(attrs(s)) for s in http)
    router_ids = {s.span_id for s in found["runyard-router"]}
    assert all(s.parent_span_id in router_ids for s in http)

    # The sessions service stored the run's transcript, its queries traced beneath.
    writes = [
        s for s in found["runyard-sessions"] if s.kind == SERVER and attrs(s).get("runyard.run_id") == run_id
    ]
    assert writes
    queries = [
        s for s in found["runyard-sessions"] if s.kind == CLIENT and attrs(s).get("db.system") == "postgresql"
    ]
    assert {q.parent_span_id for q in queries} & {w.span_id for w in writes}

    # Background work (queue polls, outbox relays, heartbeats) made no traces of its own.
    stray = {s.trace_id for _, s in collector.spans if s.kind == CLIENT and not s.parent_span_id}
    assert not stray
