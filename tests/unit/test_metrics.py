"""gRPC server and client metrics: go-grpc-prometheus names, labels and values.

A real ``grpc.aio`` server with :class:`ServerInterceptor` and a real channel
with :func:`client_metrics_interceptors` on loopback; every assertion reads the
Prometheus registry the /metrics endpoint serves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from prometheus_client import REGISTRY

from runyard.common import metrics
from runyard.common.client_metrics import client_metrics_interceptors
from runyard.common.errors import InvalidArgument
from runyard.common.server import InFlight, ServerInterceptor

SERVICE = "runyard.test.MeteredService"


def sample(name: str, **labels: str) -> float:
    """Current value of one sample (0 when the series does not exist yet)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Snapshot:
    """Reads every grpc_* sample of one method, to compare before and after a call."""

    def __init__(self, method: str, kind: str):
        self.labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": kind}
        self.before = self.read()

    def read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for side in ("server", "client"):
            for name in ("started_total", "msg_received_total", "msg_sent_total", "handling_seconds_count"):
                values[f"{side}_{name}"] = sample(f"grpc_{side}_{name}", **self.labels)
            for code in metrics.GO_CODE_NAMES.values():
                values[f"{side}_handled_{code}"] = sample(
                    f"grpc_{side}_handled_total", **self.labels, grpc_code=code
                )
        values["in_flight"] = sample(
            "runyard_rpcs_in_flight", grpc_service=SERVICE, grpc_type=self.labels["grpc_type"]
        )
        return values

    def delta(self) -> dict[str, float]:
        after = self.read()
        return {k: after[k] - self.before[k] for k in after if after[k] != self.before[k]}


async def until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- the service


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"re:" + request


async def server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for index in range(int(request or b"3")):
        yield b"%d" % index


async def endless(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    while True:
        yield b"tick"
        await asyncio.sleep(0.01)


async def written(request: bytes, context: grpc.aio.ServicerContext) -> None:
    await context.write(b"one")
    await context.write(b"two")


async def client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return b"|".join([item async for item in requests])


async def read_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    items = []
    while (item := await context.read()) is not grpc.aio.EOF:
        items.append(item)
    return b"|".join(items)


async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for item in requests:
        yield item.upper()


async def invalid(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise InvalidArgument("text must not be empty", field="text")


async def aborted(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise ValueError("a bug")


async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(30)
    return b"late"


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    "Endless": grpc.unary_stream_rpc_method_handler(endless),
    "Written": grpc.unary_stream_rpc_method_handler(written),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    "ReadStream": grpc.stream_unary_rpc_method_handler(read_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    "Invalid": grpc.unary_unary_rpc_method_handler(invalid),
    "Aborted": grpc.unary_unary_rpc_method_handler(aborted),
    "Crash": grpc.unary_unary_rpc_method_handler(crash),
    "Slow": grpc.unary_unary_rpc_method_handler(slow),
}


@pytest.fixture
async def server():
    interceptor = ServerInterceptor(InFlight())
    srv = grpc.aio.server(interceptors=[interceptor])
    srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, HANDLERS)])
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_metrics_interceptors())
    yield interceptor, channel
    await channel.close()
    await srv.stop(None)


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


async def test_unary_call_counts_one_message_each_way(server):
    _, channel = server
    snap = Snapshot("Unary", "unary")
    assert await channel.unary_unary(path("Unary"))(b"x") == b"re:x"
    assert snap.delta() == {
        "server_started_total": 1,
        "server_msg_received_total": 1,
        "server_msg_sent_total": 1,
        "server_handled_OK": 1,
        "server_handling_seconds_count": 1,
        "client_started_total": 1,
        "client_msg_received_total": 1,
        "client_msg_sent_total": 1,
        "client_handled_OK": 1,
        "client_handling_seconds_count": 1,
    }


async def test_server_stream_counts_every_message(server):
    _, channel = server
    snap = Snapshot("ServerStream", "server_stream")
    replies = [r async for r in channel.unary_stream(path("ServerStream"))(b"3")]
    assert replies == [b"0", b"1", b"2"]
    await until(lambda: snap.delta().get("client_handled_OK") == 1)
    assert snap.delta() == {
        "server_started_total": 1,
        "server_msg_received_total": 1,
        "server_msg_sent_total": 3,
        "server_handled_OK": 1,
        "server_handling_seconds_count": 1,
        "client_started_total": 1,
        "client_msg_received_total": 3,
        "client_msg_sent_total": 1,
        "client_handled_OK": 1,
        "client_handling_seconds_count": 1,
    }


async def test_messages_written_with_context_write_are_counted(server):
    _, channel = server
    snap = Snapshot("Written", "server_stream")
    call = channel.unary_stream(path("Written"))(b"")
    assert [r async for r in call] == [b"one", b"two"]
    assert snap.delta()["server_msg_sent_total"] == 2


async def test_client_stream_counts_every_request(server):
    _, channel = server
    snap = Snapshot("ClientStream", "client_stream")

    async def requests():
        for item in (b"a", b"b", b"c", b"d"):
            yield item

    assert await channel.stream_unary(path("ClientStream"))(requests()) == b"a|b|c|d"
    assert snap.delta() == {
        "server_started_total": 1,
        "server_msg_received_total": 4,
        "server_msg_sent_total": 1,
        "server_handled_OK": 1,
        "server_handling_seconds_count": 1,
        "client_started_total": 1,
        "client_msg_received_total": 1,
        "client_msg_sent_total": 4,
        "client_handled_OK": 1,
        "client_handling_seconds_count": 1,
    }


async def test_messages_read_with_context_read_are_counted(server):
    _, channel = server
    snap = Snapshot("ReadStream", "client_stream")
    assert await channel.stream_unary(path("ReadStream"))(iter([b"a", b"b"])) == b"a|b"
    assert snap.delta()["server_msg_received_total"] == 2


async def test_bidi_stream_counts_both_directions(server):
    _, channel = server
    snap = Snapshot("Bidi", "bidi_stream")
    call = channel.stream_stream(path("Bidi"))(iter([b"a", b"b"]))
    assert [r async for r in call] == [b"A", b"B"]
    await until(lambda: snap.delta().get("client_handled_OK") == 1)
    delta = snap.delta()
    assert (delta["server_msg_received_total"], delta["server_msg_sent_total"]) == (2, 2)
    assert (delta["client_msg_sent_total"], delta["client_msg_received_total"]) == (2, 2)
    assert delta["server_handled_OK"] == 1


async def test_bidi_stream_written_with_call_write_is_counted(server):
    _, channel = server
    snap = Snapshot("Bidi", "bidi_stream")
    call = channel.stream_stream(path("Bidi"))()
    await call.write(b"x")
    assert await call.read() == b"X"
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    await until(lambda: snap.delta().get("client_handled_OK") == 1)
    assert snap.delta()["client_msg_sent_total"] == 1
    assert snap.delta()["client_msg_received_total"] == 1


@pytest.mark.parametrize(
    ("method", "code", "go_name"),
    [
        ("Invalid", grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument"),
        ("Aborted", grpc.StatusCode.NOT_FOUND, "NotFound"),
        ("Crash", grpc.StatusCode.INTERNAL, "Internal"),
    ],
)
async def test_errors_are_counted_with_go_code_names(server, method, code, go_name):
    _, channel = server
    snap = Snapshot(method, "unary")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(path(method))(b"")
    assert raised.value.code() == code
    # The server counts the call as it ends, which may be just after the client saw the status.
    await until(lambda: snap.delta().get(f"server_handled_{go_name}") == 1)
    delta = snap.delta()
    assert delta[f"server_handled_{go_name}"] == 1
    assert delta[f"client_handled_{go_name}"] == 1
    # No response message went out.
    assert "server_msg_sent_total" not in delta and "client_msg_received_total" not in delta


async def test_client_cancel_is_canceled_on_both_sides(server):
    _, channel = server
    snap = Snapshot("Endless", "server_stream")
    call = channel.unary_stream(path("Endless"))(b"")
    assert await call.read() == b"tick"
    assert snap.read()["in_flight"] == snap.before["in_flight"] + 1
    call.cancel()
    await until(lambda: snap.delta().get("server_handled_Canceled") == 1)
    await until(lambda: snap.delta().get("client_handled_Canceled") == 1)
    delta = snap.delta()
    assert "server_handled_OK" not in delta and "client_handled_OK" not in delta
    assert "in_flight" not in delta
    assert delta["client_msg_received_total"] >= 1


async def test_deadline_is_deadline_exceeded_on_both_sides(server):
    _, channel = server
    snap = Snapshot("Slow", "unary")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(path("Slow"))(b"", timeout=0.2)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: snap.delta().get("server_handled_DeadlineExceeded") == 1)
    delta = snap.delta()
    assert delta["client_handled_DeadlineExceeded"] == 1
    assert "server_handled_Canceled" not in delta


async def test_calls_refused_while_draining_are_counted_as_unavailable(server):
    interceptor, channel = server
    interceptor.draining = True
    snap = Snapshot("Unary", "unary")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(path("Unary"))(b"x")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    delta = snap.delta()
    assert delta["server_started_total"] == 1
    assert delta["server_handled_Unavailable"] == 1
    assert delta["server_handling_seconds_count"] == 1
    assert "in_flight" not in delta


def test_every_grpc_code_has_its_go_spelling():
    assert len(metrics.GO_CODE_NAMES) == len(grpc.StatusCode)
    assert metrics.GO_CODE_NAMES[grpc.StatusCode.CANCELLED] == "Canceled"
    assert metrics.GO_CODE_NAMES[grpc.StatusCode.DEADLINE_EXCEEDED] == "DeadlineExceeded"


def test_provider_state_is_one_for_the_current_state_only():
    metrics.set_provider_state("unit-test-provider", "default", "m1", "cooling")
    values = {
        state: sample(
            "runyard_provider_state",
            provider="unit-test-provider",
            auth_profile="default",
            model="m1",
            state=state,
        )
        for state in metrics.PROVIDER_STATES
    }
    assert values == {"ok": 0, "cooling": 1, "disabled": 0}
    metrics.set_provider_state("unit-test-provider", "default", "m1", "ok")
    assert (
        sample(
            "runyard_provider_state",
            provider="unit-test-provider",
            auth_profile="default",
            model="m1",
            state="ok",
        )
        == 1
    )
    with pytest.raises(ValueError):
        metrics.set_provider_state("p", "a", "m", "broken")


def test_gateway_pre_creates_run_status_series():
    metrics.init_service_metrics("gateway", "9.9.9")
    names = {(s.name, tuple(sorted(s.labels.items()))) for m in REGISTRY.collect() for s in m.samples}
    for status in ("completed", "failed", "cancelled"):
        assert ("runyard_runs_total", (("status", status),)) in names
    assert sample("runyard_build_info", version="9.9.9", service="gateway") == 1
