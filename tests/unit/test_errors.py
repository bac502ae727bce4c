"""Errors travel as gRPC status + google.rpc.Status details and come back intact."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from runyard import Cancelled, InvalidArgument, NotFound, ResourceExhausted, RunyardError, Unavailable
from runyard.common.errors import from_rpc_error
from runyard.common.server import ServiceServer


class _Servicer(grpc.GenericRpcHandler):
    pass


async def test_error_details_round_trip_through_a_real_server():
    server = ServiceServer("t", "127.0.0.1:0", [])

    async def fail(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ResourceExhausted("slow down", reason="RATE_LIMITED", field="text", retry_after_s=1.5)

    async def boom(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise ValueError("secret internals")

    handler = grpc.method_handlers_generic_handler(
        "t.T",
        {
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Boom": grpc.unary_unary_rpc_method_handler(boom),
        },
    )
    server.server.add_generic_rpc_handlers((handler,))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await channel.unary_unary("/t.T/Fail")(b"")
            error = from_rpc_error(raised.value)
            with pytest.raises(grpc.aio.AioRpcError) as internal:
                await channel.unary_unary("/t.T/Boom")(b"")
    finally:
        await server.stop(0)
    assert isinstance(error, ResourceExhausted)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (error.reason, error.field, error.retry_after_s) == ("RATE_LIMITED", "text", 1.5)
    assert internal.value.code() == grpc.StatusCode.INTERNAL
    assert "secret internals" not in (internal.value.details() or "")


def test_invalid_argument_carries_a_field_violation():
    status = InvalidArgument("text must not be empty", reason="EMPTY_TEXT", field="text").to_status_proto()
    bad = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad) for d in status.details if d.Is(error_details_pb2.BadRequest.DESCRIPTOR))
    assert bad.field_violations[0].field == "text"


def test_run_error_keeps_code_reason_and_retryability():
    run_error = NotFound("no such agent", reason="AGENT_NOT_FOUND").to_run_error()
    assert (run_error.code, run_error.reason, run_error.retryable) == ("NOT_FOUND", "AGENT_NOT_FOUND", False)
    assert isinstance(RunyardError("x"), Exception)


def _rpc_error(code: grpc.StatusCode, details: str, trailing: tuple = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)


def test_a_bare_cancelled_status_means_the_server_went_away_and_is_retryable():
    # What gRPC core sends for calls a stopping server never handed to a handler
    # (grpc/grpc#41785): a caller must retry it, not record the run as cancelled.
    error = from_rpc_error(_rpc_error(grpc.StatusCode.CANCELLED, "CANCELLED"))
    assert isinstance(error, Unavailable)
    assert (error.code, error.reason, error.retryable) == (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", True)
    assert "CANCELLED" in error.message


def test_a_cancelled_status_raised_by_a_runyard_service_stays_cancelled():
    status = Cancelled("the run was cancelled", reason="RUN_CANCELLED").to_grpc_status()
    error = from_rpc_error(_rpc_error(status.code, status.details, status.trailing_metadata))
    assert isinstance(error, Cancelled)
    assert (error.code, error.reason) == (grpc.StatusCode.CANCELLED, "RUN_CANCELLED")
