"""The gateway's dispatcher on real PostgreSQL: the worker slots a claim in
flight or a result being applied holds, as seen by a message arriving then.

A message for an idle session is claimed as it is queued when a worker here
has a free slot; otherwise it waits in the queue for the dispatcher (another
transaction, and a transcript read by the worker). Found with ``runyard bench
stack`` (issue 10): at N = 32 sessions on a worker of capacity 32, a quarter
of the runs went through the queue, because every dispatch reserved all the
free slots while it claimed, and a run whose result was being applied still
held its slot when its client, told the run had ended, sent its next message.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2, worker_hub_pb2
from runyard.common import db
from runyard.common.auth import RunTokenSigner, generate_run_token_keys
from runyard.gateway.events import Broker, RunLog
from runyard.gateway.hub import Dispatcher, Hub, WorkerConn
from runyard.gateway.runs import RunStore
from tests.support import run_payload

pytestmark = pytest.mark.timeout(60)


class _WatchedStore(RunStore):
    """The real store; records what a message arriving during a claim or a
    result's ending would find free on the worker."""

    def __init__(self, pool: asyncpg.Pool, dispatcher: Dispatcher | None = None):
        super().__init__(pool, gateway_id="gw", lease_s=30, max_attempts=3, max_queued_per_session=100)
        self.dispatcher = dispatcher
        self.claims: list[tuple[int, int]] = []  # (slots claimed for, slots still free meanwhile)
        self.free_while_finishing: list[int] = []
        #: Hold the first ``finish`` back this long (so a second copy of a result ends the run first).
        self.first_finish_delay_s = 0.0

    def _free(self) -> int:
        assert self.dispatcher is not None
        return sum(w.free for w in self.dispatcher.workers.values())

    async def claim(self, worker_ids):  # type: ignore[no-untyped-def]
        self.claims.append((len(worker_ids), self._free()))
        return await super().claim(worker_ids)

    async def finish(self, conn, run_id, **kwargs):  # type: ignore[no-untyped-def]
        self.free_while_finishing.append(self._free())
        if len(self.free_while_finishing) == 1:
            await asyncio.sleep(self.first_finish_delay_s)
        return await super().finish(conn, run_id, **kwargs)


def _dispatcher(store: _WatchedStore, capacity: int) -> tuple[Dispatcher, WorkerConn, RunLog]:
    runlog = RunLog(store, Broker())
    dispatcher = Dispatcher(store, RunTokenSigner(generate_run_token_keys()[0]), runlog, poll_interval_s=60)
    store.dispatcher = dispatcher
    worker = WorkerConn("worker-1", capacity)
    dispatcher.workers[worker.worker_id] = worker
    return dispatcher, worker, runlog


def _hub(dispatcher: Dispatcher) -> Hub:
    """The gateway's side of worker streams, for results of failed runs
    (which commit nothing to a session, so no sessions service)."""
    return Hub(
        dispatcher.store,
        dispatcher.runlog,
        dispatcher,
        None,  # type: ignore[arg-type]
        internal_secret="secret",
        handshake_timeout_s=5,
        heartbeat_interval_ms=1000,
        lease_ms=30_000,
        gateway_id="gw",
        max_message_bytes=4 * 1024 * 1024,
    )


def _failed(row: db.Row, epoch: int) -> worker_hub_pb2.WorkerRunResult:
    return worker_hub_pb2.WorkerRunResult(
        run_id=str(row["id"]),
        epoch=epoch,
        failed=common_pb2.RunFailed(error=common_pb2.RunError(code="INTERNAL", message="boom")),
    )


async def _queue(store: RunStore, count: int) -> list[db.Row]:
    """``count`` runs queued, each for a session of its own."""
    return [(await store.insert(run_payload(), fingerprint=b"", strategy="ENQUEUE"))[0] for _ in range(count)]


async def test_a_claim_in_flight_leaves_the_other_free_slots_to_new_messages(pool):
    store = _WatchedStore(pool)
    dispatcher, worker, _ = _dispatcher(store, capacity=16)
    await _queue(store, 10)

    await dispatcher._dispatch()

    # Batches of 1, 2, 4, then 8 (3 runs left): while each claim was in
    # flight, the slots it did not hold were still free for a message.
    assert store.claims == [(1, 15), (2, 13), (4, 9), (8, 1)]
    assert len(worker.runs) == 10 and worker.free == 6
    assert await pool.fetchval("SELECT count(*) FROM gateway.runs WHERE status = 'running'") == 10


async def test_a_deep_queue_is_claimed_in_batches_that_double_up_to_64(pool):
    store = _WatchedStore(pool)
    dispatcher, worker, _ = _dispatcher(store, capacity=200)
    await _queue(store, 150)

    await dispatcher._dispatch()

    assert [size for size, _ in store.claims] == [1, 2, 4, 8, 16, 32, 64, 64]
    assert len(worker.runs) == 150


async def test_a_run_whose_result_is_being_applied_no_longer_holds_its_slot(pool):
    store = _WatchedStore(pool)
    dispatcher, worker, _ = _dispatcher(store, capacity=1)
    (row,) = await _queue(store, 1)
    await dispatcher._dispatch()
    assert worker.free == 0
    state = worker.runs[row["id"]]
    hub = _hub(dispatcher)
    result = _failed(row, state.epoch)

    await hub._on_result(worker, result)

    # While the run was being ended (its client may already hear of it), the
    # worker's one slot was free for the session's next message.
    assert store.free_while_finishing == [1]
    assert worker.runs == {} and worker.free == 1
    assert await pool.fetchval("SELECT status FROM gateway.runs WHERE id = $1", row["id"]) == "failed"
    sent = [worker.outbox.get_nowait() for _ in range(worker.outbox.qsize())]
    assert [m.WhichOneof("message") for m in sent if m is not None] == ["assign", "ack"]
    assert sent[-1] is not None and sent[-1].ack.accepted


async def test_a_result_sent_twice_frees_its_slot_once(pool):
    store = _WatchedStore(pool)
    dispatcher, worker, _ = _dispatcher(store, capacity=1)
    (row,) = await _queue(store, 1)
    await dispatcher._dispatch()
    hub = _hub(dispatcher)
    result = _failed(row, worker.runs[row["id"]].epoch)
    free_at_acks: list[int] = []
    send = worker.send

    def acked(message: worker_hub_pb2.ConnectResponse) -> None:
        free_at_acks.append(worker.free)
        send(message)

    worker.send = acked  # type: ignore[method-assign]

    # A worker that reconnects sends the results it has no answer for again;
    # both copies may be applied at once, and the second may end the run first.
    store.first_finish_delay_s = 0.2
    await asyncio.gather(hub._on_result(worker, result), hub._on_result(worker, result))

    # Never more free slots than the worker has, while either copy was applied.
    assert store.free_while_finishing and max(store.free_while_finishing) == 1
    assert len(free_at_acks) == 2 and max(free_at_acks) == 1
    assert worker.runs == {} and worker.free == 1
