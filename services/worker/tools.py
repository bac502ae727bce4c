"""Tool sources of the tool loop, and the built-in agent tools.

Every kind of tool a run can offer its model is a :class:`ToolSource`: it
says which tools it offers a run (``offered``) and executes a call
(``call``). The tool loop
(:meth:`runyard.worker.runner.RunExecutor._converse`) goes through
``RunExecutor.sources`` (server-side sources, in precedence order: the
built-in tools first, then e.g. MCP servers) and the run's client-side tools
last. :func:`resolve_tools` decides, per run, which source answers which
name: tool names are unique in one run. A server-side name offered by two
sources goes to the first (the later one is skipped, with a warning in the
log); a client-side tool whose name a server-side source offers fails the
run (INVALID_ARGUMENT, TOOL_NAME_CONFLICT), and the gateway refuses client
tools named like a built-in tool when the message is sent.

The built-in tools are ``spawn_task`` and ``task_output`` (DESIGN.md
section 7). A run offers them to its model when its agent lists them
(``agents.<id>.tools``) or the run sets ``RunOptions.tools_enabled``.
:class:`TaskTools` executes them through the gateway's internal
``TaskService`` with the run's token: a run spawns tasks under its own
session and reads only those.

* ``spawn_task {prompt, description?, agent_id?, model?, max_tool_calls?}``
  starts a background task and answers at once with its id and status; the
  session gets a notification message when it ends.
* ``task_output {task_id, wait_s?}`` reads a task: status, and its result or
  error once it ended; ``wait_s`` (at most ``tasks.tool_wait_max_s``) waits
  for the end first.

Tool results are JSON objects. A failure (bad arguments, an unknown task, a
limit) is a tool result with ``is_error`` that the model reads; it does not
fail the run.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from runyard._proto.v1 import common_pb2, tasks_pb2, tasks_pb2_grpc
from runyard.common import metrics
from runyard.common.config import Config
from runyard.common.errors import InvalidArgument, RunyardError

__all__ = [
    "BUILTIN_TOOLS",
    "ClientTools",
    "RunTools",
    "TaskTools",
    "ToolResult",
    "ToolSource",
    "call_ordinal",
    "offered_tools",
    "record_tool_call",
    "resolve_tools",
]

log = logging.getLogger(__name__)

_STATUS = {v: k.removeprefix("TASK_STATUS_") for k, v in common_pb2.TaskStatus.items()}
_ENDED = {
    common_pb2.TASK_STATUS_COMPLETED,
    common_pb2.TASK_STATUS_ERROR,
    common_pb2.TASK_STATUS_CANCELLED,
    common_pb2.TASK_STATUS_INTERRUPTED,
}
_POLL_S = 0.25

SPAWN_TASK = common_pb2.ToolDefinition(
    name="spawn_task",
    description=(
        "Start a background task: another agent works on `prompt` in its own session while you carry on. "
        "Returns the task id at once. You receive a message when the task ends (with its result), and "
        "task_output reads it any time."
    ),
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {
                "prompt": {
                    "type": "string",
                    "description": "Everything the task needs to know: it sees nothing else.",
                },
                "description": {
                    "type": "string",
                    "description": "A few words naming the task (shown in updates).",
                },
                "agent_id": {"type": "string", "description": "Agent to run it (default: yours)."},
                "model": {"type": "string", "description": "'provider/model' to use instead of the agent's."},
                "max_tool_calls": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Tool calls the task may make.",
                },
            },
            "required": ["prompt"],
            "additionalProperties": False,
        }
    ),
)
TASK_OUTPUT = common_pb2.ToolDefinition(
    name="task_output",
    description=(
        "Read a background task started with spawn_task: its status and, once it ended, its result or error. "
        "Set wait_s to wait up to that many seconds for it to end."
    ),
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {
                "task_id": {"type": "string"},
                "wait_s": {
                    "type": "number",
                    "minimum": 0,
                    "description": "Wait this long for the task to end.",
                },
            },
            "required": ["task_id"],
            "additionalProperties": False,
        }
    ),
)
#: The built-in tools by name.
BUILTIN_TOOLS: dict[str, common_pb2.ToolDefinition] = {"spawn_task": SPAWN_TASK, "task_output": TASK_OUTPUT}


def offered_tools(config: Config, payload: common_pb2.RunPayload) -> list[common_pb2.ToolDefinition]:
    """The built-in tools a run offers: its agent's ``tools``, or all of them
    with ``RunOptions.tools_enabled``."""
    agent = config.agent(payload.agent_id)
    names: set[str] = set(agent.tools) if agent is not None else set()
    if payload.options.tools_enabled:
        names |= set(BUILTIN_TOOLS)
    return [tool for name, tool in BUILTIN_TOOLS.items() if name in names]


@dataclass(frozen=True, slots=True)
class ToolResult:
    """What a tool call returned (``content`` is JSON text, or an error message)."""

    content: str
    is_error: bool = False


@runtime_checkable
class ToolSource(Protocol):
    """A kind of tool the tool loop can offer and call.

    ``source`` names the kind ("builtin", "client", "mcp"): the ``source``
    label of the tool metrics and of ``tool_call``/``tool_result`` events.
    ``offered(payload)`` lists the tools this source offers the run (it may
    depend on the agent and the run's options; it is called once per
    execution and must not block). ``call(payload, call)`` executes one call
    and returns its result; a failure the model should read (bad arguments,
    a tool error, a timeout) is a result with ``is_error``, not an
    exception. An exception from ``call`` ends the run: an infrastructure
    fault (:func:`runyard.worker.runner.infrastructure_failure`) hands the
    run back to the queue, a :class:`RunyardError` fails it. A call that
    has side effects can key them on :func:`call_ordinal`, which is stable
    when a run executes again after its worker was lost.
    """

    source: str

    def offered(self, payload: common_pb2.RunPayload) -> list[common_pb2.ToolDefinition]: ...

    async def call(self, payload: common_pb2.RunPayload, call: common_pb2.ToolCall) -> ToolResult: ...


#: See :func:`call_ordinal`; set by the tool loop around each ``ToolSource.call``.
_ORDINAL: contextvars.ContextVar[int] = contextvars.ContextVar("runyard_tool_call_ordinal", default=0)


def call_ordinal() -> int:
    """Inside ``ToolSource.call``: how many calls of this tool the run has
    made, this one included (1-based). The same call gets the same number
    when the run executes again (its worker was lost) or continues after
    client tool results, so it can key an idempotent side effect. 0 outside
    the tool loop."""
    return _ORDINAL.get()


class ClientTools:
    """The run's client-side tools (``RunOptions.client_tools``, checked by
    the gateway when the message was sent): a :class:`ToolSource` whose
    calls the tool loop does not execute. A call of one pauses the run
    (``requires_action``) until the client sends the result
    (:mod:`runyard.gateway.tool_results`)."""

    source = "client"

    def offered(self, payload: common_pb2.RunPayload) -> list[common_pb2.ToolDefinition]:
        return list(payload.options.client_tools)

    async def call(self, payload: common_pb2.RunPayload, call: common_pb2.ToolCall) -> ToolResult:
        """Never called by the tool loop (it pauses the run instead)."""
        return _error(f"{call.name!r} is a client-side tool: the client answers it")


#: Most distinct tool names the metrics label (a client names its tools freely).
_MAX_TOOL_LABELS = 200
_labelled: set[tuple[str, str]] = set()


def record_tool_call(source: str, name: str, is_error: bool, seconds: float) -> None:
    """Count one tool call in ``runyard_tool_calls_total`` and
    ``runyard_tool_call_duration_seconds``. ``source`` "" means the run
    offered no such tool: its name is labelled "(undeclared)" (a model may
    invent any name); beyond the first 200 (source, tool) pairs of this
    process, names are labelled "(other)"."""
    tool = name if source else "(undeclared)"
    if (source, tool) not in _labelled:
        if len(_labelled) >= _MAX_TOOL_LABELS:
            tool = "(other)"
        else:
            _labelled.add((source, tool))
    label = source or "none"
    metrics.TOOL_CALLS_TOTAL.labels(tool, label, "error" if is_error else "ok").inc()
    metrics.TOOL_CALL_DURATION_SECONDS.labels(tool, label).observe(max(seconds, 0.0))


@dataclass(slots=True)
class RunTools:
    """The tools one run offers, resolved from its sources (:func:`resolve_tools`).

    ``definitions`` are offered to the model, in source order;
    ``by_name`` maps a tool name to the source that answers it.
    """

    definitions: list[common_pb2.ToolDefinition] = field(default_factory=list)
    by_name: dict[str, ToolSource] = field(default_factory=dict)

    def source_of(self, name: str) -> str:
        """The ``source`` label of the tool ``name`` ("" when the run offers no such tool)."""
        found = self.by_name.get(name)
        return found.source if found is not None else ""


def resolve_tools(
    sources: Sequence[ToolSource], payload: common_pb2.RunPayload, run_id: str = ""
) -> RunTools:
    """The tools ``payload``'s run offers: every source's ``offered``, in order.

    Names are unique in a run. A name a source offers after an earlier
    source offered it is skipped (logged as a warning: an operator's
    configuration offers the same name twice), except for client-side tools
    (``source == "client"``), whose clash with a server-side tool is the
    caller's to fix.

    Raises:
        InvalidArgument: a client-side tool has the name of a server-side
            tool of this run (TOOL_NAME_CONFLICT; metadata ``tool`` and
            ``source``).
    """
    tools = RunTools()
    for source in sources:
        for definition in source.offered(payload):
            taken = tools.by_name.get(definition.name)
            if taken is None:
                tools.by_name[definition.name] = source
                tools.definitions.append(definition)
                continue
            if source.source == "client":
                raise InvalidArgument(
                    f"the client-side tool {definition.name!r} has the name of a server-side tool "
                    f"({taken.source}) of this agent; rename it",
                    reason="TOOL_NAME_CONFLICT",
                    field="options.client_tools",
                    metadata={"tool": definition.name, "source": taken.source},
                )
            log.warning(
                "run %s: tool %r of source %s is skipped: source %s offers that name first",
                run_id or payload.run_id,
                definition.name,
                source.source,
                taken.source,
            )
    return tools


def _error(message: str) -> ToolResult:
    return ToolResult(json.dumps({"error": message}), is_error=True)


def _summary(task: common_pb2.Task) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task_id": task.id,
        "status": _STATUS.get(task.status, "UNSPECIFIED"),
        "description": task.description,
        "attempt": task.attempt,
    }
    if task.status == common_pb2.TASK_STATUS_COMPLETED:
        out["result"] = task.result
    elif task.status in _ENDED:
        out["error"] = task.error.message or task.result
    if task.HasField("end_time"):
        out["duration_s"] = round((task.end_time.ToNanoseconds() - task.create_time.ToNanoseconds()) / 1e9, 3)
    return out


class TaskTools:
    """The built-in tools (a :class:`ToolSource`, ``source = "builtin"``):
    ``spawn_task`` / ``task_output`` calls through ``TaskService``.

    Args:
        stub: ``TaskService`` on the gateway.
        metadata: the internal credential metadata.
        wait_max_s: longest wait ``task_output`` may ask for.
        retrying: runs a call, retrying while the gateway is unavailable
            (the executor's dependency retry).
        config: what :meth:`offered` reads (agents' ``tools``); None offers
            the tools only to runs with ``RunOptions.tools_enabled``.
    """

    source = "builtin"

    def __init__(
        self,
        stub: tasks_pb2_grpc.TaskServiceStub,
        metadata: Sequence[tuple[str, str]],
        *,
        wait_max_s: float,
        retrying: Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]],
        config: Config | None = None,
    ):
        self.stub = stub
        self.metadata = tuple(metadata)
        self.wait_max_s = wait_max_s
        self.retrying = retrying
        self.config = config

    def offered(self, payload: common_pb2.RunPayload) -> list[common_pb2.ToolDefinition]:
        """:func:`offered_tools` (the agent's ``tools``, or all with ``tools_enabled``)."""
        if self.config is None:
            return list(BUILTIN_TOOLS.values()) if payload.options.tools_enabled else []
        return offered_tools(self.config, payload)

    async def call(self, payload: common_pb2.RunPayload, call: common_pb2.ToolCall) -> ToolResult:
        """:meth:`execute` with the loop's :func:`call_ordinal`."""
        return await self.execute(payload, call, call_ordinal() or 1)

    async def execute(
        self, payload: common_pb2.RunPayload, call: common_pb2.ToolCall, ordinal: int
    ) -> ToolResult:
        """Run one tool call of ``payload``'s run; ``ordinal`` numbers the
        run's calls of that tool (the idempotency key of a spawn, so a run
        that re-executes after its worker was lost spawns nothing twice)."""
        try:
            arguments = json.loads(call.arguments_json or "{}")
        except json.JSONDecodeError as exc:
            return _error(f"arguments are not valid JSON: {exc}")
        if not isinstance(arguments, dict):
            return _error("arguments must be a JSON object")
        try:
            if call.name == "spawn_task":
                return await self._spawn(payload, arguments, ordinal)
            if call.name == "task_output":
                return await self._output(payload, arguments)
        except RunyardError as exc:
            return _error(f"{exc.reason}: {exc.message}")
        return _error(f"unknown tool {call.name!r}; available: {', '.join(BUILTIN_TOOLS)}")

    async def _spawn(
        self, payload: common_pb2.RunPayload, arguments: dict[str, Any], ordinal: int
    ) -> ToolResult:
        prompt = arguments.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return _error("'prompt' (a non-empty string) is required")
        text = {name: arguments.get(name, "") for name in ("description", "agent_id", "model")}
        if any(not isinstance(value, str) for value in text.values()):
            return _error("'description', 'agent_id' and 'model' must be strings")
        limit = arguments.get("max_tool_calls", 0)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            return _error("'max_tool_calls' must be a whole number >= 0")
        request = tasks_pb2.TaskServiceSpawnTaskRequest(
            run_token=payload.run_token,
            prompt=prompt,
            max_tool_calls=limit,
            idempotency_key=f"runyard.tool:{payload.run_id}:spawn_task:{ordinal}",
            **text,
        )
        response = await self.retrying(
            lambda: self.stub.SpawnTask(request, metadata=self.metadata, timeout=30)
        )
        summary = _summary(response.task)
        summary["note"] = (
            "The task runs in the background. You will get a message when it ends; "
            "task_output reads it any time."
        )
        return ToolResult(json.dumps(summary))

    async def _output(self, payload: common_pb2.RunPayload, arguments: dict[str, Any]) -> ToolResult:
        task_id = arguments.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            return _error("'task_id' (a string) is required")
        wait = arguments.get("wait_s", 0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            return _error("'wait_s' must be a number >= 0")
        deadline = time.monotonic() + min(float(wait), self.wait_max_s)
        request = tasks_pb2.TaskServiceGetTaskRequest(run_token=payload.run_token, task_id=task_id)
        while True:
            response = await self.retrying(
                lambda: self.stub.GetTask(request, metadata=self.metadata, timeout=30)
            )
            if response.task.status in _ENDED or time.monotonic() >= deadline:
                return ToolResult(json.dumps(_summary(response.task)))
            await asyncio.sleep(min(_POLL_S, max(deadline - time.monotonic(), 0.0)))
