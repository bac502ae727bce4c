"""``runyard.v1.SessionService``: conversation state over gRPC.

Org-scoped calls (resolve, list, read, reset, delete, commit) come from the
gateway with the internal credential; transcript reads come from workers
with a run token and are confined to the token's session. Workers never
write: a run's messages reach the transcript through the gateway's
``CommitRun`` when it accepts the run's completion.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

from runyard._proto.v1 import common_pb2, sessions_pb2, sessions_pb2_grpc
from runyard.common.auth import RunTokenVerifier, check_internal
from runyard.common.errors import FailedPrecondition, InvalidArgument
from runyard.common.grpctypes import ServicerContext
from runyard.common.pagination import decode_page_token, encode_page_token, invalid_page_token, page_size
from runyard.common.protoutil import parse_uuid
from runyard.sessions.lifecycle import Lifecycle
from runyard.sessions.maintenance import Maintenance
from runyard.sessions.store import SessionStore

__all__ = ["SessionServicer"]

log = logging.getLogger(__name__)

MAX_EVENTS_PAGE = 1000


def _optional_uuid(value: str, field: str) -> uuid.UUID | None:
    return parse_uuid(value, field, what="session id") if value else None


def _require_org(org_id: str) -> str:
    if not org_id:
        raise InvalidArgument("org_id is required", reason="MISSING_FIELD", field="org_id")
    return org_id


class SessionServicer(sessions_pb2_grpc.SessionServiceServicer):
    """The gRPC face of :class:`SessionStore`.

    Args:
        store: the schema's SQL.
        signer: verifies run tokens.
        internal_secret: the service-to-service credential.
        lifecycle: this instance's lifecycle (for SetShutdownMode).
        maintenance: maintenance passes (for PruneSessions).
    """

    def __init__(
        self,
        store: SessionStore,
        signer: RunTokenVerifier,
        internal_secret: str,
        *,
        lifecycle: Lifecycle | None = None,
        maintenance: Maintenance | None = None,
    ):
        self.store = store
        self.signer = signer
        self.internal_secret = internal_secret
        self.lifecycle = lifecycle
        self.maintenance = maintenance

    async def ResolveSession(
        self, request: sessions_pb2.ResolveSessionRequest, context: ServicerContext
    ) -> sessions_pb2.ResolveSessionResponse:
        check_internal(context, self.internal_secret)
        org = _require_org(request.org_id)
        if not request.session_key:
            raise InvalidArgument("session_key is required", reason="MISSING_FIELD", field="session_key")
        session, created, events, read = await self.store.resolve_with_transcript(
            org,
            request.session_key,
            request.agent_id,
            parent_session_id=_optional_uuid(request.parent_session_id, "parent_session_id"),
            create=not request.no_create,
            transcript_max_bytes=request.transcript_max_bytes,
        )
        response = sessions_pb2.ResolveSessionResponse(session=session, created=created, events=events)
        if read is not None:
            response.transcript_included = True
            response.transcript.transcript.ParseFromString(read.data)
            response.transcript.session_id = read.session_id
            response.transcript.head_turn = read.head_turn
        return response

    async def GetSession(
        self, request: sessions_pb2.SessionServiceGetSessionRequest, context: ServicerContext
    ) -> sessions_pb2.SessionServiceGetSessionResponse:
        check_internal(context, self.internal_secret)
        session = await self.store.get(
            _require_org(request.org_id),
            _optional_uuid(request.session_id, "session_id"),
            request.session_key,
        )
        return sessions_pb2.SessionServiceGetSessionResponse(session=session)

    async def ListSessions(
        self, request: sessions_pb2.SessionServiceListSessionsRequest, context: ServicerContext
    ) -> sessions_pb2.SessionServiceListSessionsResponse:
        check_internal(context, self.internal_secret)
        sessions, token = await self.store.list(
            _require_org(request.org_id),
            agent_id=request.agent_id,
            size=request.page_size,
            token=request.page_token,
            include_ended=request.include_ended,
            parent_session_id=_optional_uuid(request.parent_session_id, "parent_session_id"),
        )
        return sessions_pb2.SessionServiceListSessionsResponse(sessions=sessions, next_page_token=token)

    async def GetMessages(
        self, request: sessions_pb2.SessionServiceGetMessagesRequest, context: ServicerContext
    ) -> sessions_pb2.SessionServiceGetMessagesResponse:
        check_internal(context, self.internal_secret)
        limit = page_size(request.page_size)
        cursor = decode_page_token("messages", request.page_token)
        row, data = await self.store.head_transcript(
            _require_org(request.org_id),
            _optional_uuid(request.session_id, "session_id"),
            request.session_key,
        )
        offset = 0
        if cursor is not None:
            # The cursor pins the snapshot, so pages stay consistent while new
            # runs complete; a cursor from another session is refused.
            if (
                len(cursor) != 2
                or cursor[0] != str(row["id"])
                or not isinstance(cursor[1], int)
                or cursor[1] < 0
            ):
                raise invalid_page_token()
            offset = cursor[1]
        transcript = common_pb2.Transcript.FromString(data)
        page = transcript.messages[offset : offset + limit]
        token = ""
        if offset + limit < len(transcript.messages):
            token = encode_page_token("messages", [str(row["id"]), offset + limit])
        return sessions_pb2.SessionServiceGetMessagesResponse(
            messages=page, next_page_token=token, summary=transcript.summary
        )

    async def ResetSession(
        self, request: sessions_pb2.SessionServiceResetSessionRequest, context: ServicerContext
    ) -> sessions_pb2.SessionServiceResetSessionResponse:
        check_internal(context, self.internal_secret)
        session, previous = await self.store.reset(
            _require_org(request.org_id),
            _optional_uuid(request.session_id, "session_id"),
            request.session_key,
        )
        return sessions_pb2.SessionServiceResetSessionResponse(session=session, previous_session_id=previous)

    async def DeleteSession(
        self, request: sessions_pb2.SessionServiceDeleteSessionRequest, context: ServicerContext
    ) -> sessions_pb2.SessionServiceDeleteSessionResponse:
        check_internal(context, self.internal_secret)
        deleted = await self.store.delete(
            _require_org(request.org_id),
            _optional_uuid(request.session_id, "session_id"),
            request.session_key,
        )
        return sessions_pb2.SessionServiceDeleteSessionResponse(session_id=deleted)

    async def GetTranscript(
        self, request: sessions_pb2.GetTranscriptRequest, context: ServicerContext
    ) -> sessions_pb2.GetTranscriptResponse:
        claims = self.signer.verify(request.run_token)
        read = await self.store.read_transcript(claims, request.session_id)
        if read.committed_epoch is not None and read.committed_epoch >= claims.epoch:
            # The run finished under this (or a later) claim: its tokens are spent. A later
            # claim of the same run (its completion report was lost) reads run_committed.
            raise FailedPrecondition(
                f"run {claims.run_id} already finished (committed at epoch {read.committed_epoch}); "
                "its run token is no longer accepted",
                reason="RUN_NOT_ACTIVE",
                field="run_token",
            )
        return sessions_pb2.GetTranscriptResponse(
            transcript=common_pb2.Transcript.FromString(read.data),
            session_id=read.session_id,
            head_turn=read.head_turn,
            run_committed=read.run_committed,
        )

    async def CommitRun(
        self, request: sessions_pb2.CommitRunRequest, context: ServicerContext
    ) -> sessions_pb2.CommitRunResponse:
        check_internal(context, self.internal_secret)
        result = await self.store.commit_run(
            _require_org(request.org_id),
            parse_uuid(request.session_id, "session_id"),
            parse_uuid(request.run_id, "run_id"),
            request.epoch,
            request.append,
        )
        return sessions_pb2.CommitRunResponse(
            session_id=result.session_id,
            message_count=result.message_count,
            turn=result.turn,
            events=result.events,
        )

    async def ListEvents(
        self, request: sessions_pb2.ListEventsRequest, context: ServicerContext
    ) -> sessions_pb2.ListEventsResponse:
        check_internal(context, self.internal_secret)
        limit = min(request.limit or 100, MAX_EVENTS_PAGE)
        events = await self.store.list_events(request.after_id, limit, list(request.types))
        return sessions_pb2.ListEventsResponse(events=events)

    async def PruneSessions(
        self, request: sessions_pb2.PruneSessionsRequest, context: ServicerContext
    ) -> AsyncIterator[sessions_pb2.PruneSessionsResponse]:
        check_internal(context, self.internal_secret)
        if self.maintenance is None:
            raise FailedPrecondition(
                "maintenance is not available on this instance", reason="MAINTENANCE_UNAVAILABLE"
            )
        async for batch in self.maintenance.run(dry_run=request.dry_run, org_id=request.org_id):
            yield sessions_pb2.PruneSessionsResponse(
                sessions=batch.sessions, stats=batch.stats, dry_run=request.dry_run, done=batch.done
            )

    async def SetShutdownMode(
        self, request: sessions_pb2.SetShutdownModeRequest, context: ServicerContext
    ) -> sessions_pb2.SetShutdownModeResponse:
        check_internal(context, self.internal_secret)
        if request.mode not in (sessions_pb2.SHUTDOWN_MODE_SHUTDOWN, sessions_pb2.SHUTDOWN_MODE_RESTART):
            raise InvalidArgument(
                "mode must be SHUTDOWN or RESTART", reason="INVALID_ENUM_VALUE", field="mode"
            )
        if self.lifecycle is None:
            raise FailedPrecondition("this instance has no lifecycle manager", reason="LIFECYCLE_UNAVAILABLE")
        self.lifecycle.expect_restart(request.mode == sessions_pb2.SHUTDOWN_MODE_RESTART)
        mode = (
            sessions_pb2.SHUTDOWN_MODE_RESTART
            if self.lifecycle.mode == "restart"
            else sessions_pb2.SHUTDOWN_MODE_SHUTDOWN
        )
        return sessions_pb2.SetShutdownModeResponse(instance_id=self.store.instance_id, mode=mode)
