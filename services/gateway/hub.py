"""The worker hub: workers connect, receive runs, stream events and results.

A worker opens ``WorkerHubService/Connect`` and must send ``hello`` within
``gateway.handshake_timeout_ms``. The :class:`Dispatcher` claims queued runs
for connected workers with free capacity (woken by LISTEN/NOTIFY, with a
polling fallback), several per statement, and sweeps lapsed leases; a run
sent to this gateway for a session with no active run is claimed as it is
queued (:meth:`Dispatcher.reserve`). Events go to the run log
(:mod:`runyard.gateway.events`). Results are accepted only from the worker
holding the run's current epoch; a completion is final once sessions has
committed the run's messages (``CommitRun``), in the transaction that ends
the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypedDict

import grpc

from runyard._proto.v1 import common_pb2, sessions_pb2, sessions_pb2_grpc, worker_hub_pb2, worker_hub_pb2_grpc
from runyard.common import metrics, tracing
from runyard.common.auth import RunTokenSigner, check_internal, internal_metadata
from runyard.common.batches import MAX_BATCH_BYTES, batched
from runyard.common.clients import call
from runyard.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    RunyardError,
    Unauthenticated,
)
from runyard.common.faults import retry_transient, transient_database_error
from runyard.common.grpctypes import ServicerContext
from runyard.common.server import settle_before_reject
from runyard.gateway.events import PUBLISH_WINDOW, RunLog
from runyard.gateway.run_status import TERMINAL, RunStatus
from runyard.gateway.runs import CANCEL_CHANNEL, QUEUE_CHANNEL, Claim, RunStore, event_bytes

if TYPE_CHECKING:
    from runyard.gateway.tool_results import ToolResults

#: Errors of a commit that end the run failed (the transcript refuses it);
#: anything else (the sessions service unreachable) leaves the result to be
#: sent again.
_COMMIT_REFUSALS = frozenset(
    {
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)

#: Slots the first claim of a dispatch round reserves; each full claim
#: doubles the next, up to the largest (see Dispatcher._dispatch).
_FIRST_CLAIM_BATCH = 1
_MAX_CLAIM_BATCH = 64

__all__ = ["Dispatcher", "Hub", "WorkerConn"]

log = logging.getLogger(__name__)


def _hub_batch(messages: Sequence[worker_hub_pb2.ConnectResponse]) -> worker_hub_pb2.ConnectResponse:
    return worker_hub_pb2.ConnectResponse(batch=worker_hub_pb2.HubBatch(messages=messages))


class _FinishArgs(TypedDict):
    """What every way of ending a run passes on to :meth:`RunStore.finish`."""

    epoch: int
    info: Mapping[str, object] | None
    pending: Sequence[bytes]
    expected_last_seq: int | None


@dataclass(slots=True)
class RunState:
    """A run assigned to a worker on this gateway; ``info`` holds what its
    lifecycle events are built from (see :class:`Claim`)."""

    epoch: int
    org_id: str
    session_id: str
    agent_id: str
    info: dict[str, object] = field(default_factory=dict)
    #: The run's trace context (RunPayload.trace_context): its commit joins the trace.
    trace_context: dict[str, str] = field(default_factory=dict)
    claimed_at: float = field(default_factory=time.monotonic)
    #: When the worker's current run token was signed (monotonic; 0 = unknown, e.g. re-attached).
    token_signed_at: float = 0.0
    #: Its result is being applied: the worker is done executing it, so its
    #: slot is free (see WorkerConn.free).
    finishing: bool = False


class WorkerConn:
    """One connected worker."""

    def __init__(self, worker_id: str, capacity: int):
        self.worker_id = worker_id
        self.capacity = capacity
        self.runs: dict[uuid.UUID, RunState] = {}
        self.outbox: asyncio.Queue[worker_hub_pb2.ConnectResponse | None] = asyncio.Queue()
        self.draining = False
        #: Slots promised to claims in flight (a dispatch, or a run being queued here).
        self.reserved = 0

    @property
    def free(self) -> int:
        """Slots for new runs: capacity less the runs executing and the reservations.

        A run whose result is being applied (``RunState.finishing``) no longer
        executes: its client may learn that it ended (from another gateway's
        or this one's NOTIFY) before the result's handling returns here, and
        its next message must find the slot free, or it is queued instead of
        claimed. (Counted over ``runs``, at most the worker's capacity.)
        """
        executing = sum(1 for state in self.runs.values() if not state.finishing)
        return 0 if self.draining else max(self.capacity - executing - self.reserved, 0)

    def send(self, message: worker_hub_pb2.ConnectResponse) -> None:
        self.outbox.put_nowait(message)


class Dispatcher:
    """Claims queued runs for workers with free capacity and sweeps leases."""

    def __init__(self, store: RunStore, signer: RunTokenSigner, runlog: RunLog, *, poll_interval_s: float):
        self.store = store
        self.signer = signer
        self.runlog = runlog
        self.poll_interval_s = poll_interval_s
        self.workers: dict[str, WorkerConn] = {}
        self._wake = asyncio.Event()
        #: Whether queued runs may be waiting (False once a claim found fewer than it had room for).
        self._maybe_queued = True
        #: Bumped by every signal that runs were queued (see _dispatch).
        self._signals = 0
        self.stopping = False
        #: Called with each claimed run's payload before it is assigned; may
        #: add input messages (background-task notifications, see
        #: runyard.gateway.tasks). A failure is logged and the run goes as is.
        self.prepare: Callable[[Claim, common_pb2.RunPayload], Awaitable[None]] | None = None

    def wake(self, *_: object) -> None:
        """Dispatch soon: runs may have been queued."""
        self._signals += 1
        self._wake.set()

    def capacity_freed(self) -> None:
        """A worker slot came free: dispatch only if the queue may hold runs
        (a claim that found nothing left is not repeated for every run that
        ends, which would be a transaction per run)."""
        if self._maybe_queued:
            self._wake.set()

    def on_notify(self, channel: str, payload: str) -> None:
        if channel == QUEUE_CHANNEL:
            self.wake()

    def update_gauges(self) -> None:
        metrics.WORKERS_CONNECTED.set(len(self.workers))
        metrics.WORKER_FREE_CAPACITY.set(sum(w.free for w in self.workers.values()))

    def reserve(self) -> WorkerConn | None:
        """A slot of the connected worker with the most room, held until
        :meth:`unreserve`, for a run about to be queued and claimed at once
        (None when no worker has room or this gateway is stopping)."""
        if self.stopping:
            return None
        worker = max(self.workers.values(), key=lambda w: w.free, default=None)
        if worker is None or worker.free <= 0:
            return None
        worker.reserved += 1
        return worker

    @staticmethod
    def unreserve(worker: WorkerConn, count: int = 1) -> None:
        worker.reserved = max(worker.reserved - count, 0)

    async def run(self) -> None:
        last_sweep = 0.0
        while not self.stopping:
            try:
                async with asyncio.timeout(self.poll_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                self._maybe_queued = True  # the polling fallback: look anyway
            self._wake.clear()
            if self.stopping:
                return
            try:
                if time.monotonic() - last_sweep >= self.poll_interval_s:
                    last_sweep = time.monotonic()
                    if await self.store.requeue(None, window=PUBLISH_WINDOW):
                        self._wake.set()
                await self._dispatch()
            except Exception:  # noqa: BLE001 - the loop must survive DB hiccups
                log.exception("dispatch failed")
                await asyncio.sleep(min(self.poll_interval_s, 1.0))

    def _slots(self, limit: int) -> list[WorkerConn]:
        """Free slots, one entry per slot, spread across workers (most room first)."""
        free = {w.worker_id: w.free for w in self.workers.values() if w.free > 0}
        slots: list[WorkerConn] = []
        while free and len(slots) < limit:
            for worker_id in sorted(free, key=lambda k: -free[k]):
                slots.append(self.workers[worker_id])
                free[worker_id] -= 1
                if free[worker_id] == 0:
                    del free[worker_id]
                if len(slots) >= limit:
                    break
        return slots

    async def _dispatch(self) -> None:
        """Claim queued runs for free slots until the queue is empty or no slot is left.

        The first claim of a round reserves at most ``_FIRST_CLAIM_BATCH``
        slots and each full claim doubles the next (up to
        ``_MAX_CLAIM_BATCH``): slots reserved for a claim in flight are not
        free to messages arriving meanwhile, which would then be queued
        instead of claimed as they are inserted (and need a claim of their
        own). A deep queue still drains in batches of 64 after a few rounds.
        """
        batch = _FIRST_CLAIM_BATCH
        while not self.stopping:
            slots = self._slots(batch)
            if not slots:
                return
            for worker in slots:
                worker.reserved += 1
            signals = self._signals
            self._maybe_queued = True
            try:
                claims = await self.store.claim([w.worker_id for w in slots])
                for claim in claims:
                    await self.assign(self.workers.get(claim.worker_id), claim)
            finally:
                for worker in slots:
                    self.unreserve(worker)
            self.update_gauges()
            if len(claims) < len(slots):
                if self._signals == signals:  # nothing was queued while we claimed
                    self._maybe_queued = False
                return
            batch = min(batch * 2, _MAX_CLAIM_BATCH)

    async def assign(
        self,
        worker: WorkerConn | None,
        claim: Claim,
        payload: common_pb2.RunPayload | None = None,
        transcript: sessions_pb2.GetTranscriptResponse | None = None,
    ) -> None:
        """Send a claimed run to its worker: run token, run log stream,
        assignment (with ``transcript`` when the caller knows it is current).
        A worker that left meanwhile gets nothing: the run goes straight back
        to the queue."""
        if worker is None or self.workers.get(worker.worker_id) is not worker:
            await self.store.requeue([(claim.run_id, claim.epoch)], count_attempt=False)
            return
        if claim.first_claim:
            wait = time.time() - claim.created_at.timestamp()
            metrics.RUNS_QUEUE_WAIT_SECONDS.observe(max(wait, 0.0))
        payload = payload or common_pb2.RunPayload.FromString(claim.payload)
        if self.prepare is not None:
            try:
                await self.prepare(claim, payload)
            except Exception:  # noqa: BLE001 - the run goes without the extra input
                log.exception("preparing run %s failed", claim.run_id)
            if self.workers.get(worker.worker_id) is not worker:  # it left while we prepared
                await self.store.requeue([(claim.run_id, claim.epoch)], count_attempt=False)
                return
        payload.epoch = claim.epoch
        payload.attempt = claim.attempt
        payload.run_token = self.signer.sign(
            org_id=claim.org_id,
            agent_id=claim.agent_id,
            session_id=str(claim.session_id),
            run_id=str(claim.run_id),
            epoch=claim.epoch,
        )
        worker.runs[claim.run_id] = RunState(
            claim.epoch,
            claim.org_id,
            str(claim.session_id),
            claim.agent_id,
            info=claim.row,
            trace_context=dict(payload.trace_context),
            token_signed_at=time.monotonic(),
        )
        self.runlog.open(claim.run_id, str(claim.session_id), claim.epoch, claim.last_seq, info=claim.row)
        assignment = worker_hub_pb2.RunAssignment(payload=payload)
        if claim.continuation:  # it continues after client tool results (runyard.gateway.tool_results)
            assignment.continuation.ParseFromString(claim.continuation)
        elif transcript is not None:
            assignment.transcript.CopyFrom(transcript)
        worker.send(worker_hub_pb2.ConnectResponse(assign=assignment))

    def find(self, run_id: uuid.UUID) -> tuple[WorkerConn, RunState] | None:
        for worker in self.workers.values():
            state = worker.runs.get(run_id)
            if state is not None:
                return worker, state
        return None

    def cancel_local(self, run_id: uuid.UUID, reason: str = "CANCELLED") -> bool:
        """Tell the worker executing ``run_id`` (if it is connected here) to stop."""
        found = self.find(run_id)
        if found is None:
            return False
        worker, state = found
        worker.send(
            worker_hub_pb2.ConnectResponse(
                cancel=worker_hub_pb2.RunCancel(run_id=str(run_id), epoch=state.epoch, reason=reason)
            )
        )
        return True

    def on_cancel_notify(self, channel: str, payload: str) -> None:
        if channel != CANCEL_CHANNEL:
            return
        run_text, _, _rest = payload.partition(":")
        with contextlib.suppress(ValueError):
            self.cancel_local(uuid.UUID(run_text))


class Hub(worker_hub_pb2_grpc.WorkerHubServiceServicer):
    """``runyard.v1.WorkerHubService``: the gateway side of worker streams.

    ``max_message_bytes`` is the internal listener's receive limit
    (``gateway.max_message_bytes``): a worker's batches stay within half of
    it (HubWelcome.max_batch_bytes, at most
    :data:`runyard.common.batches.MAX_BATCH_BYTES`).
    """

    def __init__(
        self,
        store: RunStore,
        runlog: RunLog,
        dispatcher: Dispatcher,
        sessions: sessions_pb2_grpc.SessionServiceStub,
        *,
        internal_secret: str,
        handshake_timeout_s: float,
        heartbeat_interval_ms: int,
        lease_ms: int,
        gateway_id: str,
        max_message_bytes: int,
        tools: ToolResults | None = None,
    ):
        self.store = store
        self.runlog = runlog
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.internal_secret = internal_secret
        self.handshake_timeout_s = handshake_timeout_s
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.lease_ms = lease_ms
        self.gateway_id = gateway_id
        #: The largest worker batch this gateway reads (its messages' serialized bytes).
        self.max_batch_bytes = min(MAX_BATCH_BYTES, max_message_bytes // 2)
        self.shutting_down = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: Client-side tools (runyard.gateway.tool_results.ToolResults): a
        #: ``requires_action`` result pauses its run (None: not handled).
        self.tools = tools

    async def Connect(
        self,
        request_iterator: AsyncIterator[worker_hub_pb2.ConnectRequest],
        context: ServicerContext,
    ) -> AsyncIterator[worker_hub_pb2.ConnectResponse]:
        try:
            check_internal(context, self.internal_secret)
        except Unauthenticated:
            await settle_before_reject(request_iterator)
            raise
        requests = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(requests), self.handshake_timeout_s)
        except TimeoutError:
            log.warning("worker sent no hello within %.1fs; disconnecting", self.handshake_timeout_s)
            raise DeadlineExceeded(
                f"no hello within the handshake timeout ({self.handshake_timeout_s * 1000:.0f} ms, "
                "gateway.handshake_timeout_ms)",
                reason="HANDSHAKE_TIMEOUT",
            ) from None
        except StopAsyncIteration:
            return
        if first.WhichOneof("message") != "hello":
            raise InvalidArgument("the first message on the hub must be hello", reason="HELLO_REQUIRED")
        hello = first.hello
        if not hello.worker_id or hello.capacity == 0:
            raise InvalidArgument("hello needs a worker_id and a capacity > 0", reason="INVALID_HELLO")
        if hello.worker_id in self.dispatcher.workers:
            raise FailedPrecondition(
                f"worker {hello.worker_id!r} is already connected", reason="WORKER_ALREADY_CONNECTED"
            )
        worker = WorkerConn(hello.worker_id, hello.capacity)
        leases = [(uuid.UUID(r.run_id), r.epoch) for r in hello.active_runs]
        accepted = {claim.run_id: claim for claim in await self.store.reattach(worker.worker_id, leases)}
        welcome = worker_hub_pb2.HubWelcome(
            gateway_id=self.gateway_id,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            lease_ms=self.lease_ms,
            max_batch_bytes=self.max_batch_bytes,
        )
        for run_id, epoch in leases:
            claim = accepted.get(run_id)
            if claim is not None:
                worker_seq = int(claim.row["worker_seq"])
                welcome.accepted_runs.add(run_id=str(run_id), epoch=epoch, worker_seq=worker_seq)
                worker.runs[run_id] = RunState(
                    claim.epoch, claim.org_id, str(claim.session_id), claim.agent_id, info=claim.row
                )
                # The worker resends its events after worker_seq; they get
                # the seqs they had (numbered from the stored last_seq).
                self.runlog.open(
                    run_id, str(claim.session_id), claim.epoch, claim.last_seq, worker_seq, info=claim.row
                )
            else:
                welcome.rejected_runs.add(run_id=str(run_id), epoch=epoch)
        yield worker_hub_pb2.ConnectResponse(welcome=welcome)
        self.dispatcher.workers[worker.worker_id] = worker
        self.dispatcher.update_gauges()
        self.dispatcher.wake()
        log.info(
            "worker %s connected (capacity %d, %d re-attached)",
            worker.worker_id,
            worker.capacity,
            len(accepted),
        )
        reader = asyncio.create_task(self._read(worker, requests), name=f"hub-read-{worker.worker_id}")
        try:
            # Several waiting messages as one, when the worker reads batches (runyard.common.batches).
            limit = min(hello.max_batch_bytes, MAX_BATCH_BYTES)  # never more than we would read ourselves
            async for message in batched(worker.outbox, _hub_batch, max_bytes=lambda: limit):
                yield message
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if self.dispatcher.workers.get(worker.worker_id) is worker:
                del self.dispatcher.workers[worker.worker_id]
            self.dispatcher.update_gauges()
            held = [(run_id, state.epoch) for run_id, state in worker.runs.items()]
            worker.runs.clear()
            if held and not self.shutting_down:
                # The worker is gone: its runs go back to the queue now rather
                # than after the lease lapses, with every event it sent stored.
                await self.runlog.flush(run_id for run_id, _ in held)
                await self.store.requeue(held)
                for run_id, epoch in held:
                    self.runlog.drop(run_id, epoch)
            log.info("worker %s disconnected (%d runs handed back)", worker.worker_id, len(held))

    async def _read(self, worker: WorkerConn, requests: AsyncIterator[worker_hub_pb2.ConnectRequest]) -> None:
        try:
            async for message in requests:
                if message.HasField("batch"):
                    for inner in message.batch.messages:
                        await self._on_message(worker, inner)
                else:
                    await self._on_message(worker, message)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - a broken worker must not take the gateway down
            log.exception("worker %s stream failed", worker.worker_id)
        finally:
            worker.outbox.put_nowait(None)

    async def _on_message(self, worker: WorkerConn, message: worker_hub_pb2.ConnectRequest) -> None:
        """Handle one message of a connected worker (alone or from a batch)."""
        kind = message.WhichOneof("message")
        if kind == "event":
            self._on_event(worker, message.event)
        elif kind == "heartbeat":
            await self._on_heartbeat(worker, message.heartbeat)
        elif kind == "result":
            task = asyncio.create_task(self._on_result(worker, message.result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "draining":
            worker.draining = True
            self.dispatcher.update_gauges()
        elif kind in ("hello", "batch"):  # only first on the stream / only at its top level
            log.warning("worker %s sent a %s out of place; ignored", worker.worker_id, kind)

    def _on_event(self, worker: WorkerConn, message: worker_hub_pb2.WorkerRunEvent) -> None:
        try:
            run_id = uuid.UUID(message.run_id)
        except ValueError:
            return
        state = worker.runs.get(run_id)
        if state is None or state.epoch != message.epoch:
            return  # not (or no longer) this worker's run
        self.runlog.append(run_id, state.epoch, message.event, message.worker_seq)

    async def _on_heartbeat(self, worker: WorkerConn, heartbeat: worker_hub_pb2.WorkerHeartbeat) -> None:
        leases = [(run_id, state.epoch) for run_id, state in worker.runs.items()]
        try:
            # Renewing is idempotent: a database blip is retried, and one that outlasts
            # the retries skips this beat (the lease outlives several) instead of
            # dropping the worker's stream and every run on it.
            held = await retry_transient(lambda: self.store.renew(worker.worker_id, leases), budget_s=1.0)
        except Exception as exc:  # noqa: BLE001 - classified below
            if not transient_database_error(exc):
                raise
            log.warning("renewing the leases of worker %s failed (%s); next heartbeat", worker.worker_id, exc)
            return
        self._refresh_tokens(worker, held)
        for run_id, epoch in leases:
            if run_id not in held and worker.runs.get(run_id) is not None:
                worker.runs.pop(run_id, None)
                self.runlog.drop(run_id, epoch)
                worker.send(
                    worker_hub_pb2.ConnectResponse(
                        cancel=worker_hub_pb2.RunCancel(run_id=str(run_id), epoch=epoch, reason="LEASE_LOST")
                    )
                )
        self.dispatcher.update_gauges()

    def _refresh_tokens(self, worker: WorkerConn, held: set[uuid.UUID]) -> None:
        """Send a fresh run token for each run whose lease was just renewed in
        PostgreSQL and whose token is a third of its lifetime old (or of
        unknown age): tokens are only ever signed for a run and epoch the
        database has just confirmed running (docs/security.md)."""
        signer = self.dispatcher.signer
        due = time.monotonic() - signer.ttl_s / 3
        for run_id in held:
            state = worker.runs.get(run_id)
            if state is None or state.token_signed_at > due:
                continue
            state.token_signed_at = time.monotonic()
            token = signer.sign(
                org_id=state.org_id,
                agent_id=state.agent_id,
                session_id=state.session_id,
                run_id=str(run_id),
                epoch=state.epoch,
            )
            worker.send(
                worker_hub_pb2.ConnectResponse(
                    token_refresh=worker_hub_pb2.RunTokenRefresh(
                        run_id=str(run_id), epoch=state.epoch, run_token=token
                    )
                )
            )

    async def _on_result(self, worker: WorkerConn, result: worker_hub_pb2.WorkerRunResult) -> None:
        try:
            run_id = uuid.UUID(result.run_id)
        except ValueError:
            return
        state = worker.runs.get(run_id)
        accepted = False
        message = ""
        try:
            if state is None or state.epoch != result.epoch:
                message = "stale result: the run is no longer held at this epoch"
                return
            first = not state.finishing  # a result sent again while the first is applied
            state.finishing = True
            try:
                accepted, message = await self._apply_result(run_id, state, result)
            finally:
                if first:
                    state.finishing = False
        except Exception as exc:  # noqa: BLE001 - reported to the worker, run stays leased
            log.exception("handling the result of run %s failed", run_id)
            message = f"gateway error: {exc}"
        finally:
            if accepted or message.startswith("stale"):
                worker.runs.pop(run_id, None)
                self.runlog.drop(run_id, result.epoch)
            worker.send(
                worker_hub_pb2.ConnectResponse(
                    ack=worker_hub_pb2.ResultAck(
                        run_id=result.run_id, epoch=result.epoch, accepted=accepted, message=message
                    )
                )
            )
            self.dispatcher.update_gauges()
            self.dispatcher.capacity_freed()

    async def _apply_result(
        self, run_id: uuid.UUID, state: RunState, result: worker_hub_pb2.WorkerRunResult
    ) -> tuple[bool, str]:
        outcome = result.WhichOneof("outcome")
        if outcome == "released":
            await self.runlog.flush([run_id])
            rows = await self.store.requeue([(run_id, result.epoch)], count_attempt=False)
            return True, "released" if rows else "stale: not running at this epoch"
        if outcome == RunStatus.REQUIRES_ACTION and self.tools is not None:
            return await self.tools.pause(run_id, state, result)
        if outcome not in TERMINAL:  # the outcomes that end a run are named after its status
            return False, f"unknown outcome {outcome!r}"
        pending = await self.runlog.begin_finish(run_id, result.epoch)
        finish: _FinishArgs = {
            "epoch": result.epoch,
            "info": state.info or None,
            "pending": pending.raws if pending is not None else (),
            "expected_last_seq": pending.expected_last_seq if pending is not None else None,
        }
        try:
            if outcome == RunStatus.COMPLETED:
                status, event, seq = await self._complete(run_id, state, result, finish)
            elif outcome == RunStatus.FAILED:
                status, event = RunStatus.FAILED, event_bytes(failed=result.failed)
                seq = await self.store.finish(
                    self.store.pool, run_id, status=status, event=event, error=result.failed.error, **finish
                )
            else:
                status, event = RunStatus.CANCELLED, event_bytes(cancelled=result.cancelled)
                seq = await self.store.finish(self.store.pool, run_id, status=status, event=event, **finish)
        except BaseException:
            self.runlog.abort_finish(run_id)
            raise
        if not seq:
            self.runlog.drop(run_id, result.epoch)
            return False, "stale: not running at this epoch"
        terminal = common_pb2.RunEvent.FromString(event)
        terminal.run_id = str(run_id)
        terminal.session_id = state.session_id
        terminal.seq = seq
        self.runlog.finished(run_id, terminal)
        metrics.RUNS_TOTAL.labels(status).inc()
        metrics.RUN_DURATION_SECONDS.labels(status).observe(time.monotonic() - state.claimed_at)
        return True, status

    async def _complete(
        self,
        run_id: uuid.UUID,
        state: RunState,
        result: worker_hub_pb2.WorkerRunResult,
        finish: _FinishArgs,
    ) -> tuple[RunStatus, bytes, int]:
        """A completion: commit the run's messages (sessions) and end the run,
        with the run's row locked throughout, so a cancel or a requeue
        cannot slip in between. Returns (status, terminal event, seq)."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            row = await self.store.lock(conn, run_id)
            if row is None or row["status"] != RunStatus.RUNNING or row["epoch"] != result.epoch:
                return RunStatus.FAILED, b"", 0
            if row["cancel_requested"]:
                cancelled = common_pb2.RunCancelled(reason=row["cancel_reason"] or "cancelled")
                event = event_bytes(cancelled=cancelled)
                seq = await self.store.finish(conn, run_id, status=RunStatus.CANCELLED, event=event, **finish)
                return RunStatus.CANCELLED, event, seq
            error: common_pb2.RunError | None = None
            relayed: list[common_pb2.LifecycleEvent] = []
            turn: int | None = None
            try:
                with tracing.attached(state.trace_context):
                    response = await call(
                        self.sessions.CommitRun(
                            sessions_pb2.CommitRunRequest(
                                org_id=state.org_id,
                                session_id=state.session_id,
                                run_id=str(run_id),
                                epoch=result.epoch,
                                append=result.append,
                            ),
                            metadata=internal_metadata(self.internal_secret),
                            timeout=10,
                        )
                    )
            except RunyardError as exc:
                if exc.code not in _COMMIT_REFUSALS:
                    raise  # the sessions service is unreachable: the worker sends the result again
                error = exc.to_run_error()
            else:
                relayed = list(response.events)
                turn = response.turn if response.session_id == state.session_id else None
            if error is not None:
                event = event_bytes(failed=common_pb2.RunFailed(error=error))
                seq = await self.store.finish(
                    conn, run_id, status=RunStatus.FAILED, event=event, error=error, **finish
                )
                return RunStatus.FAILED, event, seq
            completed = result.completed
            event = event_bytes(completed=completed)
            seq = await self.store.finish(
                conn,
                run_id,
                status=RunStatus.COMPLETED,
                event=event,
                model=completed.model,
                usage=completed.usage,
                relayed=relayed,
                transcript_turn=turn,
                **finish,
            )
            return RunStatus.COMPLETED, event, seq

    async def drain(self) -> None:
        """Tell every worker this gateway is going away (they re-attach elsewhere)."""
        self.shutting_down = True
        for worker in list(self.dispatcher.workers.values()):
            worker.send(
                worker_hub_pb2.ConnectResponse(drain=worker_hub_pb2.HubDrain(reason="gateway shutting down"))
            )

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, RunyardError):
                await task
