"""The router merges text deltas that are already waiting (never waiting for one)."""

from __future__ import annotations

import asyncio

import pytest

from runyard._proto.v1 import common_pb2, router_pb2
from runyard.common.errors import Unavailable
from runyard.router.service import coalesce_ready_deltas

pytestmark = pytest.mark.timeout(10)


def delta(text: str) -> router_pb2.GenerateResponse:
    return router_pb2.GenerateResponse(text_delta=common_pb2.TextDelta(text=text))


def select(model: str) -> router_pb2.GenerateResponse:
    return router_pb2.GenerateResponse(model_select=common_pb2.ModelSelect(model=model))


def shape(responses: list[router_pb2.GenerateResponse]) -> list[str]:
    return [r.text_delta.text if r.HasField("text_delta") else r.WhichOneof("event") for r in responses]


async def test_a_burst_travels_as_one_message_and_other_events_keep_their_place():
    async def burst():
        yield select("p/m")
        for word in ("a ", "b ", "c "):
            yield delta(word)
        yield router_pb2.GenerateResponse(usage=common_pb2.Usage(output_tokens=3))
        yield delta("d")

    out = [r async for r in coalesce_ready_deltas(burst())]
    # The first delta may go before the rest arrived; the rest go together.
    assert "".join(r.text_delta.text for r in out if r.HasField("text_delta")) == "a b c d"
    assert shape(out)[0] == "model_select" and shape(out)[-2:] == ["usage", "d"]
    assert len(out) <= 4


async def test_deltas_that_arrive_apart_go_apart_without_waiting():
    async def slow():
        for word in ("a ", "b ", "c "):
            yield delta(word)
            await asyncio.sleep(0.05)

    loop = asyncio.get_running_loop()
    started = loop.time()
    seen: list[tuple[str, float]] = []
    async for response in coalesce_ready_deltas(slow()):
        seen.append((response.text_delta.text, loop.time() - started))
    assert [text for text, _ in seen] == ["a ", "b ", "c "]
    assert seen[0][1] < 0.04  # the first delta did not wait for the second


async def test_an_error_arrives_after_what_came_before_it():
    async def failing():
        yield delta("partial")
        raise Unavailable("provider went away")

    out = []
    with pytest.raises(Unavailable):
        async for response in coalesce_ready_deltas(failing()):
            out.append(response)
    assert shape(out) == ["partial"]


async def test_a_caller_that_leaves_stops_the_provider_stream_at_once():
    stopped = asyncio.Event()

    async def endless():
        try:
            while True:
                yield delta("x")
                await asyncio.sleep(0.01)
        finally:
            stopped.set()

    stream = coalesce_ready_deltas(endless())
    await anext(stream)
    await stream.aclose()
    await asyncio.wait_for(stopped.wait(), 1)
