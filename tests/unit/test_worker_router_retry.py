"""What a run does when the router goes away (RunExecutor against a router
of our own on real gRPC): a call lost mid-answer is made again, and the
client is told to discard what was streamed; a router that stays away for
longer than ``worker.dependency_retry_s`` hands the run back; a router's
verdict on the request is never retried."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import pytest

from runyard._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
from runyard.worker.runner import RunOutcome
from tests.support.worker import execute_run

pytestmark = pytest.mark.timeout(30)


class _Router(router_pb2_grpc.RouterServiceServicer):
    """Fails the first ``failures`` calls with ``code`` (after the model
    choice and one text delta), then answers "Hello"."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures = failures
        self.code = code
        self.calls: list[float] = []

    async def Generate(  # noqa: N802 - the gRPC method's name
        self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        self.calls.append(time.monotonic())
        yield router_pb2.GenerateResponse(model_select=common_pb2.ModelSelect(model="p/m"))
        if len(self.calls) <= self.failures:
            yield router_pb2.GenerateResponse(text_delta=common_pb2.TextDelta(text="Hal"))
            await context.abort(self.code, "the router went away")
        yield router_pb2.GenerateResponse(text_delta=common_pb2.TextDelta(text="Hello"))
        answer = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="Hello", model="p/m")
        yield router_pb2.GenerateResponse(final=router_pb2.GenerateFinal(message=answer, model="p/m"))


async def _execute(
    router: _Router, dependency_retry_s: float
) -> tuple[RunOutcome, list[common_pb2.RunEvent], float]:
    """One run against ``router``: its outcome, its events and how long it took."""
    started = time.monotonic()
    outcome, events = await execute_run(router, {"worker": {"dependency_retry_s": dependency_retry_s}})
    return outcome, events, time.monotonic() - started


async def test_a_router_lost_mid_answer_is_called_again_and_the_partial_text_is_discarded():
    router = _Router(failures=1)
    outcome, events, _ = await _execute(router, dependency_retry_s=5)

    assert len(router.calls) == 2
    assert [e.WhichOneof("event") for e in events] == [
        "started",
        "model_select",
        "text_delta",
        "model_failover",
        "model_select",
        "text_delta",
    ]
    failover = events[3].model_failover
    assert failover.restart_output and failover.reason == common_pb2.FAILOVER_REASON_NETWORK
    assert outcome.completed.message.content == "Hello"
    assert router.calls[1] - router.calls[0] >= 0.1  # after a backoff


async def test_a_router_away_for_longer_than_the_retry_window_hands_the_run_back():
    router = _Router(failures=1_000)
    outcome, events, elapsed = await _execute(router, dependency_retry_s=1.0)

    assert outcome.released.startswith("infrastructure")
    # Backoffs of 0.1, 0.2, 0.4 s (plus jitter) fit in the window; the next would not.
    assert 3 <= len(router.calls) <= 5
    assert elapsed < 1.5
    # Each call but the last was followed by a failover telling the client to restart.
    assert sum(e.HasField("model_failover") for e in events) == len(router.calls) - 1


async def test_a_verdict_on_the_request_is_not_retried():
    router = _Router(failures=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    outcome, events, _ = await _execute(router, dependency_retry_s=5)

    assert len(router.calls) == 1
    assert outcome.failed.error.code == "INVALID_ARGUMENT"
    assert not any(e.HasField("model_failover") for e in events)
