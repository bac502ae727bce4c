"""Waiting worker-hub messages sent as one (runyard.common.batches)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from runyard._proto.v1 import common_pb2, worker_hub_pb2
from runyard.common.batches import MAX_BATCH_BYTES, batched


def _event(seq: int, text: str = "x") -> worker_hub_pb2.ConnectRequest:
    return worker_hub_pb2.ConnectRequest(
        event=worker_hub_pb2.WorkerRunEvent(
            run_id="r",
            epoch=1,
            worker_seq=seq,
            event=common_pb2.RunEvent(text_delta=common_pb2.TextDelta(text=text)),
        )
    )


def _wrap(messages: Sequence[worker_hub_pb2.ConnectRequest]) -> worker_hub_pb2.ConnectRequest:
    return worker_hub_pb2.ConnectRequest(batch=worker_hub_pb2.WorkerBatch(messages=messages))


def _seqs(sent: list[worker_hub_pb2.ConnectRequest]) -> list[list[int]]:
    """Each stream message as the worker_seqs it carries."""
    return [
        [m.event.worker_seq for m in message.batch.messages]
        if message.HasField("batch")
        else [message.event.worker_seq]
        for message in sent
    ]


async def _drain(queue: asyncio.Queue[worker_hub_pb2.ConnectRequest | None], **kwargs: object) -> list:
    return [message async for message in batched(queue, _wrap, **kwargs)]  # type: ignore[arg-type]


async def test_messages_waiting_together_go_as_one_batch_in_their_order():
    queue: asyncio.Queue[worker_hub_pb2.ConnectRequest | None] = asyncio.Queue()
    for seq in range(1, 6):
        queue.put_nowait(_event(seq))
    queue.put_nowait(None)

    sent = await _drain(queue, max_bytes=lambda: MAX_BATCH_BYTES)

    assert _seqs(sent) == [[1, 2, 3, 4, 5]]


async def test_a_message_that_finds_the_queue_empty_goes_alone_at_once():
    queue: asyncio.Queue[worker_hub_pb2.ConnectRequest | None] = asyncio.Queue()
    stream = aiter(batched(queue, _wrap, max_bytes=lambda: MAX_BATCH_BYTES))
    queue.put_nowait(_event(1))

    first = await asyncio.wait_for(anext(stream), 1)  # not held back for a second one

    assert not first.HasField("batch") and first.event.worker_seq == 1
    queue.put_nowait(_event(2))
    queue.put_nowait(_event(3))
    assert _seqs([await anext(stream)]) == [[2, 3]]


async def test_a_peer_that_reads_no_batches_gets_every_message_alone():
    queue: asyncio.Queue[worker_hub_pb2.ConnectRequest | None] = asyncio.Queue()
    for seq in range(1, 4):
        queue.put_nowait(_event(seq))
    queue.put_nowait(None)

    sent = await _drain(queue, max_bytes=lambda: 0)

    assert _seqs(sent) == [[1], [2], [3]]


async def test_batches_stop_at_the_message_and_byte_limits_and_a_large_message_goes_alone():
    queue: asyncio.Queue[worker_hub_pb2.ConnectRequest | None] = asyncio.Queue()
    for seq in range(1, 8):
        queue.put_nowait(_event(seq))
    queue.put_nowait(None)
    assert _seqs(await _drain(queue, max_bytes=lambda: MAX_BATCH_BYTES, max_messages=3)) == [
        [1, 2, 3],
        [4, 5, 6],
        [7],
    ]

    small = _event(1).ByteSize()
    for seq, text in [(1, "x"), (2, "x"), (3, "y" * 1000), (4, "x"), (5, "x")]:
        queue.put_nowait(_event(seq, text))
    queue.put_nowait(None)
    sent = await _drain(queue, max_bytes=lambda: 3 * small)
    # The large one neither joins the batch before it nor holds back the ones after it.
    assert _seqs(sent) == [[1, 2], [3], [4, 5]]
