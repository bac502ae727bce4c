"""The worker (``runyard serve worker``): executes runs the gateway assigns.

The worker keeps one ``WorkerHubService/Connect`` stream open to a gateway
(reconnecting with exponential backoff), says hello with its capacity and
the runs it still executes, heartbeats their leases, and streams each run's
events and result. Events carry a per-run ``worker_seq``; after reconnecting,
the worker resends exactly the events the gateway did not persist, so a
gateway restart neither loses nor repeats an event.

On SIGTERM the worker stops taking runs, lets running ones finish within
``worker.shutdown_grace_s``, then releases the rest (re-queued at once).

:func:`build` is the worker's composition root; the order of start and stop
is the service lifecycle's (:func:`runyard.common.lifecycle.run_service`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, wait_exponential, wait_random

from runyard._proto.v1 import (
    common_pb2,
    router_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    tasks_pb2_grpc,
    worker_hub_pb2,
    worker_hub_pb2_grpc,
)
from runyard._version import __version__
from runyard.common import tracing
from runyard.common.auth import internal_metadata
from runyard.common.batches import MAX_BATCH_BYTES, batched
from runyard.common.clients import InternalChannels
from runyard.common.config import Config
from runyard.common.lifecycle import Service, run_service
from runyard.common.tls import TlsSettings
from runyard.worker.mcp import McpTools
from runyard.worker.runner import RunExecutor, RunOutcome
from runyard.worker.tools import TaskTools

__all__ = ["Worker", "build", "serve"]

log = logging.getLogger(__name__)


class _NotWelcomed(Exception):
    """A gateway connection ended before the gateway's welcome (retried with backoff)."""


def _worker_batch(messages: Sequence[worker_hub_pb2.ConnectRequest]) -> worker_hub_pb2.ConnectRequest:
    return worker_hub_pb2.ConnectRequest(batch=worker_hub_pb2.WorkerBatch(messages=messages))


@dataclass(slots=True)
class ActiveRun:
    """A run this worker holds (until the gateway acknowledges its result)."""

    payload: common_pb2.RunPayload
    task: asyncio.Task[None] | None = None
    #: Where the run continues after client tool results (None: from its start).
    continuation: worker_hub_pb2.RunContinuation | None = None
    #: Every event sent, in order (index + 1 = worker_seq): resent after a re-attach.
    sent: list[worker_hub_pb2.ConnectRequest] = field(default_factory=list)
    result: worker_hub_pb2.ConnectRequest | None = None
    cancel_reason: str = ""
    #: The transcript the gateway sent with the assignment (used once, then dropped).
    transcript: sessions_pb2.GetTranscriptResponse | None = None

    @property
    def run_id(self) -> str:
        return self.payload.run_id

    @property
    def epoch(self) -> int:
        return self.payload.epoch


class Worker:
    """A worker process's connection to the gateway and its runs.

    Args:
        config: the configuration (``[worker]``, endpoints, agents, tools).
        channels: opens its channels to the sessions service, the router
            and the gateway's internal listener (closed by :meth:`aclose`;
            one to the gateway per connection attempt).
        worker_id: this worker's id (default: ``worker.worker_id``, else
            ``worker-HOST-PID``).
    """

    def __init__(self, config: Config, channels: InternalChannels, worker_id: str | None = None):
        self.config = config
        self.channels = channels
        self.worker_id = (
            worker_id or config.worker.worker_id or f"worker-{socket.gethostname()}-{os.getpid()}"
        )
        self.capacity = config.worker.capacity
        self.runs: dict[str, ActiveRun] = {}
        self._queue: asyncio.Queue[worker_hub_pb2.ConnectRequest | None] | None = None
        self._sessions_channel = channels.open(config.endpoints.sessions)
        self._router_channel = channels.open(config.endpoints.router)
        # The built-in tools call the gateway's TaskService (internal listener) with each run's token.
        self._tasks_channel = channels.open(config.endpoints.gateway_internal)
        self.executor = RunExecutor(
            config,
            self.worker_id,
            sessions_pb2_grpc.SessionServiceStub(self._sessions_channel),
            router_pb2_grpc.RouterServiceStub(self._router_channel),
        )
        # Tool sources of the tool loop (runyard.worker.tools.ToolSource), in precedence order.
        self.executor.sources.append(
            TaskTools(
                tasks_pb2_grpc.TaskServiceStub(self._tasks_channel),
                internal_metadata(config.auth.internal_secret),
                wait_max_s=config.tasks.tool_wait_max_s,
                retrying=self.executor._retrying,
                config=config,
            )
        )
        # -- MCP servers (issue 13): the agents' tool servers, one tool source of the tool loop.
        self.mcp = McpTools(config)
        self.executor.sources.append(self.mcp)
        # -- end MCP servers
        self.draining = False
        self.connected = asyncio.Event()
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()
        #: Whether the gateway of the current connection has welcomed this worker.
        self._welcomed = False

    # ------------------------------------------------------------ sending

    def _send(self, message: worker_hub_pb2.ConnectRequest) -> None:
        if self._queue is not None:
            self._queue.put_nowait(message)

    def _emit(self, run: ActiveRun, event: common_pb2.RunEvent) -> None:
        message = worker_hub_pb2.ConnectRequest(
            event=worker_hub_pb2.WorkerRunEvent(
                run_id=run.run_id, epoch=run.epoch, event=event, worker_seq=len(run.sent) + 1
            )
        )
        run.sent.append(message)
        self._send(message)

    # ------------------------------------------------------------ runs

    def _start_run(
        self,
        payload: common_pb2.RunPayload,
        continuation: worker_hub_pb2.RunContinuation | None = None,
        transcript: sessions_pb2.GetTranscriptResponse | None = None,
    ) -> None:
        if payload.run_id in self.runs:
            return
        run = ActiveRun(payload, continuation=continuation, transcript=transcript)
        self.runs[payload.run_id] = run
        run.task = asyncio.create_task(self._execute(run), name=f"run-{payload.run_id}")

    async def _execute(self, run: ActiveRun) -> None:
        try:
            # One span per execution, continuing the trace of the request that queued the run.
            with tracing.run_span(run.payload) as span:
                outcome = await self.executor.execute(
                    run.payload,
                    lambda event: self._emit(run, event),
                    run.continuation,
                    transcript=run.transcript,
                )
                run.transcript = None
                if span is not None and outcome.completed is not None:
                    span.set_attribute("runyard.model", outcome.completed.model)
        except asyncio.CancelledError:
            reason = run.cancel_reason or "CANCELLED"
            if reason == "LEASE_LOST":
                self.runs.pop(run.run_id, None)  # the gateway gave the run away: nothing to report
                return
            if reason == "RELEASE":
                result = worker_hub_pb2.WorkerRunResult(
                    run_id=run.run_id,
                    epoch=run.epoch,
                    released=worker_hub_pb2.RunReleased(reason="worker shutdown"),
                )
            else:
                result = worker_hub_pb2.WorkerRunResult(
                    run_id=run.run_id,
                    epoch=run.epoch,
                    cancelled=common_pb2.RunCancelled(reason=reason.lower()),
                )
            self._finish(run, result)
            return
        self._finish(run, self._result(run, outcome))

    @staticmethod
    def _result(run: ActiveRun, outcome: RunOutcome) -> worker_hub_pb2.WorkerRunResult:
        result = worker_hub_pb2.WorkerRunResult(run_id=run.run_id, epoch=run.epoch)
        if outcome.released is not None:
            result.released.CopyFrom(worker_hub_pb2.RunReleased(reason=outcome.released))
        elif outcome.paused is not None:  # client tool calls: the run waits without a worker
            result.requires_action.tool_calls.extend(outcome.paused.pending)
            result.continuation.CopyFrom(outcome.paused)
        elif outcome.completed is not None:
            result.completed.CopyFrom(outcome.completed)
            if outcome.append is not None:
                result.append.CopyFrom(outcome.append)
            result.already_committed = outcome.already_committed
        elif outcome.failed is not None:
            result.failed.CopyFrom(outcome.failed)
        else:
            result.cancelled.CopyFrom(outcome.cancelled or common_pb2.RunCancelled())
        return result

    def _finish(self, run: ActiveRun, result: worker_hub_pb2.WorkerRunResult) -> None:
        run.result = worker_hub_pb2.ConnectRequest(result=result)
        self._send(run.result)

    def _cancel_run(self, run_id: str, reason: str) -> None:
        run = self.runs.get(run_id)
        if run is None or run.task is None or run.task.done():
            if run is not None and reason == "LEASE_LOST":
                self.runs.pop(run_id, None)
            return
        run.cancel_reason = reason
        run.task.cancel()

    # ------------------------------------------------------------ connection

    def _hello(self) -> worker_hub_pb2.ConnectRequest:
        hello = worker_hub_pb2.WorkerHello(
            worker_id=self.worker_id,
            capacity=self.capacity,
            version=__version__,
            max_batch_bytes=MAX_BATCH_BYTES,
        )
        for run in self.runs.values():
            hello.active_runs.add(run_id=run.run_id, epoch=run.epoch)
        return worker_hub_pb2.ConnectRequest(hello=hello)

    async def _requests(
        self,
        queue: asyncio.Queue[worker_hub_pb2.ConnectRequest | None],
        gateway_batch_bytes: Callable[[], int],
    ) -> AsyncIterator[worker_hub_pb2.ConnectRequest]:
        """Hello, then what is queued, several waiting messages as one batch
        once the gateway's welcome said it reads them (:mod:`runyard.common.batches`)."""
        yield self._hello()
        async for message in batched(queue, _worker_batch, max_bytes=gateway_batch_bytes):
            yield message

    async def _heartbeat(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            beat = worker_hub_pb2.WorkerHeartbeat(free_capacity=max(self.capacity - len(self.runs), 0))
            for run in self.runs.values():
                beat.runs.add(run_id=run.run_id, epoch=run.epoch)
            self._send(worker_hub_pb2.ConnectRequest(heartbeat=beat))

    def _on_welcome(self, welcome: worker_hub_pb2.HubWelcome) -> None:
        for lease in welcome.rejected_runs:
            log.warning("gateway refused re-attached run %s; stopping it", lease.run_id)
            self._cancel_run(lease.run_id, "LEASE_LOST")
            self.runs.pop(lease.run_id, None)
        for lease in welcome.accepted_runs:
            run = self.runs.get(lease.run_id)
            if run is None:
                continue
            for message in run.sent[lease.worker_seq :]:
                self._send(message)
            if run.result is not None:
                self._send(run.result)
        if self.draining:
            self._send(
                worker_hub_pb2.ConnectRequest(draining=worker_hub_pb2.WorkerDraining(reason="shutdown"))
            )

    def _on_token(self, refresh: worker_hub_pb2.RunTokenRefresh) -> None:
        """A fresh run token (the lease was renewed): later calls of the run use it."""
        run = self.runs.get(refresh.run_id)
        if run is not None and run.epoch == refresh.epoch and refresh.run_token:
            run.payload.run_token = refresh.run_token

    def _on_ack(self, ack: worker_hub_pb2.ResultAck) -> None:
        run = self.runs.get(ack.run_id)
        if run is None or run.epoch != ack.epoch:
            return
        if ack.accepted or ack.message.startswith("stale"):
            self.runs.pop(ack.run_id, None)
            if not self.runs:
                self._idle.set()
            return
        log.warning("gateway did not accept the result of run %s (%s); retrying", ack.run_id, ack.message)

        async def retry() -> None:
            await asyncio.sleep(1.0)
            if self.runs.get(ack.run_id) is run and run.result is not None:
                self._send(run.result)

        asyncio.get_running_loop().create_task(retry())

    async def _connection(self) -> None:
        channel = self.channels.open(self.config.endpoints.gateway_internal)
        queue: asyncio.Queue[worker_hub_pb2.ConnectRequest | None] = asyncio.Queue()
        heartbeat: asyncio.Task[None] | None = None
        welcome: worker_hub_pb2.HubWelcome | None = None
        self._welcomed = False
        try:
            stub = worker_hub_pb2_grpc.WorkerHubServiceStub(channel)
            stream = stub.Connect(
                # Never more than we would read ourselves, whatever the gateway offers.
                self._requests(
                    queue, lambda: min(welcome.max_batch_bytes, MAX_BATCH_BYTES) if welcome is not None else 0
                ),
                metadata=internal_metadata(self.config.auth.internal_secret),
            )
            async for response in stream:
                if response.WhichOneof("message") == "welcome":
                    welcome = response.welcome
                    self._queue = queue
                    self.connected.set()
                    self._welcomed = True
                    log.info("connected to gateway %s", welcome.gateway_id)
                    self._on_welcome(welcome)
                    heartbeat = asyncio.create_task(
                        self._heartbeat(max(welcome.heartbeat_interval_ms, 100) / 1000)
                    )
                    continue
                messages = response.batch.messages if response.HasField("batch") else (response,)
                if not all(map(self._on_response, messages)):
                    log.info("gateway is draining; reconnecting")
                    break
        finally:
            self.connected.clear()
            self._queue = None
            queue.put_nowait(None)
            if heartbeat is not None:
                heartbeat.cancel()
            await channel.close(grace=None)

    def _on_response(self, response: worker_hub_pb2.ConnectResponse) -> bool:
        """Handle one message of the gateway (after its welcome); False when
        the gateway drains (this connection ends)."""
        kind = response.WhichOneof("message")
        if kind == "assign":
            if self.draining:
                return True  # the gateway re-queues it when the lease lapses or we leave
            assignment = response.assign
            self._start_run(
                assignment.payload,
                assignment.continuation if assignment.HasField("continuation") else None,
                assignment.transcript if assignment.HasField("transcript") else None,
            )
        elif kind == "cancel":
            self._cancel_run(response.cancel.run_id, response.cancel.reason or "CANCELLED")
        elif kind == "ack":
            self._on_ack(response.ack)
        elif kind == "token_refresh":
            self._on_token(response.token_refresh)
        elif kind == "drain":
            return False
        return True

    async def run(self) -> None:
        """Stay connected to the gateway until :meth:`shutdown`.

        A connection that ended or failed before the gateway's welcome is
        retried after an exponential backoff (tenacity:
        ``worker.reconnect_initial_ms`` doubling up to
        ``worker.reconnect_max_ms``, plus up to ``reconnect_initial_ms`` of
        jitter).
        Once a gateway has welcomed this worker, the backoff starts afresh:
        when that connection ends, the worker reconnects at once (a draining
        gateway refuses the new call, so the backoff applies then)."""
        initial_s = self.config.worker.reconnect_initial_ms / 1000
        maximum_s = self.config.worker.reconnect_max_ms / 1000
        while not self._stopped.is_set():
            with contextlib.suppress(RetryError):  # stopped while backing off
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(_NotWelcomed),
                    wait=wait_exponential(multiplier=initial_s, max=maximum_s) + wait_random(0, initial_s),
                    stop=lambda _state: self._stopped.is_set(),
                    sleep=self._sleep_unless_stopped,
                ):
                    with attempt:
                        await self._connect_once()

    async def _connect_once(self) -> None:
        """One connection to the gateway, until it ends.

        Raises:
            _NotWelcomed: it ended or failed before the gateway welcomed this worker.
        """
        if self._stopped.is_set():
            return  # shut down during the backoff before this attempt
        try:
            await self._connection()
        except grpc.aio.AioRpcError as exc:
            log.warning("gateway stream ended: %s %s", exc.code().name, exc.details())
        except Exception:  # noqa: BLE001 - keep reconnecting
            log.exception("gateway stream failed")
        if not self._welcomed and not self._stopped.is_set():
            raise _NotWelcomed

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), seconds)

    async def shutdown(self, grace_s: float) -> None:
        """Stop taking runs, let them finish within ``grace_s``, release the rest."""
        self.draining = True
        self._send(worker_hub_pb2.ConnectRequest(draining=worker_hub_pb2.WorkerDraining(reason="shutdown")))
        if self.runs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_all_acked(), grace_s)
        for run_id in list(self.runs):
            self._cancel_run(run_id, "RELEASE")
        if self.runs and self.connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wait_all_acked(), 5.0)
        self._stopped.set()
        if self._queue is not None:
            self._queue.put_nowait(None)

    async def _wait_all_acked(self) -> None:
        while self.runs:
            self._idle.clear()
            await self._idle.wait()

    async def aclose(self) -> None:
        """Stop the MCP servers and close the channels."""
        await self.mcp.aclose()  # stops the MCP servers (issue 13)
        await self._sessions_channel.close()
        await self._router_channel.close()
        await self._tasks_channel.close()


async def serve(config: Config, *, tls: TlsSettings | None) -> None:
    """Run a worker until SIGTERM/SIGINT, then drain gracefully.

    Args:
        config: the checked configuration.
        tls: TLS of the health/admin listener and of the channels to the
            other services; None = plaintext.
    """
    await run_service("worker", config, build, tls=tls)


async def build(service: Service) -> None:
    """Build and register the worker: its health/admin server serves first,
    then its MCP servers start, then it connects to the gateway and takes runs."""
    cfg = service.config.worker
    worker = Worker(service.config, service.channels)
    service.on_close(worker.aclose)
    server = service.serve([])
    server.admin.add_source(worker.mcp)  # `runyard status`: the MCP servers (issue 13)

    async def take_runs() -> None:
        # MCP servers start before runs are taken: each gets at most its startup_timeout_ms (issue 13).
        await worker.mcp.start()
        service.task(worker.run(), name="worker")

    async def drain() -> None:
        log.info("worker %s: %d run(s) in flight", worker.worker_id, len(worker.runs))
        await worker.shutdown(cfg.shutdown_grace_s)

    service.on_serving(take_runs)
    service.on_drain(drain)
