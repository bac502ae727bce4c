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
* graceful shutdown on SIGTERM/SIGINT (:meth:`ServiceServer.install_signal_handlers`,
  :meth:`~ServiceServer.begin_shutdown`, :meth:`~ServiceServer.stop`): health
  NOT_SERVING and new calls refused, then ``server.stop(grace)`` so in-flight
  unary calls finish. The order of a whole service's start and stop around
  this server is :func:`runyard.common.lifecycle.run_service`'s.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from runyard._proto.v1 import admin_pb2_grpc
from runyard._version import __version__
from runyard.common import admin, auth, faults, metrics, tracing, validation
from runyard.common.channels import grpc_server_options
from runyard.common.errors import InvalidArgument, RunyardError, Unauthenticated, Unavailable
from runyard.common.grpctypes import ServicerContext
from runyard.common.tls import TlsSettings, server_credentials

__all__ = [
    "REFLECTION_V1",
    "HealthServicer",
    "InFlight",
    "ServerInterceptor",
    "ServiceServer",
    "enable_reflection",
    "settle_before_reject",
]

log = logging.getLogger(__name__)


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


def _context_code(context: ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


def _ended_early_code(context: ServicerContext) -> grpc.StatusCode:
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

    def __init__(self, context: ServicerContext, series: _Series):
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


def _mapped_code(exc: BaseException) -> grpc.StatusCode:
    mapped = faults.as_runyard_error(exc)
    return mapped.code if mapped is not None else grpc.StatusCode.INTERNAL


class _CallGuard:
    """What the interceptor checks on one method: the internal credential (on
    internal listeners), request validation (:mod:`runyard.common.validation`)
    and whether a transient database error may be retried (the method's
    ``idempotency_level`` in the contract, unary calls only)."""

    __slots__ = ("idempotent", "secret", "validate")

    def __init__(self, secret: str, validate: bool, idempotent: bool):
        self.secret = secret
        self.validate = validate
        self.idempotent = idempotent

    @classmethod
    def for_method(cls, internal_secret: str | None, service: str, full_method: str, kind: str) -> _CallGuard:
        # Health stays open on internal listeners (probes, load balancers).
        secret = internal_secret or ""
        if service.startswith("grpc.health."):
            secret = ""
        return cls(
            secret,
            validation.validated_service(service),
            kind == "unary" and faults.rpc_idempotent(full_method),
        )

    def check(self, request: Any) -> Any:
        if self.validate:
            validation.check_request(request)
        return request

    async def authenticate(self, context: ServicerContext, request_stream: Any | None) -> None:
        """UNAUTHENTICATED ``INTERNAL_AUTH_REQUIRED`` without the internal secret."""
        if not self.secret or auth.has_internal_credential(context.invocation_metadata(), self.secret):
            return
        if request_stream is not None:
            await settle_before_reject(request_stream)
        raise Unauthenticated(
            "this is an internal listener: calls need the service credential (x-runyard-internal)",
            reason="INTERNAL_AUTH_REQUIRED",
        )


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Errors, in-flight tracking and ``grpc_server_*`` metrics for every RPC.

    A :class:`RunyardError` raised by a handler becomes the matching status
    with ``google.rpc.Status`` details; any other exception becomes INTERNAL
    (logged with its traceback, never sent to the client). While
    ``draining`` is set, new calls (other than health checks, reflection and
    AdminService) are refused with UNAVAILABLE and a retry hint, and counted as
    handled with ``Unavailable``.

    Before a handler runs (:class:`_CallGuard`): on an internal listener
    (``internal_secret`` set) every call but health checks must carry the
    internal secret (UNAUTHENTICATED ``INTERNAL_AUTH_REQUIRED``); every request
    message passes :func:`runyard.common.validation.check_request`
    (INVALID_ARGUMENT). Exceptions that are infrastructure faults map through
    :func:`runyard.common.faults.as_runyard_error` (a database blip is
    UNAVAILABLE ``DATABASE_UNAVAILABLE``, never INTERNAL), and unary methods
    the contract declares idempotent are retried over such a blip.

    Metrics follow go-grpc-prometheus: a message counts as sent once grpc has
    written it; a handler cancelled because the client went away ends
    ``Canceled``, one whose deadline passed ``DeadlineExceeded``.
    """

    def __init__(self, inflight: InFlight, *, internal_secret: str | None = None):
        self.inflight = inflight
        self.draining = False
        #: Set on internal listeners: every call but health checks must carry it.
        self.internal_secret = internal_secret

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        # Still answered while draining: health, reflection and AdminService (reports the drain).
        exempt = service.startswith(("grpc.health.", "grpc.reflection.")) or service == admin.SERVICE_NAME
        if handler.request_streaming and handler.response_streaming:
            kind, behavior, factory = (
                "bidi_stream",
                handler.stream_stream,
                grpc.stream_stream_rpc_method_handler,
            )
        elif handler.request_streaming:
            kind, behavior, factory = (
                "client_stream",
                handler.stream_unary,
                grpc.stream_unary_rpc_method_handler,
            )
        elif handler.response_streaming:
            kind, behavior, factory = (
                "server_stream",
                handler.unary_stream,
                grpc.unary_stream_rpc_method_handler,
            )
        else:
            kind, behavior, factory = "unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler
        # grpc's stubs type the handlers of the sync server (returning values and
        # iterators); on grpc.aio they are coroutine and async generator functions.
        call = cast("Callable[[Any, Any], Any]", behavior)
        labels = (kind, service, method)
        series = _series(labels)
        streaming = kind != "unary"
        interceptor = self
        guard = _CallGuard.for_method(self.internal_secret, service, handler_call_details.method, kind)

        def count_requests(request: Any) -> Any:
            if not handler.request_streaming:
                series.received.inc()
                return guard.check(_check_decoded(request))

            async def counted() -> AsyncIterator[Any]:
                async for item in request:
                    series.received.inc()
                    yield guard.check(_check_decoded(item))

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

        async def refuse_if_draining(started: float, context: ServicerContext) -> None:
            # Counted like any other call (started, then handled as Unavailable).
            if interceptor.draining and not exempt:
                finish(started, grpc.StatusCode.UNAVAILABLE)
                error = Unavailable(
                    "server is shutting down; retry on another replica", reason="DRAINING", retry_after_s=1.0
                )
                await context.abort_with_status(error.to_grpc_status())

        async def fail(exc: BaseException, context: ServicerContext) -> grpc.StatusCode:
            mapped = faults.as_runyard_error(exc)
            if mapped is not None:
                if mapped is not exc:
                    log.warning("%s/%s: %s (%s)", service, method, mapped.reason, type(exc).__name__)
                await context.abort_with_status(mapped.to_grpc_status())
            log.exception("unhandled error in %s/%s", service, method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise AssertionError("unreachable")  # pragma: no cover

        wrapped: Callable[[Any, ServicerContext], Any]
        if handler.response_streaming:
            is_async_gen = inspect.isasyncgenfunction(behavior)

            async def stream_behavior(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
                started = begin()
                await refuse_if_draining(started, context)
                if tracing.ENABLED and not handler.request_streaming:
                    tracing.request_attributes(request)
                code = grpc.StatusCode.OK
                # Messages written with context.write() / read with context.read() are counted too.
                metered = _MeteredContext(context, series)
                try:
                    await guard.authenticate(context, request if handler.request_streaming else None)
                    if is_async_gen:
                        async for item in call(count_requests(request), metered):
                            yield item
                            # Resumed only once grpc has written the message (go-grpc-prometheus
                            # counts a message after a successful SendMsg).
                            series.sent.inc()
                    else:
                        await call(count_requests(request), metered)
                    code = _context_code(context)
                except (asyncio.CancelledError, GeneratorExit):
                    code = _ended_early_code(context)
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    code = _mapped_code(exc)
                    if context.code() is not None and not isinstance(exc, RunyardError):
                        # context.abort() was called by the handler
                        code = _context_code(context)
                        raise
                    await fail(exc, context)
                finally:
                    finish(started, code)

            wrapped = stream_behavior
        else:

            async def unary_behavior(request: Any, context: ServicerContext) -> Any:
                started = begin()
                await refuse_if_draining(started, context)
                if tracing.ENABLED and not handler.request_streaming:
                    tracing.request_attributes(request)
                code = grpc.StatusCode.OK
                try:
                    await guard.authenticate(context, request if handler.request_streaming else None)
                    checked = count_requests(request)
                    target = _MeteredContext(context, series) if streaming else context
                    if guard.idempotent:
                        # Declared safe to repeat in the contract: a database blip is retried here.
                        response = await faults.retry_transient(
                            lambda: call(checked, target), budget_s=faults.budget_for(context)
                        )
                    else:
                        response = await call(checked, target)
                    code = _context_code(context)
                    if code == grpc.StatusCode.OK:
                        series.sent.inc()
                    return response
                except asyncio.CancelledError:
                    code = _ended_early_code(context)
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    code = _mapped_code(exc)
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


# grpc_health is untyped here (see pyproject.toml: its types- stubs are out of date).
class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
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

    async def _set(self, service: str, status: int) -> None:
        await super()._set(service, status)
        if service == "":
            self.overall = status

    async def List(
        self, request: health_pb2.HealthListRequest, context: ServicerContext
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

    Listeners: a service's listener is *internal* (every call but health
    checks needs the internal secret, see :mod:`runyard.common.auth`) unless
    ``public`` is set. The gateway's public listener serves and reflects only
    ``service_names`` (GatewayService) plus health and reflection; its
    internal services (``internal_service_names``: WorkerHubService,
    TaskService) and AdminService go on a second, internal listener at
    ``internal_listen``.

    Args:
        name: service name for logs (``"gateway"``).
        listen: ``host:port`` to bind (port 0 picks a free port; see ``port``).
        service_names: full names of the gRPC services registered on
            ``server`` (for health and reflection), e.g. ``"runyard.v1.GatewayService"``.
        shutdown_grace_s: how long in-flight calls may run after SIGTERM.
        max_message_bytes: gRPC max send/receive message size.
        public: serves outside clients (the gateway): no internal credential
            is required there, and with TLS on, client certificates are
            required only if ``tls.gateway_require_client_cert``.
        internal_listen: with ``public``, the ``host:port`` of the internal
            listener (``internal_server``, ``internal_port``).
        internal_service_names: services registered on ``internal_server``.
        internal_secret: what internal listeners and AdminService require
            ("" = no check, which ``runyard serve`` never allows: see
            :func:`runyard.common.runtime.check_service_config`).
        tls: the listeners' TLS (:func:`runyard.common.tls.load`); None = plaintext.
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
        internal_listen: str = "",
        internal_service_names: Iterable[str] = (),
        internal_secret: str = "",
        tls: TlsSettings | None = None,
    ):
        self.name = name
        self.tls = tls
        self.public = public
        self.listen = listen
        self.service_names = list(service_names)
        self.shutdown_grace_s = shutdown_grace_s
        self.inflight = InFlight()
        self.internal_secret = internal_secret
        self.interceptor = ServerInterceptor(
            self.inflight, internal_secret=None if public else self.internal_secret
        )
        self.interceptors = [self.interceptor]
        self._options = grpc_server_options(max_message_bytes)
        self.server = grpc.aio.server(
            # Tracing (when on) goes first, so its span covers ours and sees the final status.
            interceptors=[*tracing.server_interceptors(), self.interceptor],
            options=self._options,
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
        self.internal_listen = internal_listen if public else ""
        self.internal_service_names = list(internal_service_names)
        self.internal_port = 0
        if self.internal_listen:
            self.internal_server = self._internal_server()
            enable_reflection(self.server, [*self.service_names, health.SERVICE_NAME])
        else:
            self.internal_server = self.server
            admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, self.server)
            enable_reflection(
                self.server,
                [*self.service_names, *self.internal_service_names, admin.SERVICE_NAME, health.SERVICE_NAME],
            )
        self.port = 0
        self.stop_requested = asyncio.Event()
        self.restart_expected = False
        self._stopped = False

    def _internal_server(self) -> grpc.aio.Server:
        """The second listener of a public service: internal services, AdminService,
        health and reflection of those; the internal credential required."""
        interceptor = ServerInterceptor(self.inflight, internal_secret=self.internal_secret)
        self.interceptors.append(interceptor)
        server = grpc.aio.server(
            interceptors=[*tracing.server_interceptors(), interceptor], options=self._options
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(self.admin, server)
        enable_reflection(server, [*self.internal_service_names, admin.SERVICE_NAME, health.SERVICE_NAME])
        return server

    def _bind(self, server: grpc.aio.Server, listen: str, *, public: bool) -> int:
        credentials = server_credentials(self.tls, public=public)
        if credentials is not None:
            port = server.add_secure_port(listen, credentials)
        else:
            port = server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"{self.name}: cannot bind {listen}")
        return port

    async def start(self) -> None:
        """Bind (TLS when configured), start serving and mark every service SERVING."""
        self.port = self._bind(self.server, self.listen, public=self.public)
        if self.internal_listen:
            self.internal_port = self._bind(self.internal_server, self.internal_listen, public=False)
            await self.internal_server.start()
        else:
            self.internal_port = self.port
        self._loop = asyncio.get_running_loop()
        await self.server.start()
        every = [*self.service_names, *self.internal_service_names]
        metrics.init_service_metrics(self.name, __version__)
        metrics.init_grpc_server_metrics([*every, admin.SERVICE_NAME, health.SERVICE_NAME])
        self.admin.start()
        for service in ("", *every):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        host = self.listen.rsplit(":", 1)[0]
        if self.internal_listen:
            log.info(
                "%s listening on %s:%d (public), %s:%d (internal)",
                self.name,
                host,
                self.port,
                self.internal_listen.rsplit(":", 1)[0],
                self.internal_port,
            )
        else:
            log.info("%s listening on %s:%d", self.name, host, self.port)

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
        for interceptor in self.interceptors:
            interceptor.draining = True

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop the server(s); in-flight calls get ``grace_s`` seconds to finish
        (None: ``shutdown_grace_s``). Only the first call does anything."""
        if self._stopped:
            return
        self._stopped = True
        await self.admin.stop()
        grace = self.shutdown_grace_s if grace_s is None else grace_s
        servers = (
            [self.server] if self.internal_server is self.server else [self.server, self.internal_server]
        )
        await asyncio.gather(*(server.stop(grace) for server in servers))
