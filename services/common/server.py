"""gRPC server bootstrap shared by every service.

:class:`ServiceServer` builds a ``grpc.aio`` server with

* the :class:`ServerInterceptor` below: maps :class:`~runyard.common.errors.RunyardError`
  to a status with ``google.rpc.Status`` details, counts in-flight RPCs and
  records the standard ``grpc_server_*`` metrics (Go label values);
* ``grpc.health.v1.Health`` (overall and per service, ``Check``, ``Watch`` and
  ``List``) and server reflection (``grpc.reflection.v1`` and ``v1alpha``);
* ``/healthz`` and ``/readyz`` on the metrics port (HTTP, for container health
  checks that should not start a gRPC client): see :meth:`ServiceServer.http_probe`;
* ``runyard.v1.AdminService`` (:mod:`runyard.common.admin`: version, in-flight
  RPCs and the service's own status for ``runyard status``);
* graceful shutdown on SIGTERM/SIGINT: health NOT_SERVING, the service's own
  ``drain`` callback (stop taking work, hand work back), then
  ``server.stop(grace)`` so in-flight unary calls finish.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from runyard import __version__
from runyard._proto.v1 import admin_pb2_grpc
from runyard.common import admin, metrics, tls, tracing
from runyard.common.errors import InvalidArgument, RunyardError, Unavailable

__all__ = [
    "REFLECTION_V1",
    "HealthServicer",
    "InFlight",
    "ServerInterceptor",
    "ServiceServer",
    "enable_reflection",
    "grpc_options",
    "settle_before_reject",
]

log = logging.getLogger(__name__)


def grpc_options(max_message_bytes: int = 16 * 1024 * 1024) -> list[tuple[str, Any]]:
    """Channel/server options shared by runyard servers and internal clients."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


async def settle_before_reject(request_iterator: AsyncIterator[Any], wait_s: float = 1.0) -> None:
    """Read the first message of a rejected client/bidi stream before the handler raises.

    A client that has just written its first message when the server ends the call
    can lose the race in gRPC core: its write fails and grpc-python reports
    ``INTERNAL "Internal error from Core"`` instead of the status the server sent
    (UNAUTHENTICATED, say). Reading that message first lets the write complete, so
    the client sees the real status. Waits at most ``wait_s`` seconds; a client
    that sends nothing is rejected after that. Raises nothing but
    ``asyncio.CancelledError`` (the client went away).

    Source: grpc/grpc#36066 (grpc-python aio's ``_write`` replaces a status already
    delivered with INTERNAL when a write fails as the RPC ends; still open with grpcio 1.85).
    """
    iterator = aiter(request_iterator)
    try:
        await asyncio.wait_for(anext(iterator), wait_s)
    except Exception:  # noqa: BLE001 - the call is being rejected anyway
        return


class InFlight:
    """Counts RPCs being handled; ``wait_idle`` waits for the count to reach 0."""

    def __init__(self) -> None:
        self.count = 0
        self.streams = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, streaming: bool) -> None:
        self.count += 1
        if streaming:
            self.streams += 1
        self._idle.clear()

    def leave(self, streaming: bool) -> None:
        self.count -= 1
        if streaming:
            self.streams -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True if idle within ``timeout_s`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def _split_method(full: str) -> tuple[str, str]:
    # "/runyard.v1.GatewayService/SendMessage"
    _, service, method = full.split("/", 2) if full.count("/") == 2 else ("", "unknown", full)
    return service, method


class _Malformed:
    """Stands in for a request message that failed to decode."""

    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """Wrap a request deserializer so undecodable bytes (e.g. invalid UTF-8 in
    a string field) become INVALID_ARGUMENT instead of grpc's INTERNAL."""
    if deserializer is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
            return _Malformed(exc)

    return decode


def _check_decoded(request: Any) -> Any:
    if isinstance(request, _Malformed):
        raise InvalidArgument(
            f"the request message could not be decoded: {request.error}", reason="MALFORMED_REQUEST"
        )
    return request


def _context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


def _ended_early_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code of a call whose handler was cancelled: the client went away
    (``Canceled``) or its deadline passed (``DeadlineExceeded``), as grpc-go reports."""
    code = _context_code(context)
    if code != grpc.StatusCode.OK:
        return code
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _Series:
    """The metric children of one (grpc_type, grpc_service, grpc_method),
    resolved once: ``.labels()`` takes a lock per call, and a streamed answer
    would otherwise pay for it on every message."""

    __slots__ = ("handled", "in_flight", "received", "seconds", "sent", "started")

    def __init__(self, labels: tuple[str, str, str]):
        self.started = metrics.GRPC_SERVER_STARTED.labels(*labels)
        self.received = metrics.GRPC_SERVER_MSG_RECEIVED.labels(*labels)
        self.sent = metrics.GRPC_SERVER_MSG_SENT.labels(*labels)
        self.seconds = metrics.GRPC_SERVER_HANDLING_SECONDS.labels(*labels)
        self.in_flight = metrics.RPCS_IN_FLIGHT.labels(labels[1], labels[0])
        self.handled: dict[grpc.StatusCode, Any] = {}

    def handled_for(self, labels: tuple[str, str, str], code: grpc.StatusCode) -> Any:
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = metrics.GRPC_SERVER_HANDLED.labels(
                *labels, metrics.GO_CODE_NAMES.get(code, "Unknown")
            )
        return child


_SERIES: dict[tuple[str, str, str], _Series] = {}


def _series(labels: tuple[str, str, str]) -> _Series:
    found = _SERIES.get(labels)
    if found is None:
        found = _SERIES[labels] = _Series(labels)
    return found


class _MeteredContext:
    """The servicer context as handed to a streaming handler: ``write`` and
    ``read`` count ``grpc_server_msg_sent_total`` / ``grpc_server_msg_received_total``
    (after the message went out / came in); everything else is the real context."""

    __slots__ = ("_context", "_series")

    def __init__(self, context: grpc.aio.ServicerContext, series: _Series):
        self._context = context
        self._series = series

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._series.sent.inc()

    async def read(self) -> Any:
        message = await self._context.read()
        if message is grpc.aio.EOF:
            return message
        self._series.received.inc()
        return _check_decoded(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Errors, in-flight tracking and ``grpc_server_*`` metrics for every RPC.

    A :class:`RunyardError` raised by a handler becomes the matching status
    with ``google.rpc.Status`` details; any other exception becomes INTERNAL
    (logged with its traceback, never sent to the client). While
    ``draining`` is set, new calls (other than health checks, reflection and
    AdminService) are refused with UNAVAILABLE and a retry hint, and counted as
    handled with ``Unavailable``.

    Metrics follow go-grpc-prometheus: a message counts as sent once grpc has
    written it; a handler cancelled because the client went away ends
    ``Canceled``, one whose deadline passed ``DeadlineExceeded``.
    """

    def __init__(self, inflight: InFlight):
        self.inflight = inflight
        self.draining = False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        # Still answered while draining: health, reflection and AdminService (reports the drain).
        exempt = service.startswith(("grpc.health.", "grpc.reflection.")) or service == admin.SERVICE_NAME
        if handler.request_streaming and handler.response_streaming:
            kind, behavior, factory = "bidi_stream", handler.stream_stream, grpc.stream_stream_rpc_method_handler
        elif handler.request_streaming:
            kind, behavior, factory = "client_stream", handler.stream_unary, grpc.stream_unary_rpc_method_handler
        elif handler.response_streaming:
            kind, behavior, factory = "server_stream", handler.unary_stream, grpc.unary_stream_rpc_method_handler
        else:
            kind, behavior, factory = "unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler
        labels = (kind, service, method)
        series = _series(labels)
        streaming = kind != "unary"
        interceptor = self

        def count_requests(request: Any) -> Any:
            if not handler.request_streaming:
                series.received.inc()
                return _check_decoded(request)

            async def counted() -> AsyncIterator[Any]:
                async for item in request:
                    series.received.inc()
                    yield _check_decoded(item)

            return counted()

        def begin() -> float:
            series.started.inc()
            series.in_flight.inc()
            interceptor.inflight.enter(streaming)
            return time.perf_counter()

        def finish(started: float, code: grpc.StatusCode) -> None:
            interceptor.inflight.leave(streaming)
            series.in_flight.dec()
            series.handled_for(labels, code).inc()
            series.seconds.observe(time.perf_counter() - started)
            if tracing.ENABLED:
                tracing.status_code(code)

        async def refuse_if_draining(started: float, context: grpc.aio.ServicerContext) -> None:
            # Counted like any other call (started, then handled as Unavailable).
            if interceptor.draining and not exempt:
                finish(started, grpc.StatusCode.UNAVAILABLE)
                error = Unavailable(
                    "server is shutting down; retry on another replica", reason="DRAINING", retry_after_s=1.0
                )
                await context.abort_with_status(error.to_grpc_status())

        async def fail(exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
            if isinstance(exc, RunyardError):
                await context.abort_with_status(exc.to_grpc_status())
            log.exception("unhandled error in %s/%s", service, method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise AssertionError("unreachable")  # pragma: no cover

        if handler.response_streaming:
            is_async_gen = inspect.isasyncgenfunction(behavior)

            async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                started = begin()
                await refuse_if_draining(started, context)
                if tracing.ENABLED and not handler.request_streaming:
                    tracing.request_attributes(request)
                code = grpc.StatusCode.OK
                # Messages written with context.write() / read with context.read() are counted too.
                metered = _MeteredContext(context, series)
                try:
                    if is_async_gen:
                        async for item in behavior(count_requests(request), metered):
                            yield item
                            # Resumed only once grpc has written the message (go-grpc-prometheus
                            # counts a message after a successful SendMsg).
                            series.sent.inc()
                    else:
                        await behavior(count_requests(request), metered)
                    code = _context_code(context)
                except (asyncio.CancelledError, GeneratorExit):
                    code = _ended_early_code(context)
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    code = exc.code if isinstance(exc, RunyardError) else grpc.StatusCode.INTERNAL
                    if context.code() is not None and not isinstance(exc, RunyardError):
                        # context.abort() was called by the handler
                        code = _context_code(context)
                        raise
                    await fail(exc, context)
                finally:
                    finish(started, code)

            wrapped = stream_behavior
        else:

            async def unary_behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = begin()
                await refuse_if_draining(started, context)
                if tracing.ENABLED and not handler.request_streaming:
                    tracing.request_attributes(request)
                code = grpc.StatusCode.OK
                try:
                    response = await behavior(
                        count_requests(request), _MeteredContext(context, series) if streaming else context
                    )
                    code = _context_code(context)
                    if code == grpc.StatusCode.OK:
                        series.sent.inc()
                    return response
                except asyncio.CancelledError:
                    code = _ended_early_code(context)
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    code = exc.code if isinstance(exc, RunyardError) else grpc.StatusCode.INTERNAL
                    if context.code() is not None and not isinstance(exc, RunyardError):
                        code = _context_code(context)
                        raise
                    await fail(exc, context)
                finally:
                    finish(started, code)

            wrapped = unary_behavior
        return factory(
            wrapped,
            request_deserializer=_lenient(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )


# ---------------------------------------------------------------- health and reflection

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthServicer(health.aio.HealthServicer):
    """``grpc.health.v1.Health`` (grpcio-health-checking's servicer) plus ``List``,
    with the overall status readable from any thread (the HTTP probes).

    The overall status ("" service) is NOT_SERVING until the server started.
    ``List`` answers every registered service's status (gRFC A80; the
    reference servicer leaves it UNIMPLEMENTED).
    """

    def __init__(self) -> None:
        super().__init__()
        self._server_status[""] = _NOT_SERVING
        #: The overall status, updated with every change (a plain attribute: read by other threads).
        self.overall: int = _NOT_SERVING

    async def _set(self, service: str, status: int) -> None:  # type: ignore[override]
        await super()._set(service, status)
        if service == "":
            self.overall = status

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        reply = health_pb2.HealthListResponse()
        for service, status in sorted(self._server_status.items()):
            reply.statuses[service].status = status
        return reply


#: Full name of the reflection service in its ``v1`` version (what current grpcurl,
#: Postman and grpc-java/go clients ask first).
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _register_reflection_v1(pool: descriptor_pool.DescriptorPool) -> None:
    """Add ``grpc/reflection/v1/reflection.proto`` to ``pool`` (so reflection
    can describe itself), derived from grpcio-reflection's v1alpha file: the v1
    file is the same messages and service under another package."""
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name = _REFLECTION_V1_FILE
    file.package = "grpc.reflection.v1"
    file.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(file)


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve server reflection in both versions, ``grpc.reflection.v1`` and
    ``grpc.reflection.v1alpha``, listing ``service_names`` and both reflection services.

    grpcio-reflection implements only v1alpha; v1 has byte-identical messages
    (same fields and numbers, another package), so one servicer answers both.
    """
    pool = descriptor_pool.Default()
    _register_reflection_v1(pool)
    names = [*service_names, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.method_handlers_generic_handler(
        REFLECTION_V1,
        {
            "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                servicer.ServerReflectionInfo,
                request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((v1,))


class ServiceServer:
    """A ``grpc.aio`` server with health, reflection, metrics and graceful shutdown.

    Args:
        name: service name for logs (``"gateway"``).
        listen: ``host:port`` to bind (port 0 picks a free port; see ``port``).
        service_names: full names of the gRPC services registered (for health
            and reflection), e.g. ``"runyard.v1.GatewayService"``.
        shutdown_grace_s: how long in-flight calls may run after SIGTERM.
        max_message_bytes: gRPC max send/receive message size.
        public: serves outside clients (the gateway): with TLS on, client
            certificates are required only if ``tls.gateway_require_client_cert``.
    """

    def __init__(
        self,
        name: str,
        listen: str,
        service_names: Iterable[str],
        *,
        shutdown_grace_s: float = 10.0,
        max_message_bytes: int = 16 * 1024 * 1024,
        public: bool = False,
    ):
        self.name = name
        self.public = public
        self.listen = listen
        self.service_names = list(service_names)
        self.shutdown_grace_s = shutdown_grace_s
        self.inflight = InFlight()
        self.interceptor = ServerInterceptor(self.inflight)
        self.server = grpc.aio.server(
            # Tracing (when on) goes first, so its span covers ours and sees the final status.
            interceptors=[*tracing.server_interceptors(), self.interceptor], options=grpc_options(max_message_bytes)
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        # /healthz and /readyz on the metrics port follow this server (metrics.serve_metrics).
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        metrics.set_health_probe(self.http_probe)
        # AdminService (`runyard status`); services add their part with admin.add_source().
        self.admin = admin.AdminServicer(self)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, self.server)
        enable_reflection(self.server, [*self.service_names, admin.SERVICE_NAME, health.SERVICE_NAME])
        self.port = 0
        self.stop_requested = asyncio.Event()
        self.restart_expected = False

    async def start(self) -> None:
        """Bind (TLS when configured), start serving and mark every service SERVING."""
        credentials = tls.server_credentials(public=self.public)
        if credentials is not None:
            self.port = self.server.add_secure_port(self.listen, credentials)
        else:
            self.port = self.server.add_insecure_port(self.listen)
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind {self.listen}")
        self._loop = asyncio.get_running_loop()
        await self.server.start()
        metrics.init_service_metrics(self.name, __version__)
        metrics.init_grpc_server_metrics([*self.service_names, admin.SERVICE_NAME, health.SERVICE_NAME])
        self.admin.start()
        for service in ("", *self.service_names):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s listening on %s", self.name, self.listen.rsplit(":", 1)[0] + f":{self.port}")

    def http_probe(self, path: str, timeout_s: float = 2.0) -> tuple[int, str]:
        """The HTTP health endpoints (called on the metrics server's thread).

        * ``/readyz``: 200 while the overall gRPC health is SERVING; 503 before
          the server started and from the moment a drain begins (NOT_SERVING).
        * ``/healthz``: liveness: 200 while this process's event loop runs a
          callback within ``timeout_s`` (also during a drain, so an orchestrator
          never restarts a draining process), else 503.

        The body names the gRPC status (``SERVING``, ``NOT_SERVING``).
        Returns ``(HTTP status, body)``.
        """
        state = health_pb2.HealthCheckResponse.ServingStatus.Name(self.health.overall)
        if path == "/readyz":
            return (200 if self.health.overall == _SERVING else 503), state
        loop = self._loop
        answered = threading.Event()
        try:
            if loop is None:
                raise RuntimeError("no event loop yet")
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # the loop is closed
            return 503, f"event loop stopped ({state})"
        if not answered.wait(timeout_s):
            return 503, f"event loop blocked for more than {timeout_s:g}s ({state})"
        return 200, f"alive ({state})"

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT request a graceful stop; SIGUSR1 one that expects a restart."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)

        def restart() -> None:
            self.restart_expected = True
            self.stop_requested.set()

        loop.add_signal_handler(signal.SIGUSR1, restart)

    async def begin_shutdown(self) -> None:
        """Health NOT_SERVING and refuse new calls (UNAVAILABLE, DRAINING)."""
        await self.health.enter_graceful_shutdown()
        self.interceptor.draining = True

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop the server; in-flight calls get ``grace_s`` seconds to finish."""
        await self.admin.stop()
        await self.server.stop(self.shutdown_grace_s if grace_s is None else grace_s)
