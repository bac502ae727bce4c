"""Compaction end to end: the worker summarises older turns through the
router, the commit rolls the key over to a new session, the conversation
stays answerable and the lifecycle events pair up."""

from __future__ import annotations

import pytest

from runyard._proto.v1 import common_pb2
from runyard.v1 import GetMessagesRequest, GetSessionRequest
from tests.fakes.openai_server import FakeOpenAI, Reply, provider_config
from tests.integration.test_watch_events import read_events

pytestmark = pytest.mark.timeout(120)

TURNS = [
    ("My favourite colour is blue.", "Noted: blue."),
    ("I live in Lisbon.", "Noted: Lisbon."),
    ("I have a cat.", "Noted: cat."),
    ("What do you know about me?", "You like blue, live in Lisbon and have a cat."),
    ("Thanks!", "You are welcome."),
]
SUMMARY = "The user's favourite colour is blue."


def contents(request: dict) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in request["messages"]]


async def test_compaction_rolls_over_and_keeps_the_conversation_answerable(
    stack_factory, fake_openai: FakeOpenAI
):
    fake_openai.script("model-a", *[Reply(chunks=[answer]) for _, answer in TURNS])
    fake_openai.script("summarizer", Reply(chunks=[SUMMARY]))
    config = provider_config(fake_openai)
    config["compaction"] = {
        "max_tokens": 0,
        "max_turns": 3,
        "keep_recent_turns": 1,
        "model": "fake/summarizer",
    }
    stack = await stack_factory(config).start()
    runs = []
    async with stack.client() as client:
        for text, _ in TURNS:
            runs.append([e async for e in client.send("compact:1", text)])
        current = (await client.unary("GetSession", GetSessionRequest(session_key="compact:1"))).session
        old = (await client.unary("GetSession", GetSessionRequest(session_id=runs[0][0].session_id))).session
        messages = await client.unary("GetMessages", GetMessagesRequest(session_key="compact:1"))

    assert all(run[-1].HasField("completed") for run in runs)
    assert [run[-1].completed.message.content for run in runs] == [answer for _, answer in TURNS]
    # Turn 4 (past max_turns = 3) folded the first two turns into a summary;
    # turn 5 (three turns) did not compact again.
    (summary_request,) = fake_openai.requests_for("summarizer")
    asked = summary_request["messages"][-1]["content"]
    assert "user: My favourite colour is blue." in asked and "assistant: Noted: Lisbon." in asked
    assert "cat" not in asked
    model_requests = fake_openai.requests_for("model-a")
    assert len(model_requests) == 5
    fourth, fifth = contents(model_requests[3]), contents(model_requests[4])
    assert fourth[0][0] == "system" and SUMMARY in fourth[0][1] and fourth[0][1].startswith("Be brief.")
    assert fourth[1:] == [
        ("user", "I have a cat."),
        ("assistant", "Noted: cat."),
        ("user", "What do you know about me?"),
    ]
    # The next run sees the summary and the recent turns, including the compacting run's own.
    assert SUMMARY in fifth[0][1]
    assert fifth[1:] == fourth[1:] + [("assistant", TURNS[3][1]), ("user", "Thanks!")]

    # The key rolled over: the compacting run landed in the new session.
    first_session = runs[0][0].session_id
    assert [run[0].session_id for run in runs[:4]] == [first_session] * 4
    assert runs[4][0].session_id == current.id != first_session
    assert current.resumed_from_session_id == first_session
    assert (old.current, old.next_session_id) == (False, current.id)
    assert old.end_reason == common_pb2.SESSION_END_REASON_COMPACTION
    assert messages.summary == SUMMARY
    assert [m.content for m in messages.messages] == [t for pair in TURNS[2:] for t in pair]

    # Lifecycle events pair up across the rollover.
    kinds = ("session.start", "session.end", "session.compacted")
    await read_events(stack, 0, kinds, until=4)  # the relay has caught up
    events = await read_events(stack, 0, kinds)  # and nothing more comes
    seen = [(e.type, e.session_id) for e in events]
    assert seen == [
        ("session.start", first_session),
        ("session.end", first_session),
        ("session.start", current.id),
        ("session.compacted", current.id),
    ]
    start, end, resumed, compacted = events
    assert start.session_start.reason == common_pb2.SESSION_START_REASON_NEW
    assert end.session_end.reason == common_pb2.SESSION_END_REASON_COMPACTION
    assert (end.session_end.next_session_id, end.session_end.next_session_key) == (current.id, "compact:1")
    assert end.session_end.message_count == 6
    assert resumed.session_start.reason == common_pb2.SESSION_START_REASON_RESUMED
    assert resumed.session_start.resumed_from_session_id == first_session
    assert compacted.session_compacted.previous_session_id == first_session
    assert (
        compacted.session_compacted.summarized_message_count,
        compacted.session_compacted.kept_message_count,
    ) == (4, 2)
    assert compacted.session_compacted.model == "fake/summarizer"
