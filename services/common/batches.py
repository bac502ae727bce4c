"""Stream messages that are already waiting, sent as one (the worker hub, the router's answers).

A worker and its gateway talk over one bidirectional gRPC stream; each
side puts what it has to say on an :class:`asyncio.Queue` and one writer
sends it. Under load several messages wait at once (a run's ``started`` and
``model_select``, the events of many runs, results and acks): each stream
message costs a write on one side and a read on the other, so those that
are waiting go out together as one batch message (``WorkerBatch``,
``HubBatch``), which the peer handles in order exactly as if each had come
alone. Nothing waits for a batch to fill: a message that finds the queue
empty goes alone, at once, as it did before batches.

The router's ``Generate`` stream does the same with the responses of one
answer (``GenerateBatch``; see :func:`runyard.router.service.coalesce_ready_deltas`),
for a caller whose ``GenerateRequest.max_batch_bytes`` says it reads them.

A side batches only when its peer said how large a batch it reads
(``WorkerHello.max_batch_bytes``, ``HubWelcome.max_batch_bytes``; the
gateway's is within its ``gateway.max_message_bytes``), so a worker and a
gateway of different versions still talk; neither sends a batch larger than
:data:`MAX_BATCH_BYTES`, whatever its peer offers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from google.protobuf.message import Message

from runyard._proto.v1 import router_pb2

__all__ = ["MAX_BATCH_BYTES", "MAX_BATCH_MESSAGES", "batched", "generate_responses"]

#: At most this many messages in one batch.
MAX_BATCH_MESSAGES = 256
#: The largest batch a side offers to read (its ``max_batch_bytes``), in
#: serialized bytes of the messages in it: well under gRPC's default 4 MiB
#: receive limit. A message larger than the peer's limit goes alone, as
#: without batches.
MAX_BATCH_BYTES = 256 * 1024

M = TypeVar("M", bound=Message)


async def batched(
    queue: asyncio.Queue[M | None],
    wrap: Callable[[Sequence[M]], M],
    *,
    max_bytes: Callable[[], int],
    max_messages: int = MAX_BATCH_MESSAGES,
) -> AsyncIterator[M]:
    """The messages put on ``queue``, in order, until ``None`` is taken.

    ``max_bytes()`` is the peer's ``max_batch_bytes`` (0 while unknown, or
    when it reads no batches). When it is above 0 and more than one message
    is waiting, the waiting ones (at most ``max_messages``, while their
    serialized size stays within ``max_bytes()``) are yielded as one
    ``wrap(messages)``; a lone message, or one that is too large, is
    yielded as it is. Nothing is held back to wait for more: the batch is
    what was queued when the previous message had been sent.
    """
    pending: M | None = None
    while True:
        message = pending if pending is not None else await queue.get()
        pending = None
        if message is None:
            return
        limit = max_bytes()
        if queue.empty() or limit <= 0:
            yield message
            continue
        batch = [message]
        size = message.ByteSize()
        ended = False
        while size < limit and len(batch) < max_messages and not queue.empty():
            following = queue.get_nowait()
            if following is None:
                ended = True
                break
            size += following.ByteSize()
            if size > limit:
                pending = following  # first of the next batch
                break
            batch.append(following)
        yield batch[0] if len(batch) == 1 else wrap(batch)
        if ended:
            return


def generate_responses(message: router_pb2.GenerateResponse) -> Sequence[router_pb2.GenerateResponse]:
    """The responses one ``Generate`` stream message carries, in order: those
    of a ``GenerateBatch`` (what the router had ready at once), else the
    message itself."""
    return message.batch.responses if message.HasField("batch") else (message,)
