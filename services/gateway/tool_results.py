"""Client-side tools on the gateway: runs that wait for the caller's tool results.

A client declares tools with its message (``RunOptions.client_tools``,
checked by :func:`check_client_tools`). When the model calls one, the
worker ends its execution with ``requires_action`` and a
``RunContinuation`` (the run's messages so far, the pending calls, the tool
loop's counters). The gateway then (:meth:`ToolResults.pause`, one
statement, :meth:`RunStore.pause`):

* stores the continuation on the run row, sets status ``requires_action``
  with an expiry (``gateway.tool_results_timeout_s``) and releases the
  worker: nothing of the wait lives in a process, so it survives a restart
  of any service or worker;
* writes the run's last events and a ``requires_action`` event listing the
  pending calls (not terminal: ``SendMessage``/``Chat``/``JoinRun``
  followers stay open, and a client that reconnects sees the calls again).

The client answers with ``SubmitToolResults`` or ``ChatRequest.
submit_tool_results`` (:meth:`ToolResults.submit`), all calls at once or one
by one. Each accepted result is a ``tool_result`` event (source
``client``) with its ``tool.completed`` lifecycle event, written with the
continuation in one statement (:meth:`RunStore.record_tool_results`); with
the last one the run goes back to ``queued`` in its old place, any worker
claims it and gets the continuation with its assignment, and the tool loop
goes on from there: no model call is repeated. The transcript is committed
once, when the run completes, with every message of the run.

While it waits, the run is its session's active run: later messages queue
behind it (REJECT refuses them, INTERRUPT cancels it). ``CancelRun`` ends it
at once; a run still waiting at its expiry fails with DEADLINE_EXCEEDED
``TOOL_RESULTS_TIMEOUT`` (:meth:`ToolResults.expire`, run by every gateway,
rows locked with SKIP LOCKED).

Errors of a submission: a run of another org is NOT_FOUND; an id that is
not a pending call is INVALID_ARGUMENT ``UNKNOWN_TOOL_CALL``; a second,
different result for a call is FAILED_PRECONDITION
``TOOL_CALL_ALREADY_ANSWERED``; a run that has ended is FAILED_PRECONDITION
``RUN_ENDED``, one that does not wait (any more) FAILED_PRECONDITION
``RUN_NOT_AWAITING_TOOL_RESULTS`` — except that a repeat of results already
recorded is answered like the first time (the call is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence

import asyncpg

from runyard._proto.v1 import common_pb2, gateway_pb2, worker_hub_pb2
from runyard.common import metrics
from runyard.common.errors import FailedPrecondition, InvalidArgument
from runyard.common.faults import retry_transient, transient_database_error
from runyard.common.protoutil import parse_uuid, timestamp
from runyard.gateway.events import RunLog
from runyard.gateway.run_status import TERMINAL, RunStatus
from runyard.gateway.runs import RunStore, event_bytes, run_proto

__all__ = ["BUILTIN_TOOL_NAMES", "MAX_CLIENT_TOOLS", "ToolResults", "check_client_tools"]

log = logging.getLogger(__name__)

#: Names of the built-in tools (runyard.worker.tools.BUILTIN_TOOLS): a client tool may not take them.
BUILTIN_TOOL_NAMES = frozenset({"spawn_task", "task_output"})
#: Most client tools one message may declare (OpenAI's limit on a request's tools).
MAX_CLIENT_TOOLS = 128
#: A function name as OpenAI and Anthropic accept it.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_DESCRIPTION = 4096
_MAX_SCHEMA_BYTES = 64 * 1024


def check_client_tools(
    tools: Sequence[common_pb2.ToolDefinition], field: str = "options.client_tools"
) -> None:
    """Refuse client tool declarations a model provider would refuse later.

    Raises:
        InvalidArgument: too many tools (TOO_MANY_ITEMS), a bad name
            (INVALID_TOOL_NAME), a name used twice (DUPLICATE_TOOL_NAME) or
            taken by a built-in tool (TOOL_NAME_RESERVED), a description
            over 4096 characters (VALUE_TOO_LONG), a parameter schema that is
            not a JSON object of at most 64 KiB (INVALID_TOOL_SCHEMA). The
            field path names the tool (``options.client_tools[2].name``).
    """
    if len(tools) > MAX_CLIENT_TOOLS:
        raise InvalidArgument(
            f"{field} has {len(tools)} tools; at most {MAX_CLIENT_TOOLS} are allowed",
            reason="TOO_MANY_ITEMS",
            field=field,
        )
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"{field}[{index}]"
        if not _TOOL_NAME.match(tool.name):
            raise InvalidArgument(
                f"{where}.name must be 1-64 letters, digits, '_' or '-'",
                reason="INVALID_TOOL_NAME",
                field=f"{where}.name",
            )
        if tool.name in BUILTIN_TOOL_NAMES:
            raise InvalidArgument(
                f"{where}.name {tool.name!r} is the name of a built-in tool; rename the client tool",
                reason="TOOL_NAME_RESERVED",
                field=f"{where}.name",
            )
        if tool.name in seen:
            raise InvalidArgument(
                f"{where}.name {tool.name!r} is declared twice",
                reason="DUPLICATE_TOOL_NAME",
                field=f"{where}.name",
            )
        seen.add(tool.name)
        if len(tool.description) > _MAX_DESCRIPTION:
            raise InvalidArgument(
                f"{where}.description is longer than {_MAX_DESCRIPTION} characters",
                reason="VALUE_TOO_LONG",
                field=f"{where}.description",
            )
        schema = tool.parameters_json_schema
        if schema:
            problem = ""
            if len(schema.encode()) > _MAX_SCHEMA_BYTES:
                problem = f"is larger than {_MAX_SCHEMA_BYTES} bytes"
            else:
                try:
                    parsed = json.loads(schema)
                except json.JSONDecodeError as exc:
                    problem = f"is not valid JSON ({exc.msg} at character {exc.pos})"
                else:
                    if not isinstance(parsed, dict):
                        problem = "must be a JSON object (a JSON Schema)"
            if problem:
                raise InvalidArgument(
                    f"{where}.parameters_json_schema {problem}",
                    reason="INVALID_TOOL_SCHEMA",
                    field=f"{where}.parameters_json_schema",
                )


def _unanswered(continuation: worker_hub_pb2.RunContinuation) -> list[common_pb2.ToolCall]:
    answered = {result.tool_call_id for result in continuation.results}
    return [call for call in continuation.pending if call.id not in answered]


class ToolResults:
    """Pauses runs for client tool results, records the results, expires waits.

    Args:
        store: the runs store.
        runlog: this gateway's run log (a paused run's stream ends here).
        wake: wakes this gateway's dispatcher (a run is queued again).
        timeout_s: how long a run waits (``gateway.tool_results_timeout_s``).
        max_result_bytes: largest result content (``gateway.max_tool_result_bytes``).
        sweep_interval_s: how often :meth:`run` looks for expired waits.
    """

    def __init__(
        self,
        store: RunStore,
        runlog: RunLog,
        wake: Callable[[], None],
        *,
        timeout_s: float,
        max_result_bytes: int,
        sweep_interval_s: float = 1.0,
    ):
        self.store = store
        self.runlog = runlog
        self.wake = wake
        self.timeout_s = timeout_s
        self.max_result_bytes = max_result_bytes
        self.sweep_interval_s = sweep_interval_s

    # ------------------------------------------------------------ the worker's side

    async def pause(
        self, run_id: uuid.UUID, state: object, result: worker_hub_pb2.WorkerRunResult
    ) -> tuple[bool, str]:
        """A worker's ``requires_action`` result: park the run (see the module
        docstring) and end its stream here. ``state`` is the hub's
        ``RunState``. Returns ``(accepted, message)`` for the worker's ack; a
        run cancelled meanwhile ends ``cancelled`` instead."""
        epoch = result.epoch
        continuation = worker_hub_pb2.RunContinuation()
        continuation.CopyFrom(result.continuation)
        del continuation.results[:]
        if not continuation.pending:
            return False, "requires_action without pending tool calls"
        expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self.timeout_s)
        waiting = common_pb2.RunRequiresAction(
            tool_calls=continuation.pending, expire_time=timestamp(expires_at)
        )
        event = event_bytes(requires_action=waiting)
        info = getattr(state, "info", None) or None
        pending = await self.runlog.begin_finish(run_id, epoch)
        raws = pending.raws if pending is not None else []
        expected = pending.expected_last_seq if pending is not None else None
        status = RunStatus.REQUIRES_ACTION
        try:
            async with self.store.pool.acquire() as conn, conn.transaction():
                row = await self.store.lock(conn, run_id)
                if row is None or row["status"] != RunStatus.RUNNING or row["epoch"] != epoch:
                    seq = 0
                elif row["cancel_requested"]:
                    status = RunStatus.CANCELLED
                    event = event_bytes(
                        cancelled=common_pb2.RunCancelled(reason=row["cancel_reason"] or "cancelled")
                    )
                    seq = await self.store.finish(
                        conn,
                        run_id,
                        status=status,
                        event=event,
                        epoch=epoch,
                        info=info,
                        pending=raws,
                        expected_last_seq=expected,
                    )
                else:
                    seq = await self.store.pause(
                        conn,
                        run_id,
                        epoch=epoch,
                        event=event,
                        continuation=continuation.SerializeToString(),
                        expires_at=expires_at,
                        info=info,
                        pending=raws,
                        expected_last_seq=expected,
                    )
        except BaseException:
            self.runlog.abort_finish(run_id)
            raise
        if not seq:
            self.runlog.drop(run_id, epoch)
            return False, "stale: not running at this epoch"
        announced = common_pb2.RunEvent.FromString(event)
        announced.run_id = str(run_id)
        announced.session_id = str(getattr(state, "session_id", ""))
        announced.seq = seq
        self.runlog.finished(run_id, announced)
        if status == RunStatus.CANCELLED:
            metrics.RUNS_TOTAL.labels(RunStatus.CANCELLED).inc()
        else:
            log.info("run %s waits for %d client tool result(s)", run_id, len(continuation.pending))
        return True, status

    # ------------------------------------------------------------ the client's side

    async def submit(self, org_id: str, request: gateway_pb2.SubmitToolResultsRequest) -> common_pb2.Run:
        """Record a client's tool results (see the module docstring for the
        errors); returns the run as it is afterwards."""
        run_id = parse_uuid(request.run_id, "run_id", what="run id")
        if not request.results:
            raise InvalidArgument(
                "results must hold at least one result", reason="MISSING_FIELD", field="results"
            )
        ids: set[str] = set()
        for index, output in enumerate(request.results):
            if not output.tool_call_id:
                raise InvalidArgument(
                    f"results[{index}].tool_call_id is required",
                    reason="MISSING_FIELD",
                    field=f"results[{index}].tool_call_id",
                )
            if output.tool_call_id in ids:
                raise InvalidArgument(
                    f"results[{index}] answers tool call {output.tool_call_id!r} a second time",
                    reason="DUPLICATE_TOOL_CALL_ID",
                    field=f"results[{index}].tool_call_id",
                )
            ids.add(output.tool_call_id)
            size = len(output.content.encode())
            if size > self.max_result_bytes:
                raise InvalidArgument(
                    f"results[{index}].content is {size} bytes; the limit is {self.max_result_bytes} "
                    "(gateway.max_tool_result_bytes)",
                    reason="TOOL_RESULT_TOO_LARGE",
                    field=f"results[{index}].content",
                )
        run, resumed = await retry_transient(
            lambda: self._record(org_id, run_id, request.results), budget_s=5.0
        )
        if resumed:
            self.wake()
        return run

    async def _record(
        self, org_id: str, run_id: uuid.UUID, outputs: Sequence[gateway_pb2.ToolOutput]
    ) -> tuple[common_pb2.Run, bool]:
        async with self.store.pool.acquire() as conn, conn.transaction():
            row = await self.store.lock_waiting(conn, org_id, run_id)
            continuation = worker_hub_pb2.RunContinuation()
            if row["continuation"] is not None:
                continuation.ParseFromString(row["continuation"])
            answered = {r.tool_call_id: r for r in continuation.results}
            status = row["status"]
            if status != RunStatus.REQUIRES_ACTION:
                if all(self._same(answered.get(o.tool_call_id), o) for o in outputs):
                    return self._run(row, None), False  # a repeat of results already recorded
                name = status.upper()
                if status in TERMINAL:
                    raise FailedPrecondition(
                        f"run {run_id} has ended ({name}); it takes no tool results",
                        reason="RUN_ENDED",
                        metadata={"status": name},
                    )
                raise FailedPrecondition(
                    f"run {run_id} is {name}: it does not wait for tool results",
                    reason="RUN_NOT_AWAITING_TOOL_RESULTS",
                    metadata={"status": name},
                )
            expires_at = row["action_expires_at"]
            if expires_at is not None and expires_at <= dt.datetime.now(dt.UTC):
                raise FailedPrecondition(
                    f"run {run_id} stopped waiting for tool results at {expires_at.isoformat()} "
                    "(gateway.tool_results_timeout_s); it is ending",
                    reason="TOOL_RESULTS_TIMEOUT",
                )
            pending = {call.id: call for call in continuation.pending}
            unanswered = [call.id for call in _unanswered(continuation)]
            waited_ms = 0
            if continuation.HasField("pause_time"):
                waited_ms = max(int(time.time() * 1000) - continuation.pause_time.ToMilliseconds(), 0)
            events: list[bytes] = []
            for index, output in enumerate(outputs):
                call = pending.get(output.tool_call_id)
                if call is None:
                    raise InvalidArgument(
                        f"results[{index}].tool_call_id {output.tool_call_id[:64]!r} "
                        "is not a tool call the run "
                        f"waits for (waiting for: {', '.join(unanswered) or 'none'})",
                        reason="UNKNOWN_TOOL_CALL",
                        field=f"results[{index}].tool_call_id",
                        metadata={"pending_tool_call_ids": ",".join(unanswered)},
                    )
                prior = answered.get(output.tool_call_id)
                if prior is not None:
                    if self._same(prior, output):
                        continue
                    raise FailedPrecondition(
                        f"tool call {output.tool_call_id!r} already has a different result",
                        reason="TOOL_CALL_ALREADY_ANSWERED",
                        metadata={"tool_call_id": output.tool_call_id},
                    )
                result = common_pb2.ToolResultEvent(
                    tool_call_id=call.id,
                    name=call.name,
                    content=output.content,
                    is_error=output.is_error,
                    source="client",
                    duration_ms=waited_ms,
                )
                continuation.results.append(result)
                events.append(event_bytes(tool_result=result))
            if not events:
                return self._run(row, continuation), False
            resume = not _unanswered(continuation)
            seq = await self.store.record_tool_results(
                conn,
                run_id,
                events=events,
                continuation=continuation.SerializeToString(),
                resume=resume,
                info=row,
            )
            if not seq:  # cannot happen while the row is locked; refuse rather than guess
                raise FailedPrecondition(
                    f"run {run_id} stopped waiting", reason="RUN_NOT_AWAITING_TOOL_RESULTS"
                )
            row = await self.store.lock_waiting(conn, org_id, run_id)
        if resume:
            log.info(
                "run %s has its %d client tool result(s); queued again", run_id, len(continuation.pending)
            )
        return self._run(row, continuation), resume

    @staticmethod
    def _same(prior: common_pb2.ToolResultEvent | None, output: gateway_pb2.ToolOutput) -> bool:
        return prior is not None and prior.content == output.content and prior.is_error == output.is_error

    @staticmethod
    def _run(row: asyncpg.Record, continuation: worker_hub_pb2.RunContinuation | None) -> common_pb2.Run:
        run = run_proto(row)
        if row["status"] == RunStatus.REQUIRES_ACTION and continuation is not None:
            run.requires_action.tool_calls.extend(_unanswered(continuation))
            if row["action_expires_at"] is not None:
                run.requires_action.expire_time.FromDatetime(row["action_expires_at"])
        return run

    async def describe(self, run: common_pb2.Run) -> common_pb2.Run:
        """Fill ``run.requires_action`` (unanswered calls, expiry) for a waiting run."""
        if run.status != common_pb2.RUN_STATUS_REQUIRES_ACTION:
            return run
        row = await self.store.waiting(uuid.UUID(run.id))
        if row is None or row["continuation"] is None:
            return run
        continuation = worker_hub_pb2.RunContinuation.FromString(row["continuation"])
        run.requires_action.tool_calls.extend(_unanswered(continuation))
        if row["action_expires_at"] is not None:
            run.requires_action.expire_time.FromDatetime(row["action_expires_at"])
        return run

    # ------------------------------------------------------------ expiry

    async def expire(self) -> int:
        """End the runs whose tool results are overdue (failed,
        DEADLINE_EXCEEDED ``TOOL_RESULTS_TIMEOUT``, naming the unanswered
        calls); returns how many."""
        ended = 0
        async with self.store.pool.acquire() as conn, conn.transaction():
            for row in await self.store.lock_expired_waits(conn):
                continuation = worker_hub_pb2.RunContinuation()
                if row["continuation"] is not None:
                    continuation.ParseFromString(row["continuation"])
                missing = _unanswered(continuation)
                names = ", ".join(f"{c.name} ({c.id})" for c in missing[:10]) + (
                    " ..." if len(missing) > 10 else ""
                )
                error = common_pb2.RunError(
                    code="DEADLINE_EXCEEDED",
                    reason="TOOL_RESULTS_TIMEOUT",
                    message=f"the client sent no result for {len(missing)} tool call(s) within "
                    f"{self.timeout_s:g} s (gateway.tool_results_timeout_s): {names}",
                    retryable=False,
                    metadata={"tool_call_ids": ",".join(c.id for c in missing)},
                )
                event = event_bytes(failed=common_pb2.RunFailed(error=error))
                if await self.store.finish(
                    conn, row["id"], status=RunStatus.FAILED, event=event, error=error
                ):
                    ended += 1
                    log.info("run %s failed: no client tool results in time", row["id"])
        if ended:
            metrics.RUNS_TOTAL.labels(RunStatus.FAILED).inc(ended)
            self.wake()  # the session's next run may start
        return ended

    async def run(self) -> None:
        """Expire overdue waits every ``sweep_interval_s`` (until cancelled)."""
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.expire()
            except Exception as exc:
                if transient_database_error(exc):
                    log.warning("expiring tool-result waits failed (%s); next sweep", exc)
                else:
                    log.exception("expiring tool-result waits failed")

    @staticmethod
    async def stop(task: asyncio.Task[None]) -> None:
        """Cancel the task running :meth:`run` and wait for it."""
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
