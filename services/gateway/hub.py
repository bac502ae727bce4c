"""The worker hub: workers connect, receive runs, stream events and results.

A worker opens ``WorkerHubService/Connect`` and must send ``hello`` within
``gateway.handshake_timeout_ms``. The :class:`Dispatcher` claims queued runs
for connected workers with free capacity (woken by LISTEN/NOTIFY, with a
polling fallback) and sweeps lapsed leases. Results are accepted only from
the worker holding the run's current epoch; a completion is final once
sessions has committed the run's snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from runyard._proto.v1 import common_pb2, sessions_pb2, sessions_pb2_grpc, worker_hub_pb2, worker_hub_pb2_grpc
from runyard.common import metrics
from runyard.common.auth import RunTokenSigner, check_internal, internal_metadata
from runyard.common.clients import call
from runyard.common.faults import retry_transient, transient_database_error
from runyard.common.server import settle_before_reject
from runyard.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RunyardError,
    Unauthenticated,
)
from runyard.gateway.events import EventLog
from runyard.gateway.runs import CANCEL_CHANNEL, QUEUE_CHANNEL, Claim, RunStore, event_bytes

__all__ = ["Dispatcher", "Hub", "WorkerConn"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunState:
    """A run assigned to a worker on this gateway."""

    epoch: int
    org_id: str
    session_id: str
    agent_id: str
    claimed_at: float = field(default_factory=time.monotonic)
    #: When the worker's current run token was signed (monotonic; 0 = unknown, e.g. re-attached).
    token_signed_at: float = 0.0


class WorkerConn:
    """One connected worker."""

    def __init__(self, worker_id: str, capacity: int):
        self.worker_id = worker_id
        self.capacity = capacity
        self.runs: dict[uuid.UUID, RunState] = {}
        self.outbox: asyncio.Queue[worker_hub_pb2.ConnectResponse | None] = asyncio.Queue()
        self.draining = False

    @property
    def free(self) -> int:
        return 0 if self.draining else max(self.capacity - len(self.runs), 0)

    def send(self, message: worker_hub_pb2.ConnectResponse) -> None:
        self.outbox.put_nowait(message)


class Dispatcher:
    """Claims queued runs for workers with free capacity and sweeps leases."""

    def __init__(self, store: RunStore, signer: RunTokenSigner, *, poll_interval_s: float):
        self.store = store
        self.signer = signer
        self.poll_interval_s = poll_interval_s
        self.workers: dict[str, WorkerConn] = {}
        self._wake = asyncio.Event()
        self.stopping = False
        #: Called with each claimed run's payload before it is assigned; may
        #: add input messages (background-task notifications, see
        #: runyard.gateway.tasks). A failure is logged and the run goes as is.
        self.prepare: Callable[[Claim, common_pb2.RunPayload], Awaitable[None]] | None = None

    def wake(self, *_: object) -> None:
        self._wake.set()

    def on_notify(self, channel: str, payload: str) -> None:
        if channel == QUEUE_CHANNEL:
            self._wake.set()

    def update_gauges(self) -> None:
        metrics.WORKERS_CONNECTED.set(len(self.workers))
        metrics.WORKER_FREE_CAPACITY.set(sum(w.free for w in self.workers.values()))

    async def run(self) -> None:
        last_sweep = 0.0
        while not self.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval_s)
            self._wake.clear()
            if self.stopping:
                return
            try:
                if time.monotonic() - last_sweep >= self.poll_interval_s:
                    last_sweep = time.monotonic()
                    if await self.store.requeue(None):
                        self._wake.set()
                await self._dispatch()
            except Exception:  # noqa: BLE001 - the loop must survive DB hiccups
                log.exception("dispatch failed")
                await asyncio.sleep(min(self.poll_interval_s, 1.0))

    async def _dispatch(self) -> None:
        while not self.stopping:
            candidates = [w for w in self.workers.values() if w.free > 0]
            if not candidates:
                return
            worker = max(candidates, key=lambda w: w.free)
            claim = await self.store.claim(worker.worker_id)
            if claim is None:
                return
            if self.workers.get(worker.worker_id) is not worker:
                # The worker left while we claimed: give the run straight back.
                await self.store.requeue([(claim.run_id, claim.epoch)], count_attempt=False)
                continue
            if claim.first_claim:
                wait = time.time() - claim.created_at.timestamp()
                metrics.RUNS_QUEUE_WAIT_SECONDS.observe(max(wait, 0.0))
            payload = common_pb2.RunPayload.FromString(claim.payload)
            if self.prepare is not None:
                try:
                    await self.prepare(claim, payload)
                except Exception:  # noqa: BLE001 - the run goes without the extra input
                    log.exception("preparing run %s failed", claim.run_id)
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
                claim.epoch, claim.org_id, str(claim.session_id), claim.agent_id, token_signed_at=time.monotonic()
            )
            worker.send(worker_hub_pb2.ConnectResponse(assign=worker_hub_pb2.RunAssignment(payload=payload)))
            self.update_gauges()

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
    """``runyard.v1.WorkerHubService``: the gateway side of worker streams."""

    def __init__(
        self,
        store: RunStore,
        events: EventLog,
        dispatcher: Dispatcher,
        sessions: sessions_pb2_grpc.SessionServiceStub,
        *,
        internal_secret: str,
        handshake_timeout_s: float,
        heartbeat_interval_ms: int,
        lease_ms: int,
        gateway_id: str,
    ):
        self.store = store
        self.events = events
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.internal_secret = internal_secret
        self.handshake_timeout_s = handshake_timeout_s
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.lease_ms = lease_ms
        self.gateway_id = gateway_id
        self.shutting_down = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def Connect(
        self, request_iterator: AsyncIterator[worker_hub_pb2.ConnectRequest], context: grpc.aio.ServicerContext
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
        accepted = await self.store.reattach(worker.worker_id, leases)
        welcome = worker_hub_pb2.HubWelcome(
            gateway_id=self.gateway_id,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            lease_ms=self.lease_ms,
        )
        for run_id, epoch in leases:
            if run_id in accepted:
                welcome.accepted_runs.add(run_id=str(run_id), epoch=epoch, worker_seq=accepted[run_id])
            else:
                welcome.rejected_runs.add(run_id=str(run_id), epoch=epoch)
        if accepted:
            rows = await self.store.pool.fetch(
                "SELECT id, org_id, session_id, agent_id, epoch FROM gateway.runs WHERE id = ANY($1::uuid[])",
                list(accepted),
            )
            for row in rows:
                worker.runs[row["id"]] = RunState(row["epoch"], row["org_id"], str(row["session_id"]), row["agent_id"])
        yield worker_hub_pb2.ConnectResponse(welcome=welcome)
        self.dispatcher.workers[worker.worker_id] = worker
        self.dispatcher.update_gauges()
        self.dispatcher.wake()
        log.info("worker %s connected (capacity %d, %d re-attached)", worker.worker_id, worker.capacity, len(accepted))
        reader = asyncio.create_task(self._read(worker, requests), name=f"hub-read-{worker.worker_id}")
        try:
            while True:
                message = await worker.outbox.get()
                if message is None:
                    return
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
                # than after the lease lapses. (While this gateway shuts down,
                # workers keep their runs and re-attach to another gateway.)
                await self.events.flush()
                await self.store.requeue(held)
            log.info("worker %s disconnected (%d runs handed back)", worker.worker_id, len(held))

    async def _read(self, worker: WorkerConn, requests: AsyncIterator[worker_hub_pb2.ConnectRequest]) -> None:
        try:
            async for message in requests:
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
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - a broken worker must not take the gateway down
            log.exception("worker %s stream failed", worker.worker_id)
        finally:
            worker.outbox.put_nowait(None)

    def _on_event(self, worker: WorkerConn, message: worker_hub_pb2.WorkerRunEvent) -> None:
        try:
            run_id = uuid.UUID(message.run_id)
        except ValueError:
            return
        state = worker.runs.get(run_id)
        if state is None or state.epoch != message.epoch:
            return  # not (or no longer) this worker's run
        self.events.append(run_id, state.session_id, state.epoch, message.event, message.worker_seq)

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
                org_id=state.org_id, agent_id=state.agent_id, session_id=state.session_id,
                run_id=str(run_id), epoch=state.epoch,
            )
            worker.send(worker_hub_pb2.ConnectResponse(
                token_refresh=worker_hub_pb2.RunTokenRefresh(run_id=str(run_id), epoch=state.epoch, run_token=token)
            ))

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
            # Everything the worker streamed before its result is written first.
            await self.events.flush()
            accepted, message = await self._apply_result(run_id, state, result)
        except Exception as exc:  # noqa: BLE001 - reported to the worker, run stays leased
            log.exception("handling the result of run %s failed", run_id)
            message = f"gateway error: {exc}"
        finally:
            if accepted or message.startswith("stale"):
                worker.runs.pop(run_id, None)
            worker.send(
                worker_hub_pb2.ConnectResponse(
                    ack=worker_hub_pb2.ResultAck(
                        run_id=result.run_id, epoch=result.epoch, accepted=accepted, message=message
                    )
                )
            )
            self.dispatcher.update_gauges()
            self.dispatcher.wake()

    async def _apply_result(
        self, run_id: uuid.UUID, state: RunState, result: worker_hub_pb2.WorkerRunResult
    ) -> tuple[bool, str]:
        outcome = result.WhichOneof("outcome")
        if outcome == "released":
            rows = await self.store.requeue([(run_id, result.epoch)], count_attempt=False)
            return True, "released" if rows else "stale: not running at this epoch"
        async with self.store.pool.acquire() as conn, conn.transaction():
            row = await self.store.lock(conn, run_id)
            if row is None or row["status"] != "running" or row["epoch"] != result.epoch:
                return False, "stale: not running at this epoch"
            status, event, error = "failed", b"", None
            model, usage = "", None
            if outcome == "completed" and row["cancel_requested"]:
                outcome = "cancelled"
                result.cancelled.reason = row["cancel_reason"] or "cancelled"
            if outcome == "completed":
                completed = result.completed
                try:
                    await call(
                        self.sessions.CommitSnapshot(
                            sessions_pb2.CommitSnapshotRequest(
                                org_id=state.org_id,
                                session_id=state.session_id,
                                run_id=str(run_id),
                                epoch=result.epoch,
                            ),
                            metadata=internal_metadata(self.internal_secret),
                            timeout=10,
                        )
                    )
                except (FailedPrecondition, NotFound) as exc:
                    error = exc.to_run_error()
                    event = event_bytes(failed=common_pb2.RunFailed(error=error))
                else:
                    status = "completed"
                    model, usage = completed.model, completed.usage
                    event = event_bytes(completed=completed)
            elif outcome == "failed":
                error = result.failed.error
                event = event_bytes(failed=result.failed)
            elif outcome == "cancelled":
                status = "cancelled"
                event = event_bytes(cancelled=result.cancelled)
            else:
                return False, f"unknown outcome {outcome!r}"
            await self.store.finish(conn, run_id, status=status, event=event, model=model, usage=usage, error=error)
        metrics.RUNS_TOTAL.labels(status).inc()
        metrics.RUN_DURATION_SECONDS.labels(status).observe(time.monotonic() - state.claimed_at)
        return True, status

    async def drain(self) -> None:
        """Tell every worker this gateway is going away (they re-attach elsewhere)."""
        self.shutting_down = True
        for worker in list(self.dispatcher.workers.values()):
            worker.send(worker_hub_pb2.ConnectResponse(drain=worker_hub_pb2.HubDrain(reason="gateway shutting down")))

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, RunyardError):
                await task
