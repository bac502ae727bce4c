"""The worker hub's batches on real PostgreSQL: messages that wait at once
go to a worker as one stream message, and a worker's batch is handled as if
each of its messages had come alone (runyard.common.batches).

A gateway batches only for a worker whose hello says it reads batches, so
an older worker keeps getting one message at a time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2, worker_hub_pb2
from runyard.common.auth import RunTokenSigner, generate_run_token_keys
from runyard.common.batches import MAX_BATCH_BYTES
from runyard.gateway.events import Broker, RunLog
from runyard.gateway.hub import Dispatcher, Hub
from runyard.gateway.runs import RunStore
from tests.support import run_payload

pytestmark = pytest.mark.timeout(60)


class _Context:
    """What Connect reads of its call: the internal credential."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-runyard-internal", "secret"),)


class _Gateway:
    """A real store, dispatcher and hub (no sessions service: the runs here
    fail, which commits nothing to a session), and one worker's stream."""

    def __init__(self, pool: asyncpg.Pool, max_message_bytes: int = 4 * 1024 * 1024):
        self.store = RunStore(pool, gateway_id="gw", lease_s=30, max_attempts=3, max_queued_per_session=100)
        runlog = RunLog(self.store, Broker())
        self.dispatcher = Dispatcher(
            self.store, RunTokenSigner(generate_run_token_keys()[0]), runlog, poll_interval_s=60
        )
        self.hub = Hub(
            self.store,
            runlog,
            self.dispatcher,
            None,  # type: ignore[arg-type]
            internal_secret="secret",
            handshake_timeout_s=5,
            heartbeat_interval_ms=60_000,
            lease_ms=30_000,
            gateway_id="gw",
            max_message_bytes=max_message_bytes,
        )
        self.requests: asyncio.Queue[worker_hub_pb2.ConnectRequest | None] = asyncio.Queue()

    async def _from_worker(self) -> AsyncIterator[worker_hub_pb2.ConnectRequest]:
        while (message := await self.requests.get()) is not None:
            yield message

    async def connect(self, *, max_batch_bytes: int) -> AsyncIterator[worker_hub_pb2.ConnectResponse]:
        """The worker's hello; returns the gateway's side of the stream, its welcome read."""
        hello = worker_hub_pb2.WorkerHello(worker_id="worker-1", capacity=8, max_batch_bytes=max_batch_bytes)
        self.requests.put_nowait(worker_hub_pb2.ConnectRequest(hello=hello))
        stream = aiter(self.hub.Connect(self._from_worker(), _Context()))  # type: ignore[arg-type]
        welcome = await anext(stream)
        self.welcome = welcome.welcome
        return stream

    async def next_message(self, stream: AsyncIterator[worker_hub_pb2.ConnectResponse]) -> asyncio.Task:
        """The stream's next message, as a task; returns once the gateway
        waits for something to send (the worker is registered then)."""
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert "worker-1" in self.dispatcher.workers and not task.done()
        return task

    def refresh(self, run_ids: list[str], token: str = "t") -> None:
        """One token refresh per run, queued for the worker at once."""
        worker = self.dispatcher.workers["worker-1"]
        for run_id in run_ids:
            worker.send(
                worker_hub_pb2.ConnectResponse(
                    token_refresh=worker_hub_pb2.RunTokenRefresh(run_id=run_id, epoch=1, run_token=token)
                )
            )


def _unbatched(message: worker_hub_pb2.ConnectResponse) -> list[worker_hub_pb2.ConnectResponse]:
    return list(message.batch.messages) if message.HasField("batch") else [message]


async def test_a_worker_that_reads_batches_gets_waiting_messages_as_one_and_its_batch_is_applied_in_order(
    pool,
):
    gateway = _Gateway(pool)
    stream = await gateway.connect(max_batch_bytes=MAX_BATCH_BYTES)
    assert gateway.welcome.max_batch_bytes == MAX_BATCH_BYTES  # the worker may send batches too
    first = await gateway.next_message(stream)

    gateway.refresh(["a", "b", "c"])  # three messages waiting at once

    message = await asyncio.wait_for(first, 5)
    assert message.HasField("batch")  # as one stream message, in their order
    assert [m.token_refresh.run_id for m in message.batch.messages] == ["a", "b", "c"]

    # Three runs assigned, then one batch from the worker: each run's `started`, then its failure.
    ids = await _queue(gateway.store, 3)
    await gateway.dispatcher._dispatch()
    assigned: list[str] = []
    while len(assigned) < len(ids):
        assigned += [m.assign.payload.run_id for m in _unbatched(await asyncio.wait_for(anext(stream), 5))]
    assert sorted(assigned) == sorted(ids)
    batch = worker_hub_pb2.WorkerBatch()
    for run_id in ids:
        epoch = gateway.dispatcher.workers["worker-1"].runs[uuid.UUID(run_id)].epoch
        batch.messages.add().event.CopyFrom(
            worker_hub_pb2.WorkerRunEvent(
                run_id=run_id,
                epoch=epoch,
                worker_seq=1,
                event=common_pb2.RunEvent(started=common_pb2.RunStarted(worker_id="worker-1")),
            )
        )
        batch.messages.add().result.CopyFrom(
            worker_hub_pb2.WorkerRunResult(
                run_id=run_id,
                epoch=epoch,
                failed=common_pb2.RunFailed(error=common_pb2.RunError(code="INTERNAL", message="boom")),
            )
        )
    gateway.requests.put_nowait(worker_hub_pb2.ConnectRequest(batch=batch))
    acks: list[worker_hub_pb2.ResultAck] = []
    while len(acks) < len(ids):
        acks += [m.ack for m in _unbatched(await asyncio.wait_for(anext(stream), 5))]

    assert sorted(ack.run_id for ack in acks) == sorted(ids) and all(ack.accepted for ack in acks)
    rows = await pool.fetch("SELECT status, last_seq FROM gateway.runs WHERE id = any($1::uuid[])", ids)
    # queued (1), the batch's started (2), failed (3): nothing of the batch was lost or reordered.
    assert [(r["status"], r["last_seq"]) for r in rows] == [("failed", 3)] * 3
    gateway.requests.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 5)


async def test_a_worker_that_reads_no_batches_gets_one_message_at_a_time(pool):
    gateway = _Gateway(pool)
    stream = await gateway.connect(max_batch_bytes=0)
    first = await gateway.next_message(stream)

    gateway.refresh(["a", "b", "c"])

    sent = [await asyncio.wait_for(first, 5)] + [await asyncio.wait_for(anext(stream), 5) for _ in range(2)]
    assert [m.WhichOneof("message") for m in sent] == ["token_refresh"] * 3
    assert [m.token_refresh.run_id for m in sent] == ["a", "b", "c"]
    gateway.requests.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 5)


async def _queue(store: RunStore, count: int) -> list[str]:
    """``count`` runs queued, each for a session of its own; their ids."""
    return [
        str((await store.insert(run_payload(), fingerprint=b"", strategy="ENQUEUE"))[0]["id"])
        for _ in range(count)
    ]


async def test_a_gateway_with_a_small_message_limit_asks_for_batches_within_half_of_it(pool):
    gateway = _Gateway(pool, max_message_bytes=64 * 1024)
    stream = await gateway.connect(max_batch_bytes=MAX_BATCH_BYTES)

    # A batch is larger than its messages (a few bytes each): half leaves room for that.
    assert gateway.welcome.max_batch_bytes == 32 * 1024
    gateway.requests.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 5)


async def test_a_worker_offering_huge_batches_still_gets_batches_of_at_most_max_batch_bytes(pool):
    gateway = _Gateway(pool)
    stream = await gateway.connect(max_batch_bytes=2**31)
    first = await gateway.next_message(stream)

    gateway.refresh(["a", "b", "c"], token="t" * (MAX_BATCH_BYTES // 3))  # about 85 KiB each

    sent = [await asyncio.wait_for(first, 5), await asyncio.wait_for(anext(stream), 5)]
    assert [[m.token_refresh.run_id for m in _unbatched(message)] for message in sent] == [["a", "b"], ["c"]]
    gateway.requests.put_nowait(None)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 5)
