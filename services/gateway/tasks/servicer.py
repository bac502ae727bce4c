"""``runyard.v1.TaskService``: the built-in tools' access to tasks (internal listener)."""

from __future__ import annotations

import hashlib
import uuid

from runyard._proto.v1 import tasks_pb2, tasks_pb2_grpc
from runyard.common.auth import RunClaims, RunTokenVerifier, check_internal
from runyard.common.errors import FailedPrecondition
from runyard.common.grpctypes import ServicerContext
from runyard.common.protoutil import parse_uuid
from runyard.gateway.run_status import RunStatus
from runyard.gateway.runs import RunStore
from runyard.gateway.tasks.manager import TaskManager
from runyard.gateway.tasks.model import SpawnRequest

__all__ = ["TaskServicer"]


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    """``runyard.v1.TaskService``: the built-in tools' access to tasks.

    Every call carries the internal credential and the run token of the run
    executing the tool; the token's run must be running at the token's
    epoch, and scopes the call: spawns go under its session, reads see the
    tasks spawned under its session key (so a conversation still finds its
    tasks after a compaction rolled it over to a new session id).

    Args:
        manager: the tasks.
        runs: the runs queue (the token's run is checked there).
        signer: verifies run tokens.
        internal_secret: what every call must carry.
    """

    def __init__(
        self, manager: TaskManager, runs: RunStore, signer: RunTokenVerifier, *, internal_secret: str
    ):
        self.manager = manager
        self.runs = runs
        self.signer = signer
        self.internal_secret = internal_secret

    async def _run(self, context: ServicerContext, token: str) -> tuple[RunClaims, str]:
        check_internal(context, self.internal_secret)
        claims = self.signer.verify(token)
        row = await self.runs.token_run(claims.org_id, uuid.UUID(claims.run_id))
        if row is None or row["status"] != RunStatus.RUNNING or row["epoch"] != claims.epoch:
            raise FailedPrecondition(
                "the run token's run is not running at this epoch", reason="RUN_NOT_ACTIVE", field="run_token"
            )
        return claims, row["session_key"]

    async def SpawnTask(
        self, request: tasks_pb2.TaskServiceSpawnTaskRequest, context: ServicerContext
    ) -> tasks_pb2.TaskServiceSpawnTaskResponse:
        """Spawn a task under the token's session (see :meth:`TaskManager.spawn`).

        Raises:
            Unauthenticated: no service credential, or a missing, forged or
                expired run token.
            FailedPrecondition: the token's run is not running at its epoch
                (RUN_NOT_ACTIVE); plus every error of :meth:`TaskManager.spawn`.
        """
        claims, _ = await self._run(context, request.run_token)
        spawn = SpawnRequest(
            parent_session_id=claims.session_id,
            agent_id=request.agent_id,
            prompt=request.prompt,
            description=request.description,
            model=request.model,
            max_tool_calls=request.max_tool_calls,
            idempotency_key=request.idempotency_key,
        )
        # The key names one spawn of one run (its n-th spawn_task call): a run
        # that re-executes gets the task its lost execution spawned, even if
        # the model worded the call differently this time.
        fingerprint = (
            hashlib.sha256(request.idempotency_key.encode()).digest() if request.idempotency_key else b""
        )
        task = await self.manager.spawn(claims.org_id, spawn, fingerprint=fingerprint)
        return tasks_pb2.TaskServiceSpawnTaskResponse(task=task)

    async def GetTask(
        self, request: tasks_pb2.TaskServiceGetTaskRequest, context: ServicerContext
    ) -> tasks_pb2.TaskServiceGetTaskResponse:
        """A task spawned under the token's session key.

        Raises:
            Unauthenticated, FailedPrecondition: as for :meth:`SpawnTask`.
            InvalidArgument: ``task_id`` is not an id (INVALID_ID).
            NotFound: no such task under the token's session key (TASK_NOT_FOUND).
        """
        claims, session_key = await self._run(context, request.run_token)
        task_id = parse_uuid(request.task_id, "task_id", what="task id")
        task = await self.manager.get(claims.org_id, task_id, parent_session_key=session_key)
        return tasks_pb2.TaskServiceGetTaskResponse(task=task)
