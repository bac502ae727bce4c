"""OpenTelemetry tracing across the four services; off unless an OTLP endpoint is set.

On when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``
is set (and neither ``OTEL_SDK_DISABLED=true`` nor ``OTEL_TRACES_EXPORTER=none``):
each service process then exports its spans with the OTLP/gRPC exporter (the
standard ``OTEL_EXPORTER_OTLP_*`` and ``OTEL_BSP_*`` variables apply; service
name ``runyard-<service>`` unless ``OTEL_SERVICE_NAME`` says otherwise).

What is traced, with the OpenTelemetry instrumentation packages:

* every gRPC call: server side with ``opentelemetry-instrumentation-grpc``'s
  ``grpc.aio`` interceptor, client side with the small interceptors of
  :func:`client_interceptors` (see there why), W3C trace context
  (``traceparent``) in the gRPC metadata; health checks, reflection and the
  long-lived streams (``WorkerHubService/Connect``, ``WatchEvents``) are left out;
* PostgreSQL queries (``opentelemetry-instrumentation-asyncpg``) and provider
  HTTP calls (``opentelemetry-instrumentation-httpx``);
* a run: the gateway stores the trace context of ``SendMessage`` in the run's
  ``RunPayload.trace_context``, and the worker executes the run in a span
  (``runyard.run``) that continues that trace, whichever worker claims it and
  however long it queued. Spans carry ``runyard.run_id``,
  ``runyard.session_id`` and ``runyard.model`` where known.

Background work (queue polls, outbox relays, heartbeats) starts no trace: a
client span without a parent is not sampled (:class:`_RequestsOnly`), so a trace
always begins at an incoming request or a run.

Off (the default), nothing here is imported beyond this module: no tracer
provider, no interceptors, no instrumentation; :data:`ENABLED` is False and
the helpers return at once (no per-message work anywhere).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: nothing of OpenTelemetry is imported while tracing is off
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.sampling import SamplingResult
    from opentelemetry.trace import Link, SpanKind
    from opentelemetry.trace.span import TraceState
    from opentelemetry.util.types import Attributes

__all__ = [
    "ENABLED",
    "attached",
    "client_interceptors",
    "configured",
    "inject",
    "noting_models",
    "request_attributes",
    "run_span",
    "server_interceptors",
    "set_attributes",
    "setup",
    "shutdown",
    "status_code",
]

log = logging.getLogger(__name__)

#: True once :func:`setup` installed tracing in this process.
ENABLED = False

_provider: Any = None
_instrumentors: list[Any] = []
_NO_SPAN = contextlib.nullcontext(None)

#: gRPC services and methods never traced: probes, reflection, and streams
#: that live as long as a connection (a span of hours would say nothing).
_UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
_UNTRACED_METHODS = ("/runyard.v1.WorkerHubService/Connect", "/runyard.v1.GatewayService/WatchEvents")


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for tracing (an OTLP endpoint is set)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _traced(details: Any) -> bool:
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return not (method.startswith(_UNTRACED_PREFIXES) or method in _UNTRACED_METHODS)


def _sampler() -> Any:
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_ON,
        Decision,
        ParentBased,
        Sampler,
        SamplingResult,
    )
    from opentelemetry.trace import SpanKind

    class _RequestsOnly(Sampler):
        """Root spans: requests and runs are traced; a CLIENT span with no
        parent (a background poll, relay or heartbeat) starts no trace."""

        def should_sample(  # the Sampler interface
            self,
            parent_context: Context | None,
            trace_id: int,
            name: str,
            kind: SpanKind | None = None,
            attributes: Attributes = None,
            links: Sequence[Link] | None = None,
            trace_state: TraceState | None = None,
        ) -> SamplingResult:
            if kind == SpanKind.CLIENT:
                return SamplingResult(Decision.DROP)
            return ALWAYS_ON.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )

        def get_description(self) -> str:
            return "RequestsOnly"

    return ParentBased(root=_RequestsOnly())


def setup(service: str, *, exporter: Any = None, set_global: bool = True) -> bool:
    """Turn tracing on in this process if :func:`configured` (or ``exporter`` is given).

    Args:
        service: ``gateway``, ``router``, ``sessions`` or ``worker``.
        exporter: a span exporter to use instead of OTLP (tests pass the SDK's
            ``InMemorySpanExporter``; spans are then exported synchronously).
        set_global: also make this the global tracer provider (for plugins
            that trace with the OpenTelemetry API).

    Returns:
        Whether tracing is on.

    Raises:
        ValueError: ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` asks for a protocol
            other than ``grpc`` (runyard ships the OTLP/gRPC exporter only).
    """
    global ENABLED, _provider
    if exporter is None and not configured():
        return False
    if exporter is None:
        protocol = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "grpc"
        )
        if protocol.strip().lower() != "grpc":
            raise ValueError(
                f"{protocol!r}: runyard exports traces with OTLP/gRPC only; "
                "set OTEL_EXPORTER_OTLP_PROTOCOL=grpc "
                "(collectors listen for it on port 4317)"
            )
    from opentelemetry import trace
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from runyard._version import __version__

    attributes = {"service.namespace": "runyard", "service.version": __version__}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = f"runyard-{service}"
    sampler = _sampler() if not os.environ.get("OTEL_TRACES_SAMPLER") else None
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    # AsyncPGInstrumentor's __init__ is unannotated.
    for instrumentor in (AsyncPGInstrumentor(), HTTPXClientInstrumentor()):  # type: ignore[no-untyped-call]
        instrumentor.instrument(tracer_provider=provider)
        _instrumentors.append(instrumentor)
    _provider = provider
    ENABLED = True
    log.info("tracing on: %s spans exported%s", service, "" if exporter is not None else " over OTLP/gRPC")
    return True


def shutdown() -> None:
    """Export what is buffered and turn tracing off (at process exit; tests)."""
    global ENABLED, _provider
    for instrumentor in _instrumentors:
        with contextlib.suppress(Exception):
            instrumentor.uninstrument()
    _instrumentors.clear()
    if _provider is not None:
        _provider.shutdown()
    _provider = None
    ENABLED = False


def server_interceptors() -> list[Any]:
    """The tracing ``grpc.aio`` server interceptor (to go first), or none when off."""
    if not ENABLED:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    # Unannotated in opentelemetry-instrumentation-grpc.
    return [aio_server_interceptor(tracer_provider=_provider, filter_=_traced)]  # type: ignore[no-untyped-call]


def client_interceptors() -> list[Any]:
    """Tracing ``grpc.aio`` client interceptors (they inject ``traceparent``), or none when off.

    Written here with the OpenTelemetry API rather than taken from
    opentelemetry-instrumentation-grpc, whose aio client interceptors end a
    streaming call's span only when the caller reads the stream to its end: a
    caller that stops at the message it needs (the worker stops at ``final``)
    left a span open until the generator was garbage-collected, 30 s and more
    later. These end the span when the call itself ends (its done callback),
    with the call's status, like the ``grpc_client_*`` metrics.
    """
    if not ENABLED:
        return []
    from opentelemetry import trace

    recorder = _ClientSpans(trace.get_tracer("runyard.grpc", tracer_provider=_provider))
    import grpc

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            return await recorder.intercept(continuation, details, request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
            return await recorder.intercept(continuation, details, request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
            return await recorder.intercept(continuation, details, requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
            return await recorder.intercept(continuation, details, requests)

    # grpc.aio files an interceptor under the first interceptor type it is an
    # instance of, so one object cannot serve all four kinds of call.
    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


class _ClientSpans:
    """A CLIENT span per outgoing call (``rpc.*`` attributes as the gRPC
    semantic conventions name them), ended with the call's status."""

    def __init__(self, tracer: Any):
        self.tracer = tracer
        self._pending: set[Any] = set()

    async def intercept(self, continuation: Any, details: Any, request: Any) -> Any:
        import grpc
        from opentelemetry import propagate, trace

        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        if method.startswith(_UNTRACED_PREFIXES) or method in _UNTRACED_METHODS:
            return await continuation(details, request)
        _, service, name = method.split("/", 2) if method.count("/") == 2 else ("", "", method)
        span = self.tracer.start_span(
            method,
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        metadata = grpc.aio.Metadata(*tuple(details.metadata or ()))
        propagate.inject(metadata, context=trace.set_span_in_context(span))
        details = grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
        try:
            call = await continuation(details, request)
        except grpc.aio.AioRpcError as exc:
            _end(span, exc.code(), exc.details() or "")
            raise
        except BaseException:
            _end(span, grpc.StatusCode.CANCELLED, "cancelled before it started")
            raise
        call.add_done_callback(self._on_done(span))
        return call

    def _on_done(self, span: Any) -> Any:
        import asyncio

        import grpc

        async def record(call: Any) -> None:
            try:
                code, text = await call.code(), await call.details()
            except asyncio.CancelledError:
                code, text = grpc.StatusCode.CANCELLED, "cancelled"
            _end(span, code, text or "")

        def done(call: Any) -> None:
            try:
                task = asyncio.get_running_loop().create_task(record(call))
            except RuntimeError:  # the loop is gone (process exit)
                span.end()
                return
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        return done


def _end(span: Any, code: Any, text: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code.name != "OK":
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {text}" if text else code.name))
    span.end()


def inject(carrier: MutableMapping[str, str]) -> None:
    """Write the current trace context into ``carrier`` (W3C ``traceparent``,
    ``tracestate``); does nothing when tracing is off."""
    if ENABLED:
        from opentelemetry import propagate

        propagate.inject(carrier)


def set_attributes(**attributes: str) -> None:
    """Set ``runyard.<name>`` attributes (``run_id``, ``session_id``, ``model``)
    on the current span; empty values are skipped; nothing when off."""
    if not ENABLED:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    for name, value in attributes.items():
        if value:
            span.set_attribute(f"runyard.{name}", value)


def status_code(code: Any) -> None:
    """Record a gRPC status on the current server span (the interceptor's
    context wrapper misses ``abort_with_status``): the code, and ERROR status
    for the codes the gRPC semantic conventions count as server errors."""
    if not ENABLED:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    span = trace.get_current_span()
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code.name in ("UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"):
        span.set_status(Status(StatusCode.ERROR, code.name))


def request_attributes(request: Any) -> None:
    """``runyard.run_id`` / ``runyard.session_id`` of an incoming request (its
    own fields, or those of the ``RunPayload`` in ``run``) on the current span."""
    if not ENABLED:
        return
    run = getattr(request, "run", None)
    source = run if run is not None and hasattr(run, "run_id") else request
    set_attributes(
        run_id=str(getattr(source, "run_id", "") or ""),
        session_id=str(getattr(source, "session_id", "") or ""),
    )


async def noting_models(stream: Any) -> Any:
    """Pass ``GenerateResponse`` messages through, recording the model chosen
    (``model_select``, then each ``model_failover``) as ``runyard.model`` on the
    current span. Wrap a stream with it only when :data:`ENABLED`."""
    from opentelemetry import trace

    span = trace.get_current_span()
    async for response in stream:
        kind = response.WhichOneof("event")
        if kind == "model_select":
            span.set_attribute("runyard.model", response.model_select.model)
        elif kind == "model_failover":
            span.set_attribute("runyard.model", response.model_failover.to_model)
        yield response


@contextlib.contextmanager
def attached(carrier: Mapping[str, str]) -> Iterator[None]:
    """Make the trace context in ``carrier`` (e.g. ``RunPayload.trace_context``)
    current for the block, so calls made in it join that trace; nothing when
    off or when ``carrier`` has none."""
    if not ENABLED or not carrier:
        yield
        return
    from opentelemetry import context, propagate

    token = context.attach(propagate.extract(dict(carrier)))
    try:
        yield
    finally:
        context.detach(token)


def run_span(payload: Any) -> Any:
    """A context manager for executing one run: a ``runyard.run`` span (kind
    CONSUMER: the run was queued) continuing the trace in
    ``payload.trace_context``, with the run's ids as attributes; yields the
    span (None when tracing is off, at the cost of one check)."""
    if not ENABLED:
        return _NO_SPAN
    return _run_span(payload)


@contextlib.contextmanager
def _run_span(payload: Any) -> Iterator[Any]:
    from opentelemetry import propagate, trace

    parent = propagate.extract(dict(payload.trace_context)) if payload.trace_context else None
    tracer = trace.get_tracer("runyard", tracer_provider=_provider)
    attributes = {
        "runyard.run_id": payload.run_id,
        "runyard.session_id": payload.session_id,
        "runyard.agent_id": payload.agent_id,
        "runyard.attempt": int(payload.attempt),
    }
    if payload.model.model:
        attributes["runyard.model"] = payload.model.model
    with tracer.start_as_current_span(
        "runyard.run", context=parent, kind=trace.SpanKind.CONSUMER, attributes=attributes
    ) as span:
        yield span
