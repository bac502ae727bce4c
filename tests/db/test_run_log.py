"""The gateway's run log (runyard.gateway.events.RunLog) on real PostgreSQL.

Found by `test_sigterm_of_each_service_under_load_loses_and_duplicates_nothing`
(a gateway that never exited after SIGTERM, about once in 30 runs beside a
CPU hog; a faulthandler dump showed the event loop spinning in
``RunLog._run``): while an explicit flush (a worker's disconnect, the
gateway's close) was writing a run's events, the flusher's timer came due for
that same run; it counted the run as due but left it out of the write (it
was being flushed), so it looped at once, never awaiting: the whole gateway
froze, the flush's own write included.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2
from runyard.common.auth import RunTokenSigner, generate_run_token_keys
from runyard.gateway.events import Broker, EventChunk, RunLog
from runyard.gateway.hub import Dispatcher, WorkerConn
from runyard.gateway.runs import RunStore
from tests.support import run_payload

pytestmark = pytest.mark.timeout(20)


class _HeldStore(RunStore):
    """The real store, whose event writes can be held back (a slow database)."""

    def __init__(self, pool: asyncpg.Pool):
        super().__init__(pool, gateway_id="gw", lease_s=30, max_attempts=3, max_queued_per_session=100)
        self.hold = False
        self.writing = asyncio.Event()
        self.release = asyncio.Event()

    async def write_events(self, chunks: list[EventChunk]) -> dict[uuid.UUID, bool]:
        if self.hold:
            self.writing.set()
            await self.release.wait()
        return await super().write_events(chunks)


async def _running(store: RunStore, runlog: RunLog) -> tuple[uuid.UUID, int]:
    """A run queued and claimed for a worker here (its run-log stream open): (id, epoch)."""
    (row, *_) = await store.insert(run_payload(), fingerprint=b"", strategy="ENQUEUE")
    dispatcher = Dispatcher(store, RunTokenSigner(generate_run_token_keys()[0]), runlog, poll_interval_s=60)
    worker = WorkerConn("worker-1", 4)
    dispatcher.workers[worker.worker_id] = worker
    await dispatcher._dispatch()
    return row["id"], worker.runs[row["id"]].epoch


async def test_the_flusher_keeps_the_loop_running_while_a_flush_writes_the_run_it_finds_due(pool):
    store = _HeldStore(pool)
    runlog = RunLog(store, Broker(), flush_interval_s=0.05)
    run_id, epoch = await _running(store, runlog)
    runlog.start()
    try:
        delta = common_pb2.RunEvent(text_delta=common_pb2.TextDelta(text="hi"))
        runlog.append(run_id, epoch, delta, worker_seq=1)
        store.hold = True
        flush = asyncio.create_task(runlog.flush([run_id]))  # as when the run's worker disconnects
        await asyncio.wait_for(store.writing.wait(), 5)

        # The flusher's timer comes due for the run while that write is in flight.
        rounds = 0
        due = runlog._due

        def counted() -> list:  # type: ignore[type-arg]
            nonlocal rounds
            rounds += 1
            return due()

        runlog._due = counted  # type: ignore[method-assign]
        await asyncio.sleep(0.3)  # (it never returned: the loop spun in RunLog._run)
        assert rounds <= 3  # the flusher waits for the write instead of spinning on the run
        runlog.append(run_id, epoch, delta, worker_seq=2)  # an event arriving meanwhile
        store.release.set()
        await asyncio.wait_for(flush, 5)

        # Both events stored (the flush goes on until the run has nothing pending).
        for _ in range(50):
            if await pool.fetchval("SELECT last_seq FROM gateway.runs WHERE id = $1", run_id) == 3:
                break
            await asyncio.sleep(0.05)
        assert await pool.fetchval("SELECT last_seq FROM gateway.runs WHERE id = $1", run_id) == 3
    finally:
        store.release.set()
        await runlog.close()
