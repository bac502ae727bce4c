"""Executes one run: read the transcript, build the prompt, call the router,
stream events, report the outcome with the run's messages.

The worker never writes the transcript: a completed run's messages travel
with its result, and the gateway commits them (``SessionService/CommitRun``)
when it accepts the completion. A run that is already committed (its
completion report was lost before the gateway recorded it) is not executed
again: it reports the stored answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from tenacity import RetryCallState, stop_after_delay, stop_before_delay, wait_exponential, wait_random

from runyard._proto.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    worker_hub_pb2,
)
from runyard.common.batches import MAX_BATCH_BYTES, generate_responses
from runyard.common.config import Config
from runyard.common.errors import DeadlineExceeded, ResourceExhausted, RunyardError, from_rpc_error
from runyard.common.faults import infrastructure_error, retry_after_first
from runyard.common.protoutil import now
from runyard.worker.budget import ROUTER_DEADLINE_MARGIN_S, run_deadline, time_left
from runyard.worker.compaction import Compactor, estimate_tokens
from runyard.worker.tools import (
    _ORDINAL,
    ClientTools,
    RunTools,
    ToolResult,
    ToolSource,
    record_tool_call,
    resolve_tools,
)

__all__ = ["RunOutcome", "RunExecutor", "build_prompt"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Backoff between calls to a dependency that is restarting or unreachable:
#: 0.1 s doubling up to 2 s, plus up to 0.1 s of jitter.
_DEPENDENCY_WAIT = wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.1)

#: Local exceptions that mean the network to a dependency failed.
_LOCAL_INFRASTRUCTURE = (ConnectionError, TimeoutError)


def _transient(exc: BaseException) -> bool:
    """A dependency is restarting, unreachable or lost its database for a
    moment (not a model failure): see :func:`infrastructure_failure`."""
    return infrastructure_failure(exc)


def infrastructure_failure(exc: BaseException) -> bool:
    """Whether a run failed because of infrastructure rather than the model or
    its input: :func:`runyard.common.faults.infrastructure_error` (UNAVAILABLE
    from a restarting peer or a database blip, peer resets such as "Stream
    removed" or RST_STREAM from a dead peer), plus an expired run token (the
    gateway could not renew the lease in time). Such a run is handed back to
    the queue (``released``), never failed."""
    if isinstance(exc, RunyardError) and exc.reason == "RUN_TOKEN_EXPIRED":
        return True
    return infrastructure_error(exc)


@dataclass(slots=True)
class RunOutcome:
    """What a run ended with: exactly one of ``completed``, ``failed``,
    ``cancelled``, ``released`` and ``paused`` is set. A completed run
    carries its messages for the transcript (``append``), or
    ``already_committed`` when an earlier execution's commit stands."""

    completed: common_pb2.RunCompleted | None = None
    failed: common_pb2.RunFailed | None = None
    cancelled: common_pb2.RunCancelled | None = None
    append: sessions_pb2.TranscriptAppend | None = None
    already_committed: bool = False
    #: The run met an infrastructure fault: give it back to the queue (why).
    released: str | None = None
    #: The model called client-side tools: the run waits for their results
    #: (``requires_action``) and continues from this.
    paused: worker_hub_pb2.RunContinuation | None = None


@dataclass(slots=True)
class _ToolLoop:
    """The state of one run's tool loop, which a pause carries over to the
    run's next execution (``RunContinuation``).

    ``messages`` are the run's own messages so far (its input, then the
    assistant messages with tool calls and their results); the prompt is
    ``prefix`` (system prompt, transcript) followed by them.
    """

    prefix: list[common_pb2.Message]
    messages: list[common_pb2.Message]
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    calls_made: int = 0
    ordinals: dict[str, int] = field(default_factory=dict)
    #: This execution continues after client tool results (RunStarted.resumed).
    resumed: bool = False


@dataclass(slots=True)
class _OverflowRetry:
    """One run's CONTEXT_OVERFLOW retry (issue 12): the snapshot whose
    transcript is compacted in place, and after that the prompt prefix
    (system prompt with the summary, kept turns) that replaces the old one
    in every later call of the run (tool-loop turns included)."""

    snapshot: sessions_pb2.GetTranscriptResponse
    system_prompt: str
    #: What the run's commit carries: its own compaction, merged
    #: with the overflow's.
    compaction: sessions_pb2.CompactionInfo | None
    #: How many leading prompt messages come from the system prompt and the
    #: transcript as it was before the overflow compaction.
    prefix_len: int = 0
    prefix: list[common_pb2.Message] | None = None
    used: bool = False

    def __post_init__(self) -> None:
        before, _ = build_prompt(self.system_prompt, self.snapshot.transcript, common_pb2.RunInput())
        self.prefix_len = len(before)

    def rewrite(self, prompt: list[common_pb2.Message]) -> list[common_pb2.Message]:
        """``prompt`` with the compacted prefix (unchanged before compaction)."""
        if self.prefix is None:
            return prompt
        return [*self.prefix, *prompt[self.prefix_len :]]

    def merge(self, info: sessions_pb2.CompactionInfo) -> None:
        """Fold the overflow compaction into the run's own (if any)."""
        if self.compaction is None:
            self.compaction = info
            return
        merged = sessions_pb2.CompactionInfo()
        merged.CopyFrom(info)
        merged.summarized_message_count += self.compaction.summarized_message_count
        merged.tokens_before = self.compaction.tokens_before
        self.compaction = merged


def build_prompt(
    system_prompt: str, transcript: common_pb2.Transcript, run_input: common_pb2.RunInput
) -> tuple[list[common_pb2.Message], list[common_pb2.Message]]:
    """The model prompt and the messages this run adds to the transcript.

    Returns:
        ``(prompt, new_turn)``: the prompt is system prompt (plus the
        compaction summary, if any), the transcript, then the new turn; the new
        turn is the run's extra input messages followed by the user text.
    """
    system = system_prompt
    if transcript.summary:
        system = f"{system}\n\nSummary of the earlier conversation:\n{transcript.summary}".strip()
    prompt: list[common_pb2.Message] = []
    if system:
        prompt.append(common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=system))
    prompt.extend(transcript.messages)
    new_turn = list(run_input.messages)
    if run_input.text or run_input.attachments:
        new_turn.append(
            common_pb2.Message(
                role=common_pb2.ROLE_USER, content=run_input.text, attachments=run_input.attachments
            )
        )
    prompt.extend(new_turn)
    return prompt, new_turn


def _order_tool_results(messages: list[common_pb2.Message]) -> None:
    """Put the tool results after the last assistant message in the order
    of its calls (server-side results come first, the client's later)."""
    last = next(
        (i for i in range(len(messages) - 1, -1, -1) if messages[i].role == common_pb2.ROLE_ASSISTANT), None
    )
    if last is None:
        return
    order = {call.id: index for index, call in enumerate(messages[last].tool_calls)}
    tail = messages[last + 1 :]
    if all(m.role == common_pb2.ROLE_TOOL for m in tail):
        tail.sort(key=lambda m: order.get(m.tool_call_id, len(order)))
        messages[last + 1 :] = tail


def _tool_message(
    payload: common_pb2.RunPayload, call: common_pb2.ToolCall, result: ToolResult
) -> common_pb2.Message:
    """The ROLE_TOOL message answering ``call`` (``metadata.is_error`` on an error result)."""
    message = common_pb2.Message(
        role=common_pb2.ROLE_TOOL,
        content=result.content,
        tool_call_id=call.id,
        name=call.name,
        run_id=payload.run_id,
        metadata={"is_error": "true"} if result.is_error else {},
    )
    message.create_time.CopyFrom(now())
    return message


class RunExecutor:
    """Runs the pipeline of one run against sessions and the router."""

    def __init__(
        self,
        config: Config,
        worker_id: str,
        sessions: sessions_pb2_grpc.SessionServiceStub,
        router: router_pb2_grpc.RouterServiceStub,
        sources: Sequence[ToolSource] = (),
    ):
        self.config = config
        self.worker_id = worker_id
        self.sessions = sessions
        self.router = router
        self.compactor = Compactor(config, router)
        #: Server-side tool sources (runyard.worker.tools.ToolSource), in precedence order:
        #: the built-in tools (TaskTools), then others (MCP servers). Append to add one.
        self.sources: list[ToolSource] = list(sources)
        #: The run's client-side tools (RunOptions.client_tools), offered after every server-side source.
        self.client_tools = ClientTools()
        #: run id -> what a CONTEXT_OVERFLOW retry needs (see _overflow_retry).
        self._overflows: dict[str, _OverflowRetry] = {}

    async def execute(
        self,
        payload: common_pb2.RunPayload,
        emit: Callable[[common_pb2.RunEvent], None],
        continuation: worker_hub_pb2.RunContinuation | None = None,
        *,
        transcript: sessions_pb2.GetTranscriptResponse | None = None,
    ) -> RunOutcome:
        """Execute ``payload``, emitting events; returns the outcome.

        ``transcript`` is the run's transcript when the gateway sent it with
        the assignment (RunAssignment.transcript); otherwise it is read from
        the sessions service.

        Cancellation (``asyncio.CancelledError``) propagates after the router
        call is cancelled; nothing is committed for an unfinished run.

        The run's time budget (:mod:`runyard.worker.budget`) starts now and
        bounds every router call of the run (a wait for client tool results
        is not part of it: each execution has its own budget).

        With ``continuation`` (the run paused for client tool results, which
        it now holds) the tool loop goes on from where it stopped: the run's
        input, compaction and earlier model calls are not repeated.
        """
        budget_s = self.config.run_timeout_ms(payload.agent_id, payload.options.timeout_ms) / 1000
        try:
            with run_deadline(budget_s):
                return await self._execute(payload, emit, continuation, transcript)
        except (RunyardError, grpc.aio.AioRpcError, *_LOCAL_INFRASTRUCTURE) as exc:
            error = from_rpc_error(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
            if infrastructure_failure(error):
                # Not the run's fault: it goes back to the queue and runs again.
                log.warning("run %s hit an infrastructure fault (%s); handing it back", payload.run_id, error)
                return RunOutcome(released=f"infrastructure: {str(error)[:200]}")
            if not isinstance(error, RunyardError):
                raise
            return RunOutcome(failed=common_pb2.RunFailed(error=error.to_run_error()))
        finally:
            self._overflows.pop(payload.run_id, None)

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retried while the callee is unavailable (restart, deploy),
        for at most ``worker.dependency_retry_s`` seconds from its first failure."""

        async def converted() -> T:
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None

        retry_s = self.config.worker.dependency_retry_s
        return await retry_after_first(
            converted, retry=_transient, stop=lambda: stop_after_delay(retry_s), wait=_DEPENDENCY_WAIT
        )

    async def _execute(
        self,
        payload: common_pb2.RunPayload,
        emit: Callable[[common_pb2.RunEvent], None],
        continuation: worker_hub_pb2.RunContinuation | None,
        transcript: sessions_pb2.GetTranscriptResponse | None = None,
    ) -> RunOutcome:
        # payload.run_token is read at each call: the hub renews it with the lease.
        read = (
            transcript
            if transcript is not None
            else await self._retrying(
                lambda: self.sessions.GetTranscript(
                    sessions_pb2.GetTranscriptRequest(run_token=payload.run_token), timeout=30
                )
            )
        )
        if read.run_committed:
            return self._already_done(payload, read.transcript)
        agent = self.config.agent(payload.agent_id)
        system_prompt = agent.system_prompt if agent is not None else ""
        tools = resolve_tools([*self.sources, self.client_tools], payload)
        if continuation is not None:
            base, overflow, loop = self._resume(payload, read, system_prompt, continuation)
        else:
            base = sessions_pb2.TranscriptBase(session_id=read.session_id, head_turn=read.head_turn)
            # -- compaction (runyard.worker.compaction): a transcript past the limits is summarised
            # in place; the run's commit then rolls the key over to a new session.
            compaction = await self.compactor.compact(payload, read)
            # -- end compaction
            prompt, new_turn = build_prompt(system_prompt, read.transcript, payload.input)
            overflow = self._overflow_retry(payload, read, system_prompt, compaction)  # issue 12
            for message in new_turn:
                if not message.HasField("create_time"):
                    message.create_time.CopyFrom(now())
                message.run_id = payload.run_id
            loop = _ToolLoop(prefix=prompt[: len(prompt) - len(new_turn)], messages=list(new_turn))
        final, waiting = await self._converse(payload, loop, emit, tools)
        append = sessions_pb2.TranscriptAppend(base=base)
        append.messages.extend(loop.messages)  # input, tool calls and their results, in pairs
        # The run's compaction, or an overflow's (issue 12): the transcript
        # was compacted in place, so it now holds the summary and kept turns.
        if overflow.compaction is not None:
            append.compaction.info.CopyFrom(overflow.compaction)
            append.compaction.summary = overflow.snapshot.transcript.summary
            append.compaction.kept.extend(overflow.snapshot.transcript.messages)
        if final is None:
            paused = worker_hub_pb2.RunContinuation(
                append=append,
                pending=waiting,
                tool_calls_made=loop.calls_made,
                ordinals=loop.ordinals,
                usage=loop.usage,
                overflow_compacted=overflow.used,
            )
            paused.pause_time.CopyFrom(now())
            return RunOutcome(paused=paused)
        append.messages.append(final.message)
        return RunOutcome(
            completed=common_pb2.RunCompleted(message=final.message, model=final.model, usage=final.usage),
            append=append,
        )

    def _resume(
        self,
        payload: common_pb2.RunPayload,
        read: sessions_pb2.GetTranscriptResponse,
        system_prompt: str,
        continuation: worker_hub_pb2.RunContinuation,
    ) -> tuple[sessions_pb2.TranscriptBase, _OverflowRetry, _ToolLoop]:
        """The state a paused run continues from: its transcript base and
        compaction as its first execution saw them, its messages so far plus
        the client's results (answering the last assistant message's calls,
        in the order of the calls), and the tool loop's counters."""
        append = continuation.append
        if append.HasField("compaction"):
            # The prompt continues from the compacted transcript the first execution used.
            read.transcript.CopyFrom(
                common_pb2.Transcript(summary=append.compaction.summary, messages=append.compaction.kept)
            )
        info = append.compaction.info if append.HasField("compaction") else None
        overflow = self._overflow_retry(payload, read, system_prompt, info)
        overflow.used = continuation.overflow_compacted
        prefix, _ = build_prompt(system_prompt, read.transcript, common_pb2.RunInput())
        messages = list(append.messages)
        results = {result.tool_call_id: result for result in continuation.results}
        for call in continuation.pending:
            result = results.get(call.id)
            if result is None:  # the gateway queues a run only with every result; never guess one
                result = common_pb2.ToolResultEvent(
                    tool_call_id=call.id,
                    name=call.name,
                    is_error=True,
                    content=json.dumps({"error": "the client sent no result for this call"}),
                )
            record_tool_call("client", call.name, result.is_error, result.duration_ms / 1000)
            messages.append(_tool_message(payload, call, ToolResult(result.content, result.is_error)))
        _order_tool_results(messages)
        loop = _ToolLoop(
            prefix=prefix,
            messages=messages,
            calls_made=continuation.tool_calls_made,
            ordinals=dict(continuation.ordinals),
            resumed=True,
        )
        loop.usage.CopyFrom(continuation.usage)
        log.info("run %s continues with %d client tool result(s)", payload.run_id, len(continuation.pending))
        return append.base, overflow, loop

    async def _converse(
        self,
        payload: common_pb2.RunPayload,
        loop: _ToolLoop,
        emit: Callable[[common_pb2.RunEvent], None],
        tools: RunTools,
    ) -> tuple[router_pb2.GenerateFinal | None, list[common_pb2.ToolCall]]:
        """The model's answer, with the tool loop (built-in, MCP and client tools alike).

        ``tools`` (:func:`runyard.worker.tools.resolve_tools`) are offered to
        the model. When the model calls them, each call is executed by its
        source, reported with a ``tool_result`` event and answered with a
        ROLE_TOOL message (appended to ``loop.messages``), and the model is
        asked again. After ``max_tool_calls`` calls (the run's option, else
        ``tasks.max_tool_calls``) tools are no longer offered; further calls
        in the same answer get an error result. Tool calls in a run that
        offered no tools are dropped from the answer (logged).

        Calls of client-side tools are not executed here: once the answer's
        server-side calls have their results, the loop stops and returns
        them; the run waits for the client's results and continues from
        ``loop`` (:meth:`_resume`).

        Returns:
            ``(final answer, [])``, the final answer's usage being the sum
            over every model call of the run; or ``(None, client calls)``.

        Raises:
            ResourceExhausted: the model still called tools after they were
                withdrawn (TOOL_CALL_LIMIT_EXCEEDED).
        """
        limit = payload.options.max_tool_calls or self.config.tasks.max_tool_calls
        announced = False
        while True:
            offer = tools.definitions if loop.calls_made < limit else []
            final = await self._generate(
                payload,
                [*loop.prefix, *loop.messages],
                emit,
                offer,
                announced=announced,
                tool_calls=bool(tools.definitions),
                tool_sources=tools,
                resumed=loop.resumed,
            )
            announced = True
            loop.usage.input_tokens += final.usage.input_tokens
            loop.usage.output_tokens += final.usage.output_tokens
            final.usage.CopyFrom(loop.usage)
            if not final.message.tool_calls:
                return final, []
            if not tools.definitions:
                # Tool calls nobody offered (a model that invents them) cannot be answered; kept,
                # they would leave an assistant message whose calls have no results, which
                # providers reject on every later turn (OpenAI: "tool_calls must be followed by
                # tool messages"). The text of the answer is kept, the calls are dropped.
                log.warning(
                    "run %s: the model called %s although no tools were offered; calls dropped",
                    payload.run_id,
                    ", ".join(sorted({call.name for call in final.message.tool_calls})),
                )
                del final.message.tool_calls[:]
                return final, []
            if not offer:
                raise ResourceExhausted(
                    f"the model kept calling tools after the run's limit of {limit} tool calls "
                    "(RunOptions.max_tool_calls / tasks.max_tool_calls)",
                    reason="TOOL_CALL_LIMIT_EXCEEDED",
                    retryable=False,
                )
            loop.messages.append(final.message)
            waiting: list[common_pb2.ToolCall] = []
            for call in final.message.tool_calls:
                source = tools.by_name.get(call.name)
                started = time.monotonic()
                if loop.calls_made >= limit:
                    result = ToolResult(
                        f'{{"error": "tool call limit ({limit}) reached; answer without tools"}}',
                        is_error=True,
                    )
                else:
                    loop.calls_made += 1
                    loop.ordinals[call.name] = loop.ordinals.get(call.name, 0) + 1
                    if isinstance(source, ClientTools):
                        waiting.append(call)  # answered by the client; the run pauses below
                        continue
                    result = await self._call_tool(payload, tools, call, loop.ordinals[call.name])
                emit(
                    common_pb2.RunEvent(
                        tool_result=common_pb2.ToolResultEvent(
                            tool_call_id=call.id,
                            name=call.name,
                            content=result.content,
                            is_error=result.is_error,
                            source=tools.source_of(call.name),
                            duration_ms=int((time.monotonic() - started) * 1000),
                        )
                    )
                )
                loop.messages.append(_tool_message(payload, call, result))
            if waiting:
                log.info(
                    "run %s waits for the client's results of %s",
                    payload.run_id,
                    ", ".join(call.name for call in waiting),
                )
                return None, waiting

    async def _call_tool(
        self, payload: common_pb2.RunPayload, tools: RunTools, call: common_pb2.ToolCall, ordinal: int
    ) -> ToolResult:
        """One call through the source that offers ``call.name`` (an error
        result naming the offered tools when none does), counted in the
        tool metrics."""
        source = tools.by_name.get(call.name)
        if source is None:
            names = ", ".join(d.name for d in tools.definitions)
            record_tool_call("", call.name, True, 0.0)
            return ToolResult(
                json.dumps({"error": f"unknown tool {call.name!r}; available: {names}"}), is_error=True
            )
        token = _ORDINAL.set(ordinal)
        started = time.monotonic()
        result: ToolResult | None = None
        try:
            result = await source.call(payload, call)
            return result
        finally:
            _ORDINAL.reset(token)
            record_tool_call(
                source.source, call.name, result is None or result.is_error, time.monotonic() - started
            )

    async def _generate(
        self,
        payload: common_pb2.RunPayload,
        prompt: list[common_pb2.Message],
        emit: Callable[[common_pb2.RunEvent], None],
        tools: list[common_pb2.ToolDefinition] | None = None,
        *,
        announced: bool = False,
        tool_calls: bool = True,
        tool_sources: RunTools | None = None,
        resumed: bool = False,
    ) -> router_pb2.GenerateFinal:
        """Stream the router's answer, forwarding events.

        ``tools`` are offered to the model; ``announced`` means the run's
        ``started`` event was already sent (a later call of the tool loop);
        ``resumed`` marks that event as the continuation after client tool
        results; ``tool_calls`` False means the run has no tools at all, so
        the model's tool calls are not forwarded as ``tool_call`` events
        (``tool_sources`` names each call's source in them).

        If the router becomes unavailable (restart, deploy) the call is retried
        for up to ``worker.dependency_retry_s``; when text was already
        streamed, a ``model_failover`` with ``restart_output`` tells the client
        to discard it.

        Every call gets what is left of the run's budget as its deadline
        (:mod:`runyard.worker.budget`; the router stops at the budget itself
        and answers ROUTER_DEADLINE).

        When the router answers CONTEXT_OVERFLOW (no larger model in the
        agent's ``context_window_chain``), the session is compacted and the
        call made once more (:meth:`_compact_after_overflow`).

        Raises:
            DeadlineExceeded: the run's budget is spent (RUN_DEADLINE).
        """
        # -- run budget (issue 12): was `timeout_ms + 5 s` per call
        budget_ms = self.config.run_timeout_ms(payload.agent_id, payload.options.timeout_ms)
        budget_left = time_left()
        if budget_left is None:  # called outside execute(): one budget for this call
            budget_left = budget_ms / 1000
        run_ends = time.monotonic() + budget_left
        deadline = min(time.monotonic() + self.config.worker.dependency_retry_s, run_ends)
        # -- end run budget
        overflow = self._overflows.get(payload.run_id)  # issue 12: CONTEXT_OVERFLOW -> compact, retry once
        if overflow is not None:
            prompt = overflow.rewrite(prompt)
        started = announced
        model = ""  # of the call in progress
        streamed = False  # whether the call in progress has sent text or tool calls

        async def one_call() -> router_pb2.GenerateFinal:
            """One Generate call (and, after a CONTEXT_OVERFLOW that compaction
            resolved, the one more call it earns)."""
            nonlocal started, model, streamed, prompt
            while True:
                model, streamed = "", False
                left = run_ends - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(
                        f"the run's time budget ({budget_ms} ms) is spent", reason="RUN_DEADLINE"
                    )
                call = self.router.Generate(
                    router_pb2.GenerateRequest(
                        run=payload,
                        messages=prompt,
                        tools=tools or (),
                        purpose=router_pb2.GENERATE_PURPOSE_RUN,
                        after_compaction=overflow is not None and overflow.used,
                        max_batch_bytes=MAX_BATCH_BYTES,
                    ),
                    timeout=left + ROUTER_DEADLINE_MARGIN_S,
                )
                message: router_pb2.GenerateResponse  # the generated stub is untyped
                try:
                    async for message in call:
                        for response in generate_responses(message):
                            kind = response.WhichOneof("event")
                            if kind == "model_select":
                                model = response.model_select.model
                                if not started:
                                    started = True
                                    emit(
                                        common_pb2.RunEvent(
                                            started=common_pb2.RunStarted(
                                                worker_id=self.worker_id,
                                                model=model,
                                                attempt=payload.attempt,
                                                resumed=resumed,
                                            )
                                        )
                                    )
                                emit(common_pb2.RunEvent(model_select=response.model_select))
                            elif kind == "text_delta":
                                streamed = True
                                emit(common_pb2.RunEvent(text_delta=response.text_delta))
                            elif kind == "model_failover":
                                model = response.model_failover.to_model
                                emit(common_pb2.RunEvent(model_failover=response.model_failover))
                            elif kind == "tool_call":
                                if not tool_calls:
                                    continue
                                streamed = True
                                source = (
                                    tool_sources.source_of(response.tool_call.name)
                                    if tool_sources is not None
                                    else ""
                                )
                                emit(
                                    common_pb2.RunEvent(
                                        tool_call=common_pb2.ToolCallEvent(
                                            call=response.tool_call, source=source
                                        )
                                    )
                                )
                            elif kind == "usage":
                                emit(common_pb2.RunEvent(usage=response.usage))
                            elif kind == "final":
                                return response.final
                    raise RunyardError("the router ended without an answer", reason="NO_ANSWER")
                except grpc.aio.AioRpcError as exc:
                    error = from_rpc_error(exc)
                    if error.reason == "CONTEXT_OVERFLOW" and not streamed:
                        compacted = await self._compact_after_overflow(payload, prompt, error, model, emit)
                        if compacted is not None:
                            prompt = compacted
                            continue
                    raise error from None
                except asyncio.CancelledError:
                    call.cancel()
                    raise

        def before_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            log.warning("router unavailable for run %s (%s); retrying", payload.run_id, error)
            if streamed:
                emit(
                    common_pb2.RunEvent(
                        model_failover=common_pb2.ModelFailover(
                            from_model=model,
                            to_model=model,
                            reason=common_pb2.FAILOVER_REASON_NETWORK,
                            restart_output=True,
                            message="lost the router mid-answer; restarting the answer",
                        )
                    )
                )

        return await retry_after_first(
            one_call,
            retry=_transient,
            stop=lambda: stop_before_delay(max(deadline - time.monotonic(), 0.0)),
            wait=_DEPENDENCY_WAIT,
            before_sleep=before_retry,
        )

    # -- CONTEXT_OVERFLOW: compact the session and retry once (issue 12) --------------------------------

    def _overflow_retry(
        self,
        payload: common_pb2.RunPayload,
        snapshot: sessions_pb2.GetTranscriptResponse,
        system_prompt: str,
        compaction: sessions_pb2.CompactionInfo | None,
    ) -> _OverflowRetry:
        """Register what an overflow retry of this run needs (the snapshot it
        compacts in place, the system prompt, the run's own compaction); its
        ``compaction`` is what the run's commit carries."""
        overflow = _OverflowRetry(snapshot, system_prompt, compaction)
        self._overflows[payload.run_id] = overflow
        return overflow

    async def _compact_after_overflow(
        self,
        payload: common_pb2.RunPayload,
        prompt: list[common_pb2.Message],
        error: RunyardError,
        model: str,
        emit: Callable[[common_pb2.RunEvent], None],
    ) -> list[common_pb2.Message] | None:
        """After the router's CONTEXT_OVERFLOW (no larger model left):
        compact the session with the existing compaction, once per run, and
        return the prompt to ask again with. None when that is not possible
        (compaction disabled or already done, nothing to cut, the summary
        failed): the run then fails with the router's message.

        The router recorded the decision as a ``model.failover`` lifecycle
        event (``compact_session``); the client sees a ``model_failover``
        (same model, CONTEXT_OVERFLOW) saying the session was compacted; the
        commit of the run rolls the session over (``session.compacted``).
        """
        overflow = self._overflows.get(payload.run_id)
        if overflow is None or overflow.used or not self.config.compaction.enabled:
            return None
        overflow.used = True
        model = error.metadata.get("model") or model
        tokens = estimate_tokens(prompt)
        info = await self.compactor.compact(
            payload, overflow.snapshot, overflow_tokens=tokens, overflow_model=model
        )
        if info is None:
            log.warning("run %s: %s overflowed and the session could not be compacted", payload.run_id, model)
            return None
        overflow.prefix, _ = build_prompt(
            overflow.system_prompt, overflow.snapshot.transcript, common_pb2.RunInput()
        )
        overflow.merge(info)
        emit(
            common_pb2.RunEvent(
                model_failover=common_pb2.ModelFailover(
                    from_model=model,
                    to_model=model,
                    reason=common_pb2.FAILOVER_REASON_CONTEXT_OVERFLOW,
                    message=(
                        f"the prompt (~{tokens} tokens) was too long for {model}: compacted the session "
                        f"({info.summarized_message_count} older message(s) summarised, ~{info.tokens_after} "
                        "tokens left) and asking once more"
                    ),
                )
            )
        )
        log.info("run %s: %s overflowed; compacted the session and retrying once", payload.run_id, model)
        return overflow.rewrite(prompt)

    # -- end CONTEXT_OVERFLOW ---------------------------------------------------------------------------

    def _already_done(self, payload: common_pb2.RunPayload, transcript: common_pb2.Transcript) -> RunOutcome:
        answer = next(
            (
                m
                for m in reversed(transcript.messages)
                if m.role == common_pb2.ROLE_ASSISTANT and m.run_id == payload.run_id
            ),
            common_pb2.Message(role=common_pb2.ROLE_ASSISTANT),
        )
        log.info("run %s was already committed; reporting the stored answer", payload.run_id)
        return RunOutcome(
            completed=common_pb2.RunCompleted(message=answer, model=answer.model), already_committed=True
        )
