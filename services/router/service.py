"""``runyard.v1.RouterService``: model answers with failover, provider state
and the router's lifecycle events.

``Generate`` is called by workers with a run token scoped to the run;
``GetProviderStatus`` and ``ListEvents`` are internal calls (the CLI, the
gateway's WatchEvents relay) that carry the internal service credential.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import cast

from runyard._proto.v1 import common_pb2, router_pb2, router_pb2_grpc, sessions_pb2
from runyard.common import tracing
from runyard.common.auth import RunTokenVerifier, check_internal
from runyard.common.batches import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES
from runyard.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from runyard.common.grpctypes import ServicerContext
from runyard.common.outbox import Outbox
from runyard.router.engine import Router, StatusRow, failover_reason_value

__all__ = [
    "DEADLINE_MARGIN_S",
    "MAX_EVENTS_PAGE",
    "RouterServicer",
    "coalesce_ready_deltas",
    "provider_state",
]

#: Largest ListEvents page.
MAX_EVENTS_PAGE = 1000
#: Generate stops this long before the caller's gRPC deadline (the worker adds
#: the same margin to its calls: runyard.worker.budget.ROUTER_DEADLINE_MARGIN_S).
DEADLINE_MARGIN_S = 0.25

_HEALTH = {
    "ok": router_pb2.PROVIDER_HEALTH_OK,
    "cooling": router_pb2.PROVIDER_HEALTH_COOLING,
    "disabled": router_pb2.PROVIDER_HEALTH_DISABLED,
}


def provider_state(row: StatusRow) -> router_pb2.ProviderState:
    """The wire form of one status row."""
    state = router_pb2.ProviderState(
        provider=row.provider,
        auth_profile=row.profile,
        model=row.model,
        health=_HEALTH[row.health],
        last_message=row.last_message,
        failure_count=row.failure_count,
    )
    if row.last_reason:
        # A reason written by a newer replica may not be in this enum yet.
        with contextlib.suppress(ValueError):
            state.last_reason = failover_reason_value(row.last_reason)
    if row.until is not None:
        state.until.FromNanoseconds(int(row.until * 1e9))
    if row.last_failure_at is not None:
        state.last_failure_time.FromNanoseconds(int(row.last_failure_at * 1e9))
    return state


async def coalesce_ready_deltas(
    stream: AsyncIterator[router_pb2.GenerateResponse], *, max_batch_bytes: int = 0
) -> AsyncIterator[router_pb2.GenerateResponse]:
    """``stream`` with the responses that are already waiting sent together.

    The provider's stream is read ahead by a task of its own while the
    previous response is being sent. When the caller is ready for the next
    one, every text delta that arrived meanwhile goes out as one text delta;
    with ``max_batch_bytes`` above 0 (the caller's
    ``GenerateRequest.max_batch_bytes``), whatever else is waiting behind it
    (more deltas after a tool call, the usage, the final message) goes in
    the same stream message, as a ``GenerateBatch`` of at most
    ``min(max_batch_bytes, MAX_BATCH_BYTES)`` serialized bytes and
    :data:`~runyard.common.batches.MAX_BATCH_MESSAGES` responses. A response
    never waits for another (no timer, no added latency): when the provider
    streams slower than the stack forwards, each delta goes alone, as it
    came. When the provider (or a busy machine) delivers a burst, the whole
    path behind the router (worker, gateway, client stream, stored events)
    handles one message instead of dozens. Every event keeps its place in
    the order; an error is raised after what came before it.
    """
    ready: collections.deque[router_pb2.GenerateResponse | BaseException | None] = collections.deque()
    arrived = asyncio.Event()
    limit = min(max_batch_bytes, MAX_BATCH_BYTES)

    async def pump() -> None:
        try:
            async for response in stream:
                ready.append(response)
                arrived.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            ready.append(exc)
        else:
            ready.append(None)
        arrived.set()

    def take() -> router_pb2.GenerateResponse:
        """The next waiting response, consecutive text deltas merged into one."""
        item = cast("router_pb2.GenerateResponse", ready.popleft())
        if item.HasField("text_delta") and ready:
            texts = [item.text_delta.text]
            while (
                ready
                and isinstance(ready[0], router_pb2.GenerateResponse)
                and ready[0].HasField("text_delta")
            ):
                texts.append(ready.popleft().text_delta.text)  # type: ignore[union-attr]
            if len(texts) > 1:
                item = router_pb2.GenerateResponse(text_delta=common_pb2.TextDelta(text="".join(texts)))
        return item

    reader = asyncio.get_running_loop().create_task(pump(), name="generate-read-ahead")
    try:
        while True:
            while not ready:
                arrived.clear()
                await arrived.wait()
            head = ready[0]
            if not isinstance(head, router_pb2.GenerateResponse):  # the end, or an error
                ready.popleft()
                if head is None:
                    return
                raise head
            item = take()
            if limit <= 0 or not ready or not isinstance(ready[0], router_pb2.GenerateResponse):
                yield item
                continue
            batch = [item]
            size = item.ByteSize()
            while (
                ready
                and isinstance(ready[0], router_pb2.GenerateResponse)
                and len(batch) < MAX_BATCH_MESSAGES
            ):
                following = take()
                size += following.ByteSize()
                if size > limit:
                    ready.appendleft(following)  # first of the next message
                    break
                batch.append(following)
            yield (
                batch[0]
                if len(batch) == 1
                else router_pb2.GenerateResponse(batch=router_pb2.GenerateBatch(responses=batch))
            )
    finally:
        # The caller left (or the stream ended): stop reading the provider now.
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """The gRPC face of :class:`Router`.

    Args:
        router: the engine.
        signer: verifies run tokens (``Generate``).
        internal_secret: the internal service credential ("" = no check).
        outbox: the ``router`` outbox read by ``ListEvents``.
    """

    def __init__(
        self,
        router: Router,
        signer: RunTokenVerifier,
        internal_secret: str = "",
        outbox: Outbox | None = None,
    ):
        self.router = router
        self.signer = signer
        self.internal_secret = internal_secret
        self.outbox = outbox

    async def Generate(
        self, request: router_pb2.GenerateRequest, context: ServicerContext
    ) -> AsyncIterator[router_pb2.GenerateResponse]:
        run = request.run
        claims = self.signer.verify(run.run_token)
        if (claims.run_id, claims.session_id, claims.org_id, claims.agent_id) != (
            run.run_id,
            run.session_id,
            run.org_id,
            run.agent_id,
        ):
            raise PermissionDenied("run token is not scoped to this run", reason="TOKEN_SCOPE_MISMATCH")
        if not request.messages:
            raise InvalidArgument("messages must not be empty", reason="MISSING_FIELD", field="messages")
        remaining = context.time_remaining()
        if remaining is not None:
            # Stop a little before the caller's deadline, so that the router's
            # own error (what ran out, waiting for which model) reaches the
            # caller instead of a bare DEADLINE_EXCEEDED.
            remaining = max(remaining - DEADLINE_MARGIN_S, 0.0)
        stream = self.router.generate(
            run,
            request.messages,
            request.tools,
            timeout_s=remaining,
            purpose=request.purpose,
            after_compaction=request.after_compaction,
        )
        if tracing.ENABLED:
            stream = tracing.noting_models(stream)  # runyard.model on the Generate span
        async for response in coalesce_ready_deltas(stream, max_batch_bytes=request.max_batch_bytes):
            yield response

    async def GetProviderStatus(
        self, request: router_pb2.GetProviderStatusRequest, context: ServicerContext
    ) -> router_pb2.GetProviderStatusResponse:
        """Every provider / profile / model with its state, fresh from the
        shared table (so every replica answers the same); from this replica's
        cache when the database cannot be reached (the router keeps routing
        on that cache too)."""
        check_internal(context, self.internal_secret)
        await self.router.store.try_refresh()
        return router_pb2.GetProviderStatusResponse(states=[provider_state(r) for r in self.router.status()])

    async def ListEvents(
        self, request: sessions_pb2.ListEventsRequest, context: ServicerContext
    ) -> sessions_pb2.ListEventsResponse:
        """Sequenced ``model.failover`` events with id > ``after_id``, oldest
        first, at most ``limit`` (default 100, at most 1000), optionally only
        the given ``types``.

        Raises:
            InvalidArgument: negative ``limit`` (field limit).
            FailedPrecondition: the router runs without a database.
        """
        check_internal(context, self.internal_secret)
        if request.limit < 0:
            raise InvalidArgument("limit must not be negative", reason="INVALID_LIMIT", field="limit")
        if self.outbox is None or self.router.store.pool is None:
            raise FailedPrecondition("this router has no event outbox (no database)", reason="NO_OUTBOX")
        limit = min(request.limit or 100, MAX_EVENTS_PAGE)
        events: list[common_pb2.LifecycleEvent] = await self.outbox.read(
            self.router.store.pool, request.after_id, limit, list(request.types)
        )
        return sessions_pb2.ListEventsResponse(events=events)
