"""``grpc_client_*`` metrics for internal channels (``grpc.aio`` client interceptors).

Names, labels and label values are those of go-grpc-prometheus, like the
server side (:mod:`runyard.common.server`):

* ``grpc_client_started_total`` when the call starts;
* ``grpc_client_handled_total{grpc_code}`` once, when the call ends, with the
  Go spelling of its status code (``OK``, ``Canceled``, ``DeadlineExceeded``...);
* ``grpc_client_handling_seconds`` from start to end;
* ``grpc_client_msg_sent_total`` per request message, counted once grpc has
  taken it (for a stream: when grpc asks for the next one), and
  ``grpc_client_msg_received_total`` per response message received.

The end of a streaming call is taken from the call's done callback, so a call
the caller abandons or cancels is still counted (as ``Canceled``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from runyard.common import metrics

__all__ = ["client_metrics_interceptors"]


def _split(method: str | bytes) -> tuple[str, str]:
    text = method.decode() if isinstance(method, bytes) else method
    parts = text.split("/")
    if len(parts) == 3:
        return parts[1], parts[2]
    return "unknown", text


class _Series:
    """The metric children of one (grpc_type, grpc_service, grpc_method),
    resolved once: ``.labels()`` takes a lock, and a streamed answer would
    otherwise pay for it on every message."""

    __slots__ = ("received", "sent", "started")

    def __init__(self, labels: tuple[str, str, str]):
        self.started = metrics.GRPC_CLIENT_STARTED.labels(*labels)
        self.sent = metrics.GRPC_CLIENT_MSG_SENT.labels(*labels)
        self.received = metrics.GRPC_CLIENT_MSG_RECEIVED.labels(*labels)


_SERIES: dict[tuple[str, str, str], _Series] = {}


class _Rpc:
    """Metrics of one client call."""

    __slots__ = ("done", "labels", "series", "started")

    def __init__(self, kind: str, method: str | bytes):
        service, name = _split(method)
        self.labels = (kind, service, name)
        series = _SERIES.get(self.labels)
        if series is None:
            series = _SERIES[self.labels] = _Series(self.labels)
        self.series = series
        self.started = time.perf_counter()
        self.done = False
        series.started.inc()

    def sent(self) -> None:
        self.series.sent.inc()

    def received(self) -> None:
        self.series.received.inc()

    def handled(self, code: grpc.StatusCode) -> None:
        if self.done:
            return
        self.done = True
        metrics.GRPC_CLIENT_HANDLED.labels(*self.labels, metrics.GO_CODE_NAMES.get(code, "Unknown")).inc()
        metrics.GRPC_CLIENT_HANDLING_SECONDS.labels(*self.labels).observe(time.perf_counter() - self.started)

    async def count_sent(self, requests: AsyncIterable[Any] | Iterable[Any]) -> AsyncIterator[Any]:
        """Yield ``requests``; each is counted when grpc asks for the next one
        (it has been written by then), the last one when the stream ends."""
        if isinstance(requests, AsyncIterable):
            async for message in requests:
                yield message
                self.sent()
        else:
            for message in requests:
                yield message
                self.sent()

    async def count_received(self, call: Any) -> AsyncIterator[Any]:
        async for message in call:
            self.received()
            yield message


class _Recorder:
    """What the four interceptors share: recording the end of a call."""

    def __init__(self) -> None:
        # Tasks that read the final status of finished streaming calls (kept
        # referenced until they ran).
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self, rpc: _Rpc, start: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await start()
        except grpc.aio.AioRpcError as exc:
            rpc.handled(exc.code())
            raise
        except asyncio.CancelledError:
            rpc.handled(grpc.StatusCode.CANCELLED)
            raise

    async def unary_response(self, rpc: _Rpc, call: Any) -> Any:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            rpc.handled(exc.code())
            raise
        except asyncio.CancelledError:
            rpc.handled(grpc.StatusCode.CANCELLED)
            raise
        rpc.received()
        rpc.handled(grpc.StatusCode.OK)
        return call

    def watch(self, rpc: _Rpc, call: Any) -> None:
        async def record(finished: Any) -> None:
            try:
                code = await finished.code()
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
            rpc.handled(code)

        def on_done(finished: Any) -> None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # the loop is gone (process exit): nothing left to report to
                return
            task = loop.create_task(record(finished))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

        call.add_done_callback(on_done)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Unary: one message each way; ends when the response (or error) arrives."""
        rpc = _Rpc("unary", client_call_details.method)
        call = await self.recorder.start(rpc, lambda: continuation(client_call_details, request))
        rpc.sent()
        return await self.recorder.unary_response(rpc, call)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        """Server streaming: the request, then each response message."""
        rpc = _Rpc("server_stream", client_call_details.method)
        call = await self.recorder.start(rpc, lambda: continuation(client_call_details, request))
        rpc.sent()
        self.recorder.watch(rpc, call)
        return rpc.count_received(call)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Client streaming: each request message, then the response."""
        rpc = _Rpc("client_stream", client_call_details.method)
        requests = rpc.count_sent(request_iterator) if request_iterator is not None else None
        call = await self.recorder.start(rpc, lambda: continuation(client_call_details, requests))
        return await self.recorder.unary_response(rpc, call)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        """Bidirectional streaming: messages both ways; ends with the call."""
        rpc = _Rpc("bidi_stream", client_call_details.method)
        requests = rpc.count_sent(request_iterator) if request_iterator is not None else None
        call = await self.recorder.start(rpc, lambda: continuation(client_call_details, requests))
        self.recorder.watch(rpc, call)
        return rpc.count_received(call)


def client_metrics_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors recording ``grpc_client_*`` for every call on a channel.

    One per call type: ``grpc.aio`` files an interceptor under the first
    interceptor type it is an instance of, so one object cannot serve all four.
    """
    recorder = _Recorder()
    return [_UnaryUnary(recorder), _UnaryStream(recorder), _StreamUnary(recorder), _StreamStream(recorder)]
