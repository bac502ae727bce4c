"""The router merges text deltas that are already waiting and, for a caller
that reads batches, sends whatever is ready as one message (never waiting
for more)."""

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


def usage(tokens: int) -> router_pb2.GenerateResponse:
    return router_pb2.GenerateResponse(usage=common_pb2.Usage(output_tokens=tokens))


def final(text: str) -> router_pb2.GenerateResponse:
    message = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content=text)
    return router_pb2.GenerateResponse(final=router_pb2.GenerateFinal(message=message, model="p/m"))


def unpacked(messages: list[router_pb2.GenerateResponse]) -> list[router_pb2.GenerateResponse]:
    return [r for m in messages for r in (m.batch.responses if m.HasField("batch") else [m])]


async def test_a_caller_that_reads_batches_gets_what_was_ready_in_one_message_in_order():
    async def answer():
        yield select("p/m")
        for word in ("a ", "b ", "c"):
            yield delta(word)
        yield usage(3)
        yield final("a b c")

    out = [r async for r in coalesce_ready_deltas(answer(), max_batch_bytes=64 * 1024)]
    # Everything was ready at once: one stream message instead of four
    # (select, the merged deltas, usage, final); nothing nested.
    assert len(out) == 1 and out[0].HasField("batch")
    assert shape(unpacked(out)) == ["model_select", "a b c", "usage", "final"]
    assert not any(r.HasField("batch") for r in unpacked(out))


async def test_what_arrives_later_is_not_held_back_for_a_batch():
    async def answer():
        yield select("p/m")
        await asyncio.sleep(0.05)  # the provider call
        yield delta("a")
        await asyncio.sleep(0.05)
        yield delta("b")
        yield usage(2)
        yield final("ab")

    loop = asyncio.get_running_loop()
    started = loop.time()
    out: list[tuple[router_pb2.GenerateResponse, float]] = []
    async for response in coalesce_ready_deltas(answer(), max_batch_bytes=64 * 1024):
        out.append((response, loop.time() - started))
    messages = [response for response, _ in out]
    assert shape(unpacked(messages)) == ["model_select", "a", "b", "usage", "final"]
    assert out[0][1] < 0.04  # the model choice went before the provider answered
    assert shape(messages[:2]) == ["model_select", "a"]  # the first delta went alone, at once
    assert messages[2].HasField("batch")  # the rest came together and went together


async def test_batches_stay_within_the_callers_limit():
    responses = [select("p/m"), usage(7), final("x" * 40)]
    sizes = [r.ByteSize() for r in responses]
    limit = sizes[0] + sizes[1]  # the first two fit, the final does not

    async def answer():
        for response in responses:
            yield response

    out = [r async for r in coalesce_ready_deltas(answer(), max_batch_bytes=limit)]
    assert [m.WhichOneof("event") for m in out] == ["batch", "final"]
    assert shape(list(out[0].batch.responses)) == ["model_select", "usage"]
    assert all(m.ByteSize() <= limit + 8 for m in out if m.HasField("batch"))  # + the batch's own framing


async def test_an_error_after_a_batch_comes_after_what_was_sent():
    async def failing():
        yield select("p/m")
        yield delta("partial")
        raise Unavailable("provider went away")

    out = []
    with pytest.raises(Unavailable):
        async for response in coalesce_ready_deltas(failing(), max_batch_bytes=64 * 1024):
            out.append(response)
    assert shape(unpacked(out)) == ["model_select", "partial"]
