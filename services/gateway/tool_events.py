"""Lifecycle events of tool calls: ``tool.called`` and ``tool.completed``.

A run's ``tool_call`` event gives one ``tool.called``, its ``tool_result``
event one ``tool.completed`` (DESIGN.md section 6). They are built here
from the run events and written by whatever statement stores those events
(the run log's flush, the statement that ends or pauses a run, the one that
records a client's tool results; see :mod:`runyard.gateway.runs`), so each
is written exactly once, when its run event is.

The events carry the call's id, tool name and source, sizes and the
duration, never the arguments or the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from runyard._proto.v1 import common_pb2
from runyard.common import db
from runyard.common.protoutil import now

__all__ = ["TOOL_EVENT_KINDS", "tool_lifecycle"]

#: RunEvent members that have a lifecycle event.
TOOL_EVENT_KINDS = frozenset({"tool_call", "tool_result"})


def tool_lifecycle(
    info: db.Row | None,
    events: Iterable[common_pb2.RunEvent | bytes],
    *,
    source: str = "",
) -> list[common_pb2.LifecycleEvent]:
    """The ``tool.called`` / ``tool.completed`` events of a run's ``events``.

    Args:
        info: the run's lifecycle fields (``id``, ``org_id``, ``session_id``,
            ``session_key``, ``agent_id``, ``task_id``; see
            :class:`runyard.gateway.runs.Claim`); None gives no events.
        events: run events, parsed or serialized (others than tool calls
            and results are skipped).
        source: the emitting gateway instance.
    """
    if not info:
        return []
    out: list[common_pb2.LifecycleEvent] = []
    base: dict[str, Any] | None = None
    for item in events:
        event = common_pb2.RunEvent.FromString(item) if isinstance(item, bytes) else item
        kind = event.WhichOneof("event")
        if kind not in TOOL_EVENT_KINDS:
            continue
        if base is None:
            base = {
                "org_id": info["org_id"],
                "session_id": str(info["session_id"]),
                "session_key": info.get("session_key") or "",
                "agent_id": info.get("agent_id") or "",
                "run_id": str(info["id"]),
                "task_id": str(info.get("task_id") or ""),
                "source": source,
            }
        if kind == "tool_call":
            call = event.tool_call
            data = common_pb2.ToolLifecycleData(
                tool_call_id=call.call.id,
                name=call.call.name,
                source=call.source,
                size_bytes=len(call.call.arguments_json.encode()),
            )
            out.append(common_pb2.LifecycleEvent(type="tool.called", time=now(), tool=data, **base))
        else:
            result = event.tool_result
            data = common_pb2.ToolLifecycleData(
                tool_call_id=result.tool_call_id,
                name=result.name,
                source=result.source,
                is_error=result.is_error,
                size_bytes=len(result.content.encode()),
                duration_ms=result.duration_ms,
            )
            out.append(common_pb2.LifecycleEvent(type="tool.completed", time=now(), tool=data, **base))
    return out
