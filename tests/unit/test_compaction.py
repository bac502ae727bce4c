"""Worker-side compaction: where to cut, never between a tool call and its
result, what the summariser is asked, and that a failed summary leaves the
run uncompacted."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import REGISTRY

from runyard._proto.v1 import common_pb2, router_pb2, sessions_pb2
from runyard.common.config import load_config
from runyard.worker.compaction import Compactor, estimate_tokens, plan_cut, render, safe_cuts, turn_starts

USER, ASSISTANT, TOOL = common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT, common_pb2.ROLE_TOOL


def msg(role: int, text: str = "", calls: tuple[str, ...] = (), answers: str = "") -> common_pb2.Message:
    return common_pb2.Message(
        role=role,
        content=text,
        tool_call_id=answers,
        name="lookup" if answers else "",
        tool_calls=[common_pb2.ToolCall(id=c, name="lookup", arguments_json='{"q": 1}') for c in calls],
    )


def conversation(turns: int, words: int = 50) -> list[common_pb2.Message]:
    out = []
    for i in range(turns):
        out.append(msg(USER, f"question {i} " + "word " * words))
        out.append(msg(ASSISTANT, f"answer {i} " + "word " * words))
    return out


def test_estimate_counts_text_tool_calls_and_summary():
    assert estimate_tokens([msg(USER, "x" * 400)]) == 100 + 4
    with_call = estimate_tokens([msg(ASSISTANT, "", calls=("c1",))])
    assert with_call > 4
    assert estimate_tokens([], "y" * 40) == 10


def test_safe_cuts_never_separate_a_tool_call_from_its_result():
    messages = [
        msg(USER, "q"),  # 0
        msg(ASSISTANT, "", calls=("a", "b")),  # 1
        msg(TOOL, "ra", answers="a"),  # 2
        msg(TOOL, "rb", answers="b"),  # 3
        msg(ASSISTANT, "done"),  # 4
        msg(USER, "q2"),  # 5
        msg(ASSISTANT, "", calls=("c",)),  # 6
    ]
    # Not 2, 3 (a call open), not 7 (c never answered).
    assert safe_cuts(messages) == [1, 4, 5, 6]
    assert turn_starts(messages) == [0, 5]


def test_plan_keeps_recent_turns_and_only_fires_past_the_limits():
    transcript = common_pb2.Transcript(messages=conversation(10))
    total = estimate_tokens(transcript.messages)
    assert plan_cut(transcript, 10, threshold_tokens=total + 100, max_turns=0, keep_recent_turns=4) is None
    plan = plan_cut(transcript, 10, threshold_tokens=total * 9 // 10, max_turns=0, keep_recent_turns=4)
    assert plan is not None and plan.cut == 12  # the last 4 turns (8 messages) stay
    # What is kept must fit in half the threshold, so the next run does not
    # compact again at once: with a lower threshold fewer turns stay.
    tighter = plan_cut(transcript, 10, threshold_tokens=total // 2, max_turns=0, keep_recent_turns=4)
    assert tighter is not None and tighter.cut == 16
    assert estimate_tokens(transcript.messages[tighter.cut :]) <= total // 4
    by_turns = plan_cut(transcript, 10, threshold_tokens=0, max_turns=8, keep_recent_turns=3)
    assert by_turns is not None and by_turns.cut == 14 and "turns" in by_turns.reason
    # At most max_turns - 2 turns stay, so the next run does not compact again.
    clamped = plan_cut(transcript, 10, threshold_tokens=0, max_turns=5, keep_recent_turns=4)
    assert clamped is not None and clamped.cut == 14


def test_plan_keeps_fewer_turns_when_they_alone_are_too_long():
    transcript = common_pb2.Transcript(messages=conversation(6, words=350))
    plan = plan_cut(transcript, 0, threshold_tokens=1000, max_turns=0, keep_recent_turns=4)
    # Each message is ~444 tokens; half the threshold (500) holds no whole
    # turn, so the cut falls inside the last one: only its answer stays.
    assert plan is not None and plan.cut == 11


def test_plan_moves_a_cut_off_a_tool_exchange():
    messages = conversation(3)
    messages[4:4] = [msg(ASSISTANT, "", calls=("x",)), msg(TOOL, "r", answers="x")]
    transcript = common_pb2.Transcript(messages=messages)
    plan = plan_cut(transcript, 0, threshold_tokens=1, max_turns=0, keep_recent_turns=1)
    assert plan is not None
    kept = messages[plan.cut :]
    assert kept[0].role != TOOL
    open_calls = {c.id for m in messages[: plan.cut] for c in m.tool_calls} - {
        m.tool_call_id for m in messages[: plan.cut] if m.role == TOOL
    }
    assert open_calls == set()


def test_render_inlines_tool_traffic():
    text = render([msg(USER, "hi"), msg(ASSISTANT, "", calls=("a",)), msg(TOOL, "42", answers="a")])
    assert text.splitlines() == [
        "user: hi",
        'assistant called tool lookup with {"q": 1}',
        "tool result (lookup): 42",
    ]


class FakeCall:
    def __init__(self, responses, error=None):
        self.responses, self.error, self.cancelled = responses, error, False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for response in self.responses:
            yield response
        if self.error is not None:
            raise self.error

    def cancel(self):
        self.cancelled = True


class FakeRouter:
    def __init__(self, summary: str = "", error: Exception | None = None):
        self.summary, self.error, self.requests = summary, error, []

    def Generate(self, request, timeout=None):
        self.requests.append(request)
        final = router_pb2.GenerateResponse(
            final=router_pb2.GenerateFinal(
                message=common_pb2.Message(role=ASSISTANT, content=self.summary), model="echo/summarizer"
            )
        )
        return FakeCall([] if self.error else [final], self.error)


def snapshot_of(messages, summary="") -> sessions_pb2.GetTranscriptResponse:
    return sessions_pb2.GetTranscriptResponse(
        transcript=common_pb2.Transcript(messages=messages, summary=summary),
        head_turn=5,
        session_id="session-1",
    )


def payload() -> common_pb2.RunPayload:
    return common_pb2.RunPayload(
        run_id="run-1",
        session_id="session-1",
        agent_id="default",
        run_token="tok",
        input=common_pb2.RunInput(text="and now?"),
    )


async def test_compactor_summarises_the_older_turns_and_folds_the_old_summary():
    config = load_config(
        environ={
            "RUNYARD_COMPACTION__MAX_TOKENS": "300",
            "RUNYARD_COMPACTION__KEEP_RECENT_TURNS": "2",
            "RUNYARD_COMPACTION__SUMMARY_MAX_TOKENS": "100",
        }
    )
    router = FakeRouter("the user asked ten questions")
    snapshot = snapshot_of(conversation(10, words=10), summary="earlier: greetings")
    info = await Compactor(config, router).compact(payload(), snapshot)

    assert info is not None
    assert (info.summarized_message_count, info.kept_message_count, info.model) == (16, 4, "echo/summarizer")
    assert info.tokens_after < info.tokens_before
    transcript = snapshot.transcript
    assert transcript.summary == "the user asked ten questions"
    assert [m.content.split()[1] for m in transcript.messages] == ["8", "8", "9", "9"]
    assert transcript.resumed_from_session_id == "session-1"
    (request,) = router.requests
    assert request.purpose == router_pb2.GENERATE_PURPOSE_SUMMARIZE
    assert request.run.run_token == "tok" and request.run.options.max_output_tokens == 100
    prompt = request.messages[1].content
    assert "Summary so far:\nearlier: greetings" in prompt
    assert "user: question 0" in prompt and "assistant: answer 7" in prompt
    assert "question 8" not in prompt


async def test_a_failed_summary_leaves_the_transcript_alone():
    config = load_config(environ={"RUNYARD_COMPACTION__MAX_TOKENS": "100"})
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
    )
    before = REGISTRY.get_sample_value("runyard_compactions_total", {"outcome": "failed"}) or 0
    snapshot = snapshot_of(conversation(6))
    original = snapshot.transcript.SerializeToString()
    assert await Compactor(config, FakeRouter(error=error)).compact(payload(), snapshot) is None
    assert snapshot.transcript.SerializeToString() == original
    assert REGISTRY.get_sample_value("runyard_compactions_total", {"outcome": "failed"}) == before + 1
    assert await Compactor(config, FakeRouter(summary="  ")).compact(payload(), snapshot) is None


async def test_context_window_fraction_sets_the_threshold():
    config = load_config(
        environ={
            "RUNYARD_COMPACTION__MAX_TOKENS": "0",
            "RUNYARD_COMPACTION__CONTEXT_WINDOWS": '{"echo/echo": 1000}',
            "RUNYARD_COMPACTION__CONTEXT_FRACTION": "0.5",
        }
    )
    compactor = Compactor(config, FakeRouter("s"))
    assert compactor.threshold(payload()) == 500
    other = payload()
    other.model.model = "echo/big"
    assert compactor.threshold(other) == 0
    disabled = load_config(
        environ={"RUNYARD_COMPACTION__ENABLED": "false", "RUNYARD_COMPACTION__MAX_TOKENS": "1"}
    )
    assert await Compactor(disabled, FakeRouter("s")).compact(payload(), snapshot_of(conversation(5))) is None


@pytest.mark.parametrize(
    "bad", [{"RUNYARD_COMPACTION__MODEL": "nope/x"}, {"RUNYARD_COMPACTION__MODEL": "noslash"}]
)
def test_compaction_model_must_name_a_configured_provider(bad):
    from runyard.common.config import ConfigError

    with pytest.raises(ConfigError) as error:
        load_config(environ=bad)
    assert "compaction.model" in str(error.value)
