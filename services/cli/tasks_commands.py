"""``runyard tasks spawn|list|show|cancel``: background tasks through the gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from runyard._proto.v1 import common_pb2, gateway_pb2
from runyard.cli.client_commands import _client, _error
from runyard.common.errors import RunyardError

__all__ = ["add_parsers", "format_task"]


def _status(task: common_pb2.Task) -> str:
    return common_pb2.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_")


def format_task(task: common_pb2.Task) -> str:
    """One line: id, status, attempt, concurrency key, description."""
    return (
        f"{task.id}  {_status(task):<11} attempt {task.attempt:<2} "
        f"{task.concurrency_key:<24} {task.description}"
    )


def _details(task: common_pb2.Task) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": task.id,
        "status": _status(task),
        "description": task.description,
        "parent_session_id": task.parent_session_id,
        "session_key": task.session_key,
        "agent_id": task.agent_id,
        "model": task.model,
        "concurrency_key": task.concurrency_key,
        "attempt": task.attempt,
        "depth": task.depth,
        "created": task.create_time.ToJsonString(),
    }
    if task.HasField("start_time"):
        out["started"] = task.start_time.ToJsonString()
    if task.HasField("end_time"):
        out["ended"] = task.end_time.ToJsonString()
    if task.result:
        out["result"] = task.result
    if task.HasField("error"):
        out["error"] = f"{task.error.reason}: {task.error.message}"
    if task.exclude_models:
        out["exclude_models"] = list(task.exclude_models)
    if task.notices:
        out["notices"] = [f"attempt {n.attempt}: {n.message}" for n in task.notices]
    return out


async def _tasks(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        try:
            if args.tasks_command == "spawn":
                reply = await client.unary(
                    "SpawnTask",
                    gateway_pb2.SpawnTaskRequest(
                        parent_session_key=args.session,
                        agent_id=args.agent or "",
                        prompt=" ".join(args.prompt) if args.prompt else sys.stdin.read(),
                        description=args.description or "",
                        model=args.model or "",
                    ),
                )
                print(format_task(reply.task))  # type: ignore[attr-defined]
            elif args.tasks_command == "list":
                token, shown = "", 0
                while True:
                    page = await client.unary(
                        "ListTasks",
                        gateway_pb2.ListTasksRequest(
                            parent_session_key=args.session or "",
                            parent_session_id=args.parent or "",
                            page_size=200,
                            page_token=token,
                        ),
                    )
                    for task in page.tasks:  # type: ignore[attr-defined]
                        print(format_task(task))
                        shown += 1
                    token = page.next_page_token  # type: ignore[attr-defined]
                    if not token:
                        break
                if not shown:
                    print("no tasks", file=sys.stderr)
            elif args.tasks_command == "show":
                reply = await client.unary("GetTask", gateway_pb2.GetTaskRequest(task_id=args.task_id))
                print(json.dumps(_details(reply.task), indent=2))  # type: ignore[attr-defined]
            elif args.tasks_command == "cancel":
                reply = await client.unary(
                    "CancelTask",
                    gateway_pb2.CancelTaskRequest(task_id=args.task_id, reason=args.reason or ""),
                )
                print(format_task(reply.task))  # type: ignore[attr-defined]
        except RunyardError as exc:
            return _error(exc)
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``tasks`` to the ``runyard`` parser."""
    tasks = sub.add_parser("tasks", help="spawn, list, show or cancel background tasks")
    tasks.add_argument("--gateway", help="gateway host:port (default: endpoints.gateway)")
    tasks.add_argument("--api-key", help="API key (default: $RUNYARD_API_KEY)")
    tsub = tasks.add_subparsers(dest="tasks_command", required=True)
    spawn = tsub.add_parser("spawn", help="start a task under a session")
    spawn.add_argument("--session", required=True, help="parent session key")
    spawn.add_argument("--agent", help="agent id (default: the session's)")
    spawn.add_argument("--description", help="a few words naming the task")
    spawn.add_argument("--model", help="'provider/model' instead of the agent's")
    spawn.add_argument("prompt", nargs="*", help="the task's prompt (default: read stdin)")
    lst = tsub.add_parser("list", help="the tasks spawned under a session")
    parent = lst.add_mutually_exclusive_group(required=True)
    parent.add_argument("--session", help="parent session key (its current session)")
    parent.add_argument("--parent", help="parent session id")
    show = tsub.add_parser("show", help="one task with its result, error and retry notices")
    show.add_argument("task_id")
    cancel = tsub.add_parser("cancel", help="cancel a task and its subtasks")
    cancel.add_argument("task_id")
    cancel.add_argument("--reason")
    tasks.set_defaults(func=lambda a: asyncio.run(_tasks(a)))
