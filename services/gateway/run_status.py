"""The states of a run (``gateway.runs.status``) and which of them are final.

A run is inserted ``queued`` (or already ``running`` when it is claimed in
the same statement), is ``running`` while a worker holds it, waits as
``requires_action`` for the caller's client-side tool results (holding no
worker), and ends ``completed``, ``failed`` or ``cancelled``. The values are
the strings the ``runs_status_check`` constraint allows (migrations
0001 and 0007), so members compare equal to what the database returns.
"""

from __future__ import annotations

import enum

from runyard._proto.v1 import common_pb2

__all__ = ["ACTIVE", "TERMINAL", "TO_PROTO", "RunStatus"]


class RunStatus(enum.StrEnum):
    """The status of a run, as stored in ``gateway.runs.status``."""

    QUEUED = "queued"
    RUNNING = "running"
    #: Waits for client-side tool results (``RunRequiresAction``); not terminal.
    REQUIRES_ACTION = "requires_action"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Statuses a run never leaves. Their values are also the names of the
#: ``RunEvent`` oneof members that end a run's event stream.
TERMINAL: frozenset[RunStatus] = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})
#: Statuses of a run that has not ended (it blocks its session's queue).
ACTIVE: frozenset[RunStatus] = frozenset(RunStatus) - TERMINAL

#: The ``runyard.v1.RunStatus`` value of each status.
TO_PROTO: dict[RunStatus, common_pb2.RunStatus] = {
    RunStatus.QUEUED: common_pb2.RUN_STATUS_QUEUED,
    RunStatus.RUNNING: common_pb2.RUN_STATUS_RUNNING,
    RunStatus.REQUIRES_ACTION: common_pb2.RUN_STATUS_REQUIRES_ACTION,
    RunStatus.COMPLETED: common_pb2.RUN_STATUS_COMPLETED,
    RunStatus.FAILED: common_pb2.RUN_STATUS_FAILED,
    RunStatus.CANCELLED: common_pb2.RUN_STATUS_CANCELLED,
}
