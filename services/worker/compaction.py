"""Transcript compaction, done by the worker before a run's model call.

When the transcript plus the run's new turn is estimated above the threshold
(``compaction.max_tokens``, or ``compaction.context_fraction`` of the run's
model's window from ``compaction.context_windows``) or has more turns than
``compaction.max_turns``, the worker:

1. cuts the transcript at a turn boundary that keeps the last
   ``keep_recent_turns`` turns (fewer when they alone are too long), never
   between a tool call and its result (:func:`safe_cuts`);
2. asks the router for a summary of the older part, folding in the previous
   summary (``Generate`` with purpose ``GENERATE_PURPOSE_SUMMARIZE``; the
   run's own token authorizes it; ``compaction.model`` may name a cheaper
   model);
3. builds the run's prompt from the summary and the kept turns, and reports
   the compaction with the run's messages (``TranscriptAppend.compaction``).
   When the gateway commits the run, the sessions service rolls the key over
   to a new session holding the compacted transcript (session.end COMPACTION
   on the old one, session.start RESUMED on the new one).

A failed summary call never fails the run: it goes on uncompacted (logged,
``runyard_compactions_total{outcome="failed"}``).

The same compaction also runs when a model refuses the prompt as too long
(CONTEXT_OVERFLOW) and the agent has no larger model in its
``context_window_chain``: :meth:`Compactor.compact` with ``overflow_tokens``
cuts whatever the thresholds say, keeping recent turns only while they fit
in half of the prompt that overflowed, and the worker asks once more.

Token counts are estimates: about four characters per token, plus a few
tokens per message, which is close enough to decide when to compact.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from runyard._proto.v1 import common_pb2, router_pb2, router_pb2_grpc, sessions_pb2
from runyard.common import metrics
from runyard.common.config import Config
from runyard.common.errors import RunyardError, from_rpc_error
from runyard.worker.budget import time_left

__all__ = ["Compactor", "CutPlan", "estimate_tokens", "plan_cut", "render", "safe_cuts", "turn_starts"]

log = logging.getLogger(__name__)

#: Characters per token of the estimate.
CHARS_PER_TOKEN = 4
#: Tokens of overhead per message (role, separators).
MESSAGE_OVERHEAD = 4

SUMMARY_INSTRUCTIONS = (
    "You maintain the memory of a long conversation between a user and an assistant. Write a summary "
    "that lets the assistant continue the conversation without the older messages: keep facts, names, "
    "numbers, decisions, the user's preferences and instructions, open questions and any tool results "
    "later turns rely on. Write plain prose or short bullet points, in the conversation's language, "
    "at most {words} words. Answer with the summary only."
)


def _message_tokens(message: common_pb2.Message) -> int:
    chars = len(message.content) + len(message.name)
    for call in message.tool_calls:
        chars += len(call.name) + len(call.arguments_json) + len(call.id)
    return chars // CHARS_PER_TOKEN + MESSAGE_OVERHEAD


def estimate_tokens(messages: Sequence[common_pb2.Message], summary: str = "") -> int:
    """Estimated tokens of ``messages`` plus a ``summary`` (about 4 characters per token)."""
    return sum(_message_tokens(m) for m in messages) + len(summary) // CHARS_PER_TOKEN


def turn_starts(messages: Sequence[common_pb2.Message]) -> list[int]:
    """Indexes of the user messages (each starts a turn)."""
    return [i for i, m in enumerate(messages) if m.role == common_pb2.ROLE_USER]


def safe_cuts(messages: Sequence[common_pb2.Message]) -> list[int]:
    """Indexes ``i`` (1..len) where ``messages[:i]`` may be summarised and
    ``messages[i:]`` kept without separating a tool call from its result:
    every call made before ``i`` is answered before ``i``, and ``messages[i]``
    is not a tool result."""
    cuts: list[int] = []
    open_calls: set[str] = set()
    for index, message in enumerate(messages):
        if index > 0 and not open_calls and message.role != common_pb2.ROLE_TOOL:
            cuts.append(index)
        if message.role == common_pb2.ROLE_ASSISTANT:
            open_calls.update(call.id for call in message.tool_calls if call.id)
        elif message.role == common_pb2.ROLE_TOOL:
            open_calls.discard(message.tool_call_id)
    if not open_calls:
        cuts.append(len(messages))
    return cuts


@dataclass(frozen=True, slots=True)
class CutPlan:
    """Where to cut: ``messages[:cut]`` are summarised, the rest kept."""

    cut: int
    tokens_before: int
    reason: str


def plan_cut(
    transcript: common_pb2.Transcript,
    new_turn_tokens: int,
    *,
    threshold_tokens: int,
    max_turns: int,
    keep_recent_turns: int,
    force: str = "",
) -> CutPlan | None:
    """Decide whether to compact and where to cut (None = leave it).

    Args:
        transcript: the stored transcript.
        new_turn_tokens: estimate of what this run adds before the answer.
        threshold_tokens: compact above this estimate (0 = no token limit).
        max_turns: compact above this many turns (0 = no turn limit).
        keep_recent_turns: turns to keep verbatim: fewer if they alone exceed
            half the token threshold, and at most ``max_turns - 2`` so that the
            next run does not compact again at once.
        force: compact whatever the limits say, for this reason (a model
            refused the prompt as too long); None only when nothing can be cut.
    """
    messages = list(transcript.messages)
    if not messages:
        return None
    before = estimate_tokens(messages, transcript.summary) + new_turn_tokens
    turns = turn_starts(messages)
    reason = force
    if reason:
        pass
    elif threshold_tokens and before > threshold_tokens:
        reason = f"~{before} tokens > {threshold_tokens}"
    elif max_turns and len(turns) + 1 > max_turns:
        reason = f"{len(turns) + 1} turns > {max_turns}"
    if not reason:
        return None
    cuts = safe_cuts(messages)
    if not cuts:
        return None
    # Keep the last keep_recent_turns turns, fewer while they are too long.
    budget = threshold_tokens // 2 if threshold_tokens else 0
    starts = [s for s in turns if s > 0] or [len(messages)]
    if max_turns:
        keep_recent_turns = min(keep_recent_turns, max(max_turns - 2, 1))
    keep = min(keep_recent_turns, len(starts))
    desired = starts[-keep]
    while budget and keep > 1 and estimate_tokens(messages[desired:]) > budget:
        keep -= 1
        desired = starts[-keep]
    if budget and estimate_tokens(messages[desired:]) > budget:
        # Even the last turn is too long: cut inside it, at a safe point.
        inside = [c for c in cuts if c > desired and estimate_tokens(messages[c:]) <= budget]
        if inside:
            desired = inside[0]
    earlier = [c for c in cuts if c <= desired]
    cut = earlier[-1] if earlier else min(cuts)
    if cut <= 0:
        return None
    return CutPlan(cut, before, reason)


_ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}


def render(messages: Sequence[common_pb2.Message]) -> str:
    """The messages as plain text for the summariser (tool calls and results inline)."""
    lines = []
    for message in messages:
        role = _ROLE_NAMES.get(message.role, "message")
        if message.role == common_pb2.ROLE_TOOL:
            role = f"tool result ({message.name or message.tool_call_id})"
        if message.content:
            lines.append(f"{role}: {message.content}")
        for call in message.tool_calls:
            lines.append(f"{role} called tool {call.name} with {call.arguments_json}")
    return "\n".join(lines)


class Compactor:
    """Compacts a run's transcript before its model call.

    Args:
        config: the whole configuration (``compaction`` and the agents).
        router: stub of the router (the summary call).
    """

    def __init__(self, config: Config, router: router_pb2_grpc.RouterServiceStub):
        self.config = config
        self.router = router

    def threshold(self, payload: common_pb2.RunPayload) -> int:
        """Token threshold for the run's model (0 = no token limit)."""
        cfg = self.config.compaction
        limits = [cfg.max_tokens] if cfg.max_tokens else []
        agent = self.config.agent(payload.agent_id)
        model = payload.model.model or (agent.model if agent is not None else "")
        window = cfg.context_windows.get(model)
        if window:
            limits.append(int(window * cfg.context_fraction))
        return min(limits) if limits else 0

    async def compact(
        self,
        payload: common_pb2.RunPayload,
        snapshot: sessions_pb2.GetTranscriptResponse,
        *,
        overflow_tokens: int = 0,
        overflow_model: str = "",
    ) -> sessions_pb2.CompactionInfo | None:
        """Compact ``snapshot.transcript`` in place when it is too long.

        ``overflow_tokens``: ``overflow_model`` refused a prompt estimated at
        this many tokens as too long (CONTEXT_OVERFLOW): compact whatever the
        thresholds say, keeping recent turns only while they fit in half of it.

        Returns:
            What was done (for ``TranscriptCompaction.info``), or None
            when the transcript is left as it is (short enough, compaction
            disabled, nothing safe to cut, or the summary call failed).
        """
        cfg = self.config.compaction
        if not cfg.enabled:
            return None
        transcript = snapshot.transcript
        new_turn = list(payload.input.messages)
        if payload.input.text:
            new_turn.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=payload.input.text))
        plan = plan_cut(
            transcript,
            estimate_tokens(new_turn),
            threshold_tokens=overflow_tokens or self.threshold(payload),
            max_turns=0 if overflow_tokens else cfg.max_turns,
            keep_recent_turns=cfg.keep_recent_turns,
            force=f"the prompt (~{overflow_tokens} tokens) is too long for {overflow_model}"
            if overflow_tokens
            else "",
        )
        if plan is None:
            return None
        older = list(transcript.messages[: plan.cut])
        try:
            summary, model = await self._summarize(payload, transcript.summary, older)
        except (RunyardError, TimeoutError) as exc:
            metrics.COMPACTIONS_TOTAL.labels("failed").inc()
            log.warning("run %s: compaction skipped, the summary call failed: %s", payload.run_id, exc)
            return None
        kept = list(transcript.messages[plan.cut :])
        del transcript.messages[:]
        transcript.messages.extend(kept)
        transcript.summary = summary
        transcript.resumed_from_session_id = snapshot.session_id or payload.session_id
        after = estimate_tokens(kept, summary) + estimate_tokens(new_turn)
        metrics.COMPACTIONS_TOTAL.labels("summarized").inc()
        log.info(
            "run %s: compacted session %s (%s): %d message(s) summarised by %s, %d kept, ~%d -> ~%d tokens",
            payload.run_id,
            payload.session_id,
            plan.reason,
            len(older),
            model,
            len(kept),
            plan.tokens_before,
            after,
        )
        return sessions_pb2.CompactionInfo(
            summarized_message_count=len(older),
            kept_message_count=len(kept),
            tokens_before=plan.tokens_before,
            tokens_after=after,
            model=model,
        )

    async def _summarize(
        self, payload: common_pb2.RunPayload, previous: str, older: Sequence[common_pb2.Message]
    ) -> tuple[str, str]:
        """The new summary and the model that wrote it.

        Raises:
            RunyardError: the router failed or answered nothing.
        """
        cfg = self.config.compaction
        request_payload = common_pb2.RunPayload()
        request_payload.CopyFrom(payload)
        request_payload.options.max_output_tokens = cfg.summary_max_tokens
        request_payload.options.tools_enabled = False
        if cfg.model:
            request_payload.model.model = cfg.model
        words = max(cfg.summary_max_tokens * 3 // 4, 16)
        parts = []
        if previous:
            parts.append(f"Summary so far:\n{previous}")
        parts.append(f"Conversation to fold into the summary:\n{render(older)}")
        parts.append("Write the updated summary.")
        prompt = [
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content=SUMMARY_INSTRUCTIONS.format(words=words)),
            common_pb2.Message(role=common_pb2.ROLE_USER, content="\n\n".join(parts)),
        ]
        timeout = cfg.timeout_s
        left = time_left()  # within the run's budget (runyard.worker.budget)
        if left is not None:
            if left <= 0:
                raise TimeoutError("the run's time budget is spent")
            timeout = min(timeout, left)
        call = self.router.Generate(
            router_pb2.GenerateRequest(
                run=request_payload, messages=prompt, purpose=router_pb2.GENERATE_PURPOSE_SUMMARIZE
            ),
            timeout=timeout,
        )
        final: router_pb2.GenerateFinal | None = None
        try:
            async for response in call:
                if response.WhichOneof("event") == "final":
                    final = response.final
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
        summary = final.message.content.strip() if final is not None else ""
        if not summary:
            raise RunyardError("the summary came back empty", reason="EMPTY_SUMMARY")
        return summary, final.model if final is not None else ""
