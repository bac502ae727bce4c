"""The sessions service as background tasks use it: parent sessions looked
up, child sessions created (and deleted when their task was not)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from runyard._proto.v1 import common_pb2, sessions_pb2, sessions_pb2_grpc
from runyard.common.clients import call
from runyard.common.errors import RunyardError

__all__ = ["TaskSessions"]

log = logging.getLogger(__name__)


class TaskSessions:
    """Calls to ``SessionService`` with the internal credential.

    Args:
        stub: the sessions service.
        metadata: call metadata carrying the internal secret.
    """

    def __init__(self, stub: sessions_pb2_grpc.SessionServiceStub, metadata: Sequence[tuple[str, str]]):
        self.stub = stub
        self.metadata = tuple(metadata)

    async def get(
        self, org_id: str, session_id: str, session_key: str, timeout: float | None
    ) -> common_pb2.Session:
        """A session by id, else the current session of ``session_key``.

        Raises:
            NotFound: no such session (other orgs' look the same); any error of the call.
        """
        response: sessions_pb2.SessionServiceGetSessionResponse = await call(
            self.stub.GetSession(
                sessions_pb2.SessionServiceGetSessionRequest(
                    org_id=org_id, session_id=session_id, session_key=session_key
                ),
                metadata=self.metadata,
                timeout=timeout,
            )
        )
        return response.session

    async def create_child(
        self, org_id: str, session_key: str, agent_id: str, parent_id: str, timeout: float | None
    ) -> common_pb2.Session:
        """The task's own session (key ``session_key``), linked to its parent."""
        response: sessions_pb2.ResolveSessionResponse = await call(
            self.stub.ResolveSession(
                sessions_pb2.ResolveSessionRequest(
                    org_id=org_id, session_key=session_key, agent_id=agent_id, parent_session_id=parent_id
                ),
                metadata=self.metadata,
                timeout=timeout,
            )
        )
        return response.session

    async def discard(self, org_id: str, session_id: str) -> None:
        """Delete a child session created for a task that was not created (a failure is logged)."""
        try:
            await call(
                self.stub.DeleteSession(
                    sessions_pb2.SessionServiceDeleteSessionRequest(org_id=org_id, session_id=session_id),
                    metadata=self.metadata,
                    timeout=10,
                )
            )
        except RunyardError as exc:
            log.warning("could not delete unused task session %s: %s", session_id, exc.message)
