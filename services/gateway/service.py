"""``runyard.v1.GatewayService``: the public API.

Every call authenticates the caller and scopes what it reads or changes by
the caller's org. Session calls are proxied to the sessions service (which
owns that state); runs and their events live in the gateway's own schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg

from runyard._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, sessions_pb2, sessions_pb2_grpc
from runyard.common import db, tracing
from runyard.common.auth import internal_metadata
from runyard.common.clients import call, downstream_timeout
from runyard.common.config import Config
from runyard.common.errors import (
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    RunyardError,
    Unimplemented,
)
from runyard.common.faults import budget_for, retry_transient
from runyard.common.grpctypes import ServicerContext
from runyard.common.protoutil import now, parse_uuid
from runyard.common.server import settle_before_reject
from runyard.gateway.auth import Authenticator, Principal
from runyard.gateway.events import PUBLISH_WINDOW, Broker, RunLog, Subscription, follow
from runyard.gateway.hub import Dispatcher, WorkerConn
from runyard.gateway.run_status import TERMINAL, RunStatus
from runyard.gateway.runs import Claim, RunStore, request_hash, run_proto
from runyard.gateway.tasks import SpawnRequest, TaskManager
from runyard.gateway.tool_results import ToolResults, check_client_tools

if TYPE_CHECKING:
    from runyard.gateway.watch import Watcher

__all__ = ["GatewayServicer"]

log = logging.getLogger(__name__)

_SESSION_KEY = re.compile(r"^[A-Za-z0-9_.:@/+=#~|-]+$")
_MAX_IDEMPOTENCY_KEY = 255
_STRATEGIES = {
    common_pb2.MULTITASK_STRATEGY_UNSPECIFIED: "ENQUEUE",
    common_pb2.MULTITASK_STRATEGY_ENQUEUE: "ENQUEUE",
    common_pb2.MULTITASK_STRATEGY_REJECT: "REJECT",
    common_pb2.MULTITASK_STRATEGY_INTERRUPT: "INTERRUPT",
    common_pb2.MULTITASK_STRATEGY_COLLECT: "COLLECT",
}


def _require_session_ref(session_id: str, session_key: str) -> None:
    """Validate a (session_id | session_key) pair: one of them, a well-formed id.

    The contract's rules (protos/runyard/v1/gateway.proto) already checked the
    shape; this is for callers inside the gateway.
    """
    if session_id:
        parse_uuid(session_id, "session_id", what="session id")
    elif not session_key:
        raise InvalidArgument(
            "session_id or session_key is required", reason="MISSING_FIELD", field="session_id"
        )


#: Largest transcript the gateway carries from ResolveSession to the worker
#: with a run it claims at once (larger ones the worker reads itself).
_PREFETCH_TRANSCRIPT_BYTES = 256 * 1024


def _current_transcript(
    resolved: sessions_pb2.ResolveSessionResponse, row: Mapping[str, Any]
) -> sessions_pb2.GetTranscriptResponse | None:
    """The transcript read while resolving the session, if it is still the
    session's: every turn of a transcript comes from a run's commit, and the
    session's last completed run (whose end is ordered after its commit)
    says which turn it committed; with no run active (the run was claimed as
    it was queued), no commit can come in between."""
    if not resolved.transcript_included or resolved.transcript.session_id != resolved.session.id:
        return None
    if int(row.get("last_turn") or 0) != resolved.transcript.head_turn:
        return None
    return resolved.transcript


@dataclass(slots=True)
class _Submitted:
    """A run a SendMessage (or Chat send) queued or found: for a run it just
    queued, the subscription made before it existed and its first event."""

    run_id: uuid.UUID
    session_id: str
    subscription: Subscription | None = None
    known: list[common_pb2.RunEvent] = field(default_factory=list)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The public API over the runs queue and the sessions service."""

    def __init__(
        self,
        config: Config,
        store: RunStore,
        broker: Broker,
        dispatcher: Dispatcher,
        sessions: sessions_pb2_grpc.SessionServiceStub,
        auth: Authenticator,
        runlog: RunLog | None = None,
        *,
        tasks: TaskManager | None = None,
        tool_results: ToolResults | None = None,
        watch: Watcher | None = None,
    ):
        self.config = config
        self.store = store
        self.broker = broker
        self.runlog = runlog
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.auth = auth
        self.metadata = internal_metadata(config.auth.internal_secret)
        #: Set on shutdown (close_streams): open streams end with UNAVAILABLE so clients JoinRun elsewhere.
        self.closing = asyncio.Event()
        #: Background tasks (runyard.gateway.tasks); None: the task calls are UNIMPLEMENTED.
        self.tasks = tasks
        #: Client-side tools (runyard.gateway.tool_results); None: not accepted.
        self.tool_results = tool_results
        #: WatchEvents (runyard.gateway.watch); None: UNIMPLEMENTED.
        self.watch = watch

    # ------------------------------------------------------------ validation

    def _check_session_key(self, key: str, field: str = "session_key") -> None:
        """This deployment's limits on a session key (the contract's rules hold
        already; ``gateway.max_session_key_length`` may be tighter). Applies on
        every path that takes a key, reads included; the message never repeats the key."""
        limit = self.config.gateway.max_session_key_length
        if len(key) > limit:
            raise InvalidArgument(
                f"{field} is {len(key)} characters; the limit is {limit} (gateway.max_session_key_length)",
                reason="SESSION_KEY_TOO_LONG",
                field=field,
            )
        if key and not _SESSION_KEY.match(key):
            raise InvalidArgument(
                f"{field} may contain only letters, digits and _ . : @ / + = # ~ | -",
                reason="INVALID_SESSION_KEY",
                field=field,
            )

    def _validate_send(self, request: gateway_pb2.SendMessageRequest) -> str:
        cfg = self.config.gateway
        key = request.session_key
        if not key:
            raise InvalidArgument("session_key is required", reason="MISSING_FIELD", field="session_key")
        self._check_session_key(key)
        if not request.text.strip() and not request.attachments:
            raise InvalidArgument("text must not be empty", reason="EMPTY_TEXT", field="text")
        size = len(request.text.encode("utf-8"))
        if size > cfg.max_text_bytes:
            raise InvalidArgument(
                f"text is {size} bytes; the limit is {cfg.max_text_bytes} (gateway.max_text_bytes)",
                reason="TEXT_TOO_LONG",
                field="text",
            )
        if len(request.metadata) > cfg.max_metadata_entries:
            raise InvalidArgument(
                f"metadata has {len(request.metadata)} entries; the limit is {cfg.max_metadata_entries}",
                reason="METADATA_TOO_LARGE",
                field="metadata",
            )
        meta_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in request.metadata.items())
        if meta_bytes > cfg.max_metadata_bytes:
            raise InvalidArgument(
                f"metadata is {meta_bytes} bytes; the limit is {cfg.max_metadata_bytes}",
                reason="METADATA_TOO_LARGE",
                field="metadata",
            )
        if len(request.idempotency_key) > _MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(
                f"idempotency_key is longer than {_MAX_IDEMPOTENCY_KEY} characters",
                reason="IDEMPOTENCY_KEY_TOO_LONG",
                field="idempotency_key",
            )
        strategy = _STRATEGIES.get(request.multitask_strategy)
        if strategy is None:
            raise InvalidArgument(
                f"multitask_strategy {request.multitask_strategy} is not a known value",
                reason="INVALID_ENUM_VALUE",
                field="multitask_strategy",
            )
        check_client_tools(request.options.client_tools)  # issue 13: client-side tools
        if request.agent_id and request.agent_id not in self.config.agents:
            raise NotFound(
                f"agent {request.agent_id[:64]!r} is not configured",
                reason="AGENT_NOT_FOUND",
                field="agent_id",
            )
        if request.model.model:
            provider = request.model.model.split("/", 1)[0]
            if "/" not in request.model.model or provider not in self.config.providers:
                raise InvalidArgument(
                    f"model {request.model.model[:128]!r} must be 'provider/model' "
                    "with a configured provider",
                    reason="UNKNOWN_MODEL",
                    field="model.model",
                )
        return strategy

    # ------------------------------------------------------------ runs

    async def _submit(
        self, principal: Principal, request: gateway_pb2.SendMessageRequest, context: ServicerContext
    ) -> _Submitted:
        """Validate, resolve the session, queue the run (claimed at once when
        the session is idle and a worker here has room)."""
        principal.require("chat")
        strategy = self._validate_send(request)
        fingerprint = request_hash(request)
        if request.idempotency_key:
            existing = await retry_transient(
                lambda: self.store.find_idempotent(principal.org_id, request.idempotency_key),
                budget_s=budget_for(context),
            )
            if existing is not None:
                RunStore._check_fingerprint(existing, fingerprint)
                return _Submitted(existing["id"], str(existing["session_id"]))
        agent_id = request.agent_id or self.config.gateway.default_agent
        # A slot of a local worker, for a run claimed as it is queued (held
        # from here so the transcript read with the session can go with it).
        worker = self.dispatcher.reserve()
        try:
            resolved = await call(
                self.sessions.ResolveSession(
                    sessions_pb2.ResolveSessionRequest(
                        org_id=principal.org_id,
                        session_key=request.session_key,
                        agent_id=agent_id,
                        transcript_max_bytes=_PREFETCH_TRANSCRIPT_BYTES if worker is not None else 0,
                    ),
                    metadata=self.metadata,
                    timeout=downstream_timeout(context, 10.0),
                )
            )
            run_id = uuid.uuid4()
            payload = common_pb2.RunPayload(
                run_id=str(run_id),
                org_id=principal.org_id,
                session_id=resolved.session.id,
                session_key=request.session_key,
                agent_id=agent_id,
                input=common_pb2.RunInput(text=request.text, attachments=request.attachments),
                model=request.model,
                options=request.options,
                metadata=request.metadata,
                idempotency_key=request.idempotency_key,
                multitask_strategy=request.multitask_strategy,
                create_time=now(),
            )
            tracing.inject(payload.trace_context)  # the worker's run span continues this trace
            # Subscribed before the run exists: no event of it can be missed, so
            # the stream starts from memory without reading the table.
            subscription = self.broker.subscribe(run_id)
            try:
                row, created = await self._insert(
                    principal, payload, fingerprint, strategy, context, worker, resolved
                )
                if created and row["status"] == RunStatus.RUNNING:
                    await self.dispatcher.assign(
                        worker, Claim.from_row(row), payload, transcript=_current_transcript(resolved, row)
                    )
            except BaseException:
                self.broker.unsubscribe(run_id, subscription)
                raise
        finally:
            if worker is not None:
                self.dispatcher.unreserve(worker)
        if not created or row["status"] == RunStatus.QUEUED:
            self.dispatcher.wake()
        if not created or row["id"] != run_id:
            self.broker.unsubscribe(run_id, subscription)
            return _Submitted(row["id"], str(row["session_id"]))
        queued = common_pb2.RunEvent.FromString(row["queued_event"])
        queued.run_id, queued.session_id, queued.seq = str(run_id), str(row["session_id"]), 1
        return _Submitted(run_id, str(row["session_id"]), subscription, [queued])

    async def _insert(
        self,
        principal: Principal,
        payload: common_pb2.RunPayload,
        fingerprint: bytes,
        strategy: str,
        context: ServicerContext,
        worker: WorkerConn | None,
        resolved: sessions_pb2.ResolveSessionResponse,
    ) -> tuple[Any, bool]:
        """Queue the run (claimed for ``worker`` when it can be), retrying a
        database blip: a retry first looks for the run id this request
        already chose (the lost attempt may have committed), so a blip never
        queues the message twice nor fails the call. A run found that way is
        followed from the table (``created`` False); if the lost attempt had
        claimed it for ``worker``, it goes back to the queue at once."""
        attempts = 0

        async def once() -> tuple[Any, bool]:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                with contextlib.suppress(NotFound):
                    return await self.store.get(principal.org_id, uuid.UUID(payload.run_id)), False
            return await self.store.insert(
                payload,
                fingerprint=fingerprint,
                strategy=strategy,
                claim_for=worker.worker_id if worker is not None else None,
                relayed=resolved.events,
            )

        row, created = await retry_transient(once, budget_s=budget_for(context))
        if (
            not created
            and worker is not None
            and row["id"] == uuid.UUID(payload.run_id)
            and row["status"] == RunStatus.RUNNING
            and row["worker_id"] == worker.worker_id
        ):
            await self.store.requeue([(row["id"], row["epoch"])], count_attempt=False)
        return row, created

    async def _stream(
        self,
        run_id: uuid.UUID,
        session_id: str,
        after_seq: int,
        *,
        subscription: Subscription | None = None,
        known: list[common_pb2.RunEvent] | None = None,
    ) -> AsyncIterator[common_pb2.RunEvent]:
        """Follow a run, ending with UNAVAILABLE (retry elsewhere) if this gateway shuts down."""
        events = follow(
            self.store,
            self.broker,
            run_id,
            session_id,
            after_seq,
            memory=self.runlog.memory_after if self.runlog is not None else None,
            subscription=subscription,
            known=known or (),
            closing=self.closing,
        )
        try:
            async for event in events:
                yield event
        finally:
            # The client left, the run ended or the gateway is closing.
            await events.aclose()

    def close_streams(self) -> None:
        """Shutdown: every open run stream ends with UNAVAILABLE (DRAINING)
        naming the ``after_seq`` to resume from with JoinRun elsewhere."""
        self.closing.set()
        self.broker.wake_all()

    def _check_join(self, row: db.Row, after_seq: int) -> bool:
        """Whether a join after ``after_seq`` has anything to follow.

        Raises:
            OutOfRange: ``after_seq`` is beyond the run's events (reason
                AFTER_SEQ_OUT_OF_RANGE).
        """
        last = int(row["last_seq"])
        ended = row["status"] in TERMINAL
        # A running run may have delivered up to PUBLISH_WINDOW events from
        # memory beyond what is stored.
        limit = last if ended else last + PUBLISH_WINDOW
        if after_seq > limit:
            raise OutOfRange(
                f"after_seq {after_seq} is beyond the run's last event ({last})",
                reason="AFTER_SEQ_OUT_OF_RANGE",
                field="after_seq",
                metadata={"last_seq": str(last)},
            )
        return not (ended and after_seq >= last)

    async def SendMessage(
        self, request: gateway_pb2.SendMessageRequest, context: ServicerContext
    ) -> AsyncIterator[common_pb2.RunEvent]:
        principal = await self.auth.authenticate(context)
        with self.auth.stream_slot(principal):
            submitted = await self._submit(principal, request, context)
            tracing.set_attributes(run_id=str(submitted.run_id), session_id=submitted.session_id)
            async for event in self._stream(
                submitted.run_id,
                submitted.session_id,
                0,
                subscription=submitted.subscription,
                known=submitted.known,
            ):
                yield event

    async def JoinRun(
        self, request: gateway_pb2.JoinRunRequest, context: ServicerContext
    ) -> AsyncIterator[common_pb2.RunEvent]:
        principal = await self.auth.authenticate(context)
        principal.require("chat")
        run_id = parse_uuid(request.run_id, "run_id", what="run id")
        row = await self.store.get(principal.org_id, run_id)
        if not self._check_join(row, request.after_seq):
            return  # the run has ended and the caller has seen every event
        with self.auth.stream_slot(principal):
            async for event in self._stream(run_id, str(row["session_id"]), request.after_seq):
                yield event

    async def Chat(
        self, request_iterator: AsyncIterator[gateway_pb2.ChatRequest], context: ServicerContext
    ) -> AsyncIterator[common_pb2.RunEvent]:
        try:
            # Charged per message below, not per stream (gateway.rate_limit_rps applies to each).
            principal = await self.auth.authenticate(context, charge=False)
        except RunyardError:
            await settle_before_reject(request_iterator)
            raise
        max_follows = self.config.gateway.max_follows_per_chat
        out: asyncio.Queue[common_pb2.RunEvent | BaseException | None] = asyncio.Queue(maxsize=1024)
        followers: set[asyncio.Task[None]] = set()

        async def pump(
            run_id: uuid.UUID, session_id: str, after_seq: int, submitted: _Submitted | None
        ) -> None:
            try:
                async for event in self._stream(
                    run_id,
                    session_id,
                    after_seq,
                    subscription=submitted.subscription if submitted is not None else None,
                    known=submitted.known if submitted is not None else None,
                ):
                    await out.put(event)
            except Exception as exc:  # noqa: BLE001 - forwarded to the stream
                await out.put(exc)

        following: dict[uuid.UUID, asyncio.Task[None]] = {}

        def start(
            run_id: uuid.UUID, session_id: str, after_seq: int, submitted: _Submitted | None = None
        ) -> None:
            if run_id in following:
                if submitted is not None and submitted.subscription is not None:
                    self.broker.unsubscribe(run_id, submitted.subscription)
                return  # already streaming this run's events on this stream (a repeat send or join)
            task = asyncio.create_task(pump(run_id, session_id, after_seq, submitted))
            followers.add(task)
            following[run_id] = task

            def done(finished: asyncio.Task[None]) -> None:
                followers.discard(finished)
                if following.get(run_id) is finished:
                    del following[run_id]

            task.add_done_callback(done)

        async def read() -> None:
            try:
                async for item in request_iterator:
                    self.auth.charge(principal)
                    kind = item.WhichOneof("request")
                    if kind in ("send", "join") and len(following) >= max_follows:
                        raise ResourceExhausted(
                            f"this Chat stream already follows {len(following)} runs "
                            "(gateway.max_follows_per_chat); wait for one to end or open another stream",
                            reason="TOO_MANY_FOLLOWS",
                            retry_after_s=1.0,
                        )
                    if kind == "send":
                        submitted = await self._submit(principal, item.send, context)
                        start(submitted.run_id, submitted.session_id, 0, submitted)
                    elif kind == "join":
                        principal.require("chat")
                        run_id = parse_uuid(item.join.run_id, "join.run_id", what="run id")
                        row = await self.store.get(principal.org_id, run_id)
                        if self._check_join(row, item.join.after_seq):
                            start(run_id, str(row["session_id"]), item.join.after_seq)
                    elif kind == "cancel":
                        await self._cancel(principal, item.cancel)
                    elif kind == "submit_tool_results":  # confirmed by the run's tool_result events
                        await self._submit_tool_results(principal, item.submit_tool_results)
                    else:
                        raise InvalidArgument(
                            "ChatRequest needs send, cancel, join or submit_tool_results",
                            reason="MISSING_FIELD",
                            field="request",
                        )
                if followers:
                    await asyncio.gather(*list(followers), return_exceptions=True)
                await out.put(None)
            except Exception as exc:  # noqa: BLE001 - forwarded to the stream
                await out.put(exc)

        with self.auth.stream_slot(principal):
            reader = asyncio.create_task(read())
            try:
                while True:
                    item = await out.get()
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                reader.cancel()
                for task in list(followers):
                    task.cancel()
                await asyncio.gather(reader, *followers, return_exceptions=True)

    async def _cancel(self, principal: Principal, request: gateway_pb2.CancelRunRequest) -> common_pb2.Run:
        principal.require("chat")
        run_id = parse_uuid(request.run_id, "run_id", what="run id")
        row = await self.store.cancel(principal.org_id, run_id, request.reason)
        if row["status"] == RunStatus.RUNNING:
            self.dispatcher.cancel_local(run_id)
        return run_proto(row)

    async def CancelRun(
        self, request: gateway_pb2.CancelRunRequest, context: ServicerContext
    ) -> gateway_pb2.CancelRunResponse:
        principal = await self.auth.authenticate(context)
        return gateway_pb2.CancelRunResponse(run=await self._cancel(principal, request))

    async def GetRun(
        self, request: gateway_pb2.GetRunRequest, context: ServicerContext
    ) -> gateway_pb2.GetRunResponse:
        principal = await self.auth.authenticate(context)
        principal.require("sessions:read")
        row = await self.store.get(principal.org_id, parse_uuid(request.run_id, "run_id", what="run id"))
        run = run_proto(row)
        if self.tool_results is not None:
            run = await self.tool_results.describe(run)  # a waiting run lists its unanswered calls
        return gateway_pb2.GetRunResponse(run=run)

    async def _submit_tool_results(
        self, principal: Principal, request: gateway_pb2.SubmitToolResultsRequest
    ) -> common_pb2.Run:
        principal.require("chat")
        if self.tool_results is None:
            raise Unimplemented("client-side tools are not enabled on this gateway", reason="NOT_IMPLEMENTED")
        return await self.tool_results.submit(principal.org_id, request)

    async def SubmitToolResults(
        self, request: gateway_pb2.SubmitToolResultsRequest, context: ServicerContext
    ) -> gateway_pb2.SubmitToolResultsResponse:
        principal = await self.auth.authenticate(context)
        return gateway_pb2.SubmitToolResultsResponse(run=await self._submit_tool_results(principal, request))

    async def ListRuns(
        self, request: gateway_pb2.ListRunsRequest, context: ServicerContext
    ) -> gateway_pb2.ListRunsResponse:
        principal = await self.auth.authenticate(context)
        principal.require("sessions:read")
        if request.session_id:
            session_id = parse_uuid(request.session_id, "session_id", what="session id")
        elif request.session_key:
            session = await self._session(principal, "", request.session_key, context)
            session_id = uuid.UUID(session.id)
        else:
            raise InvalidArgument(
                "session_id or session_key is required", reason="MISSING_FIELD", field="session_id"
            )
        runs, token = await self.store.list_for_session(
            principal.org_id, session_id, request.page_size, request.page_token
        )
        return gateway_pb2.ListRunsResponse(runs=runs, next_page_token=token)

    # ------------------------------------------------------------ sessions (proxied)

    async def _session(
        self, principal: Principal, session_id: str, session_key: str, context: ServicerContext
    ) -> common_pb2.Session:
        _require_session_ref(session_id, session_key)
        self._check_session_key(session_key)
        response: sessions_pb2.SessionServiceGetSessionResponse = await call(
            self.sessions.GetSession(
                sessions_pb2.SessionServiceGetSessionRequest(
                    org_id=principal.org_id, session_id=session_id, session_key=session_key
                ),
                metadata=self.metadata,
                timeout=downstream_timeout(context, 10.0),
            )
        )
        return response.session

    async def ListSessions(
        self, request: gateway_pb2.ListSessionsRequest, context: ServicerContext
    ) -> gateway_pb2.ListSessionsResponse:
        principal = await self.auth.authenticate(context)
        principal.require("sessions:read")
        if request.parent_session_id:
            parse_uuid(request.parent_session_id, "parent_session_id", what="session id")
        response = await call(
            self.sessions.ListSessions(
                sessions_pb2.SessionServiceListSessionsRequest(
                    org_id=principal.org_id,
                    agent_id=request.agent_id,
                    page_size=request.page_size,
                    page_token=request.page_token,
                    include_ended=request.include_ended,
                    parent_session_id=request.parent_session_id,
                ),
                metadata=self.metadata,
                timeout=downstream_timeout(context, 10.0),
            )
        )
        return gateway_pb2.ListSessionsResponse(
            sessions=response.sessions, next_page_token=response.next_page_token
        )

    async def GetSession(
        self, request: gateway_pb2.GetSessionRequest, context: ServicerContext
    ) -> gateway_pb2.GetSessionResponse:
        principal = await self.auth.authenticate(context)
        principal.require("sessions:read")
        session = await self._session(principal, request.session_id, request.session_key, context)
        return gateway_pb2.GetSessionResponse(session=session)

    async def GetMessages(
        self, request: gateway_pb2.GetMessagesRequest, context: ServicerContext
    ) -> gateway_pb2.GetMessagesResponse:
        principal = await self.auth.authenticate(context)
        principal.require("sessions:read")
        _require_session_ref(request.session_id, request.session_key)
        self._check_session_key(request.session_key)
        response = await call(
            self.sessions.GetMessages(
                sessions_pb2.SessionServiceGetMessagesRequest(
                    org_id=principal.org_id,
                    session_id=request.session_id,
                    session_key=request.session_key,
                    page_size=request.page_size,
                    page_token=request.page_token,
                ),
                metadata=self.metadata,
                timeout=downstream_timeout(context, 10.0),
            )
        )
        return gateway_pb2.GetMessagesResponse(
            messages=response.messages, next_page_token=response.next_page_token, summary=response.summary
        )

    async def ResetSession(
        self, request: gateway_pb2.ResetSessionRequest, context: ServicerContext
    ) -> gateway_pb2.ResetSessionResponse:
        principal = await self.auth.authenticate(context)
        principal.require("sessions:admin")
        _require_session_ref(request.session_id, request.session_key)
        self._check_session_key(request.session_key)
        response = await call(
            self.sessions.ResetSession(
                sessions_pb2.SessionServiceResetSessionRequest(
                    org_id=principal.org_id, session_id=request.session_id, session_key=request.session_key
                ),
                metadata=self.metadata,
                timeout=downstream_timeout(context, 10.0),
            )
        )
        await self._cascade(principal, response.previous_session_id, "RESET")
        return gateway_pb2.ResetSessionResponse(
            session=response.session, previous_session_id=response.previous_session_id
        )

    async def DeleteSession(
        self, request: gateway_pb2.DeleteSessionRequest, context: ServicerContext
    ) -> gateway_pb2.DeleteSessionResponse:
        principal = await self.auth.authenticate(context)
        principal.require("sessions:admin")
        _require_session_ref(request.session_id, request.session_key)
        self._check_session_key(request.session_key)
        response = await call(
            self.sessions.DeleteSession(
                sessions_pb2.SessionServiceDeleteSessionRequest(
                    org_id=principal.org_id, session_id=request.session_id, session_key=request.session_key
                ),
                metadata=self.metadata,
                timeout=downstream_timeout(context, 10.0),
            )
        )
        await self._cascade(principal, response.session_id, "DELETED")
        return gateway_pb2.DeleteSessionResponse(session_id=response.session_id)

    # ------------------------------------------------------------ background tasks (runyard.gateway.tasks)

    async def _cascade(self, principal: Principal, session_id: str, reason: str) -> None:
        """Cancel every task below a session that was just reset or deleted.

        The session change is already committed, so a failure here is logged,
        not reported: the tasks loop repeats the cascade when the relayed
        ``session.end`` reaches the gateway outbox.
        """
        if self.tasks is None:
            return
        try:
            await self.tasks.session_ended(principal.org_id, [session_id], reason)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("cascade for session %s (%s) deferred to the tasks loop: %s", session_id, reason, exc)

    def _tasks(self) -> TaskManager:
        if self.tasks is None:
            raise Unimplemented("background tasks are not enabled on this gateway", reason="NOT_IMPLEMENTED")
        return self.tasks

    async def SpawnTask(
        self, request: gateway_pb2.SpawnTaskRequest, context: ServicerContext
    ) -> gateway_pb2.SpawnTaskResponse:
        principal = await self.auth.authenticate(context)
        principal.require("chat")
        self._check_session_key(request.parent_session_key, "parent_session_key")
        spawn = SpawnRequest(
            parent_session_id=request.parent_session_id,
            parent_session_key=request.parent_session_key,
            agent_id=request.agent_id,
            prompt=request.prompt,
            description=request.description,
            model=request.model,
            max_tool_calls=request.max_tool_calls,
            idempotency_key=request.idempotency_key,
        )
        task = await self._tasks().spawn(
            principal.org_id,
            spawn,
            fingerprint=request_hash(request),
            timeout=downstream_timeout(context, 10.0),
        )
        return gateway_pb2.SpawnTaskResponse(task=task)

    async def ListTasks(
        self, request: gateway_pb2.ListTasksRequest, context: ServicerContext
    ) -> gateway_pb2.ListTasksResponse:
        principal = await self.auth.authenticate(context)
        principal.require("sessions:read")
        if request.parent_session_id:
            parent_id = parse_uuid(request.parent_session_id, "parent_session_id", what="session id")
        elif request.parent_session_key:
            parent_id = uuid.UUID(
                (await self._session(principal, "", request.parent_session_key, context)).id
            )
        else:
            raise InvalidArgument(
                "parent_session_id or parent_session_key is required",
                reason="MISSING_FIELD",
                field="parent_session_id",
            )
        tasks, token = await self._tasks().list(
            principal.org_id, parent_id, request.page_size, request.page_token
        )
        return gateway_pb2.ListTasksResponse(tasks=tasks, next_page_token=token)

    async def GetTask(
        self, request: gateway_pb2.GetTaskRequest, context: ServicerContext
    ) -> gateway_pb2.GetTaskResponse:
        principal = await self.auth.authenticate(context)
        principal.require("sessions:read")
        task_id = parse_uuid(request.task_id, "task_id", what="task id")
        return gateway_pb2.GetTaskResponse(task=await self._tasks().get(principal.org_id, task_id))

    async def CancelTask(
        self, request: gateway_pb2.CancelTaskRequest, context: ServicerContext
    ) -> gateway_pb2.CancelTaskResponse:
        principal = await self.auth.authenticate(context)
        principal.require("chat")
        task_id = parse_uuid(request.task_id, "task_id", what="task id")
        return gateway_pb2.CancelTaskResponse(
            task=await self._tasks().cancel(principal.org_id, task_id, request.reason)
        )

    async def WatchEvents(
        self, request: gateway_pb2.WatchEventsRequest, context: ServicerContext
    ) -> AsyncIterator[common_pb2.LifecycleEvent]:
        # Replay after request.after_id, then live; see runyard.gateway.watch.
        principal = await self.auth.authenticate(context)
        principal.require("events")
        watcher = self.watch
        if watcher is None:
            raise Unimplemented("WatchEvents is not enabled on this gateway", reason="NOT_IMPLEMENTED")
        with self.auth.stream_slot(principal):
            async for event in watcher.follow(
                principal.org_id, request, self.closing, service_events="admin" in principal.scopes
            ):
                yield event
