"""The provider adapters on the wire: every HTTP row of the classification
table as served by fault-injecting OpenAI-compatible and Anthropic servers,
transport failures, and the streaming formats (text, tool calls, usage)."""

from __future__ import annotations

import json
import socket

import pytest

from runyard._proto.v1 import common_pb2
from runyard.common.config import ProviderConfig
from runyard.common.errors import InvalidArgument
from runyard.router.failures import FailoverReason, classify_failure
from runyard.router.providers import AnthropicProvider, Chunk, OpenAIProvider, ProviderError, Request
from tests.fakes.anthropic_server import AnthropicReply, FakeAnthropic, anthropic_error
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.support import router as support
from tests.unit.test_failures import CASES

pytestmark = pytest.mark.timeout(30)

# Fixtures shared by the router tests.
fast_openai = support.fast_openai
fake_anthropic = support.fake_anthropic


def request(model: str = "m", **kw) -> Request:
    return Request(
        model=model,
        messages=[
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
            common_pb2.Message(role=common_pb2.ROLE_USER, content="hi"),
        ],
        **kw,
    )


async def drain(provider, req: Request, key: str = "k") -> list[Chunk]:
    try:
        return [chunk async for chunk in provider.stream(req, key)]
    finally:
        await provider.aclose()


async def failure(provider, req: Request) -> ProviderError:
    with pytest.raises(ProviderError) as error:
        await drain(provider, req)
    return error.value


def _http_cases(shape: str) -> list:
    """Classification cases with an HTTP status, in the given provider shape."""
    out = []
    for case_id, error, reason, rule in CASES:
        if error.status is None or error.cause is not None:
            continue
        is_anthropic = '"type": "error"' in error.body
        if (shape == "anthropic") == is_anthropic:
            out.append(pytest.param(error, reason, rule, id=case_id))
    return out


@pytest.mark.parametrize(("error", "reason", "rule"), _http_cases("openai"))
async def test_openai_adapter_reports_each_http_row(fast_openai: FakeOpenAI, error, reason, rule):
    fast_openai.script("m", Reply(status=error.status, body=error.body, headers=error.headers))
    provider = OpenAIProvider("fake", ProviderConfig(type="openai", base_url=fast_openai.url))
    exc = await failure(provider, request())
    assert (exc.status, exc.url) == (error.status, f"{fast_openai.url}/chat/completions")
    verdict = classify_failure(exc)
    assert (verdict.reason, verdict.rule) == (reason, rule)


@pytest.mark.parametrize(("error", "reason", "rule"), _http_cases("anthropic"))
async def test_anthropic_adapter_reports_each_http_row(fake_anthropic: FakeAnthropic, error, reason, rule):
    fake_anthropic.script("m", AnthropicReply(status=error.status, body=error.body, headers=error.headers))
    provider = AnthropicProvider("claude", ProviderConfig(type="anthropic", base_url=fake_anthropic.url))
    exc = await failure(provider, request())
    verdict = classify_failure(exc)
    assert (verdict.reason, verdict.rule) == (reason, rule)


async def test_retry_after_header_survives_the_wire(fast_openai: FakeOpenAI):
    fast_openai.script("m", Reply(status=429, body="{}", headers={"Retry-After": "7"}))
    exc = await failure(
        OpenAIProvider("fake", ProviderConfig(type="openai", base_url=fast_openai.url)), request()
    )
    assert classify_failure(exc).retry_after_s == 7.0


@pytest.mark.parametrize(
    ("stream_error", "reason"),
    [
        (
            {"message": "The server had an error while processing your request.", "type": "server_error"},
            FailoverReason.SERVER_ERROR,
        ),
        ({"code": 502, "message": "Provider returned error"}, FailoverReason.SERVER_ERROR),
        ({"message": "Rate limit exceeded", "type": "rate_limit_error"}, FailoverReason.RATE_LIMIT),
        ({"message": "maximum context length exceeded"}, FailoverReason.CONTEXT_OVERFLOW),
    ],
)
async def test_openai_error_event_mid_stream(fast_openai: FakeOpenAI, stream_error, reason):
    fast_openai.script("m", Reply(chunks=["a"], stream_error=stream_error))
    provider = OpenAIProvider("fake", ProviderConfig(type="openai", base_url=fast_openai.url))
    exc = await failure(provider, request())
    assert classify_failure(exc).reason == reason


@pytest.mark.parametrize(
    ("error_type", "reason"),
    [
        ("overloaded_error", FailoverReason.OVERLOADED),
        ("rate_limit_error", FailoverReason.RATE_LIMIT),
        ("api_error", FailoverReason.SERVER_ERROR),
        ("timeout_error", FailoverReason.TIMEOUT),
    ],
)
async def test_anthropic_error_event_mid_stream(fake_anthropic: FakeAnthropic, error_type, reason):
    fake_anthropic.script(
        "m", AnthropicReply(chunks=["a"], stream_error={"type": error_type, "message": "x"})
    )
    provider = AnthropicProvider("claude", ProviderConfig(type="anthropic", base_url=fake_anthropic.url))
    exc = await failure(provider, request())
    assert classify_failure(exc).reason == reason


async def test_connection_refused_is_network():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = OpenAIProvider("fake", ProviderConfig(type="openai", base_url=f"http://127.0.0.1:{port}/v1"))
    verdict = classify_failure(await failure(provider, request()))
    assert (verdict.reason, verdict.rule) == (FailoverReason.NETWORK, "transport_network")


async def test_unresolvable_host_is_network():
    provider = OpenAIProvider(
        "fake", ProviderConfig(type="openai", base_url="http://no-such-host.invalid/v1")
    )
    assert classify_failure(await failure(provider, request())).reason == FailoverReason.NETWORK


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_cut_stream_is_network(fast_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, kind):
    if kind == "openai":
        fast_openai.script("m", Reply(chunks=["a", "b", "c"], cut_after=1))
        provider = OpenAIProvider("fake", ProviderConfig(type="openai", base_url=fast_openai.url))
    else:
        fake_anthropic.script("m", AnthropicReply(chunks=["a", "b", "c"], cut_after=1))
        provider = AnthropicProvider("claude", ProviderConfig(type="anthropic", base_url=fake_anthropic.url))
    assert classify_failure(await failure(provider, request())).reason == FailoverReason.NETWORK


async def test_openai_streams_text_tool_calls_and_usage(fast_openai: FakeOpenAI):
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "other", "arguments": "{}"}},
    ]
    fast_openai.script("m", Reply(chunks=["Let me ", "check."], tool_calls=calls, usage=(42, 7)))
    tool = common_pb2.ToolDefinition(
        name="lookup", description="find", parameters_json_schema='{"type": "object"}'
    )
    chunks = await drain(
        OpenAIProvider("fake", ProviderConfig(type="openai", base_url=fast_openai.url)),
        request(tools=[tool], temperature=0.2, max_output_tokens=99),
        key="sk-test",
    )
    assert [c.text for c in chunks if c.kind == "text"] == ["Let me ", "check."]
    assert [
        (c.tool_call.id, c.tool_call.name, c.tool_call.arguments_json)
        for c in chunks
        if c.kind == "tool_call"
    ] == [
        ("call_1", "lookup", '{"q": "x"}'),
        ("call_2", "other", "{}"),
    ]
    assert [(c.input_tokens, c.output_tokens) for c in chunks if c.kind == "usage"] == [(42, 7)]
    assert chunks[-1].finish_reason == "tool_calls"
    # Each tool-call delta tells the stall timers the model is alive.
    assert [c.kind for c in chunks].count("progress") == 2
    [sent] = fast_openai.requests
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["temperature"], sent["max_tokens"]) == (0.2, 99)
    assert sent["tools"][0]["function"]["name"] == "lookup"
    assert sent["_headers"]["authorization"] == "Bearer sk-test"


async def test_anthropic_streams_text_tool_use_and_usage(fake_anthropic: FakeAnthropic):
    fake_anthropic.script(
        "claude-x",
        AnthropicReply(
            chunks=["Checking", "..."],
            tool_uses=[{"id": "toolu_1", "name": "lookup", "input": {"q": "weather in Paris"}}],
            stop_reason="tool_use",
            usage=(30, 11),
        ),
    )
    messages = [
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
        common_pb2.Message(role=common_pb2.ROLE_USER, content="weather?"),
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            content="",
            tool_calls=[common_pb2.ToolCall(id="toolu_0", name="lookup", arguments_json='{"q": "Paris"}')],
        ),
        common_pb2.Message(role=common_pb2.ROLE_TOOL, tool_call_id="toolu_0", content="sunny"),
        common_pb2.Message(role=common_pb2.ROLE_USER, content="and tomorrow?"),
    ]
    tool = common_pb2.ToolDefinition(
        name="lookup", description="find", parameters_json_schema='{"type": "object"}'
    )
    provider = AnthropicProvider(
        "claude", ProviderConfig(type="anthropic", base_url=fake_anthropic.url, default_max_tokens=321)
    )
    chunks = await drain(provider, Request(model="claude-x", messages=messages, tools=[tool]), key="ak-test")

    assert "".join(c.text for c in chunks if c.kind == "text") == "Checking..."
    [call] = [c.tool_call for c in chunks if c.kind == "tool_call"]
    assert (call.id, call.name, json.loads(call.arguments_json)) == (
        "toolu_1",
        "lookup",
        {"q": "weather in Paris"},
    )
    assert [(c.input_tokens, c.output_tokens) for c in chunks if c.kind == "usage"] == [(30, 11)]
    assert chunks[-1].finish_reason == "tool_calls"
    [sent] = fake_anthropic.requests
    assert (
        sent["_headers"]["x-api-key"] == "ak-test" and sent["_headers"]["anthropic-version"] == "2023-06-01"
    )
    assert (sent["system"], sent["max_tokens"], sent["stream"]) == ("Be brief.", 321, True)
    assert sent["tools"] == [{"name": "lookup", "description": "find", "input_schema": {"type": "object"}}]
    # Tool result and the next user text are merged into one user turn.
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]
    assert sent["messages"][1]["content"] == [
        {"type": "tool_use", "id": "toolu_0", "name": "lookup", "input": {"q": "Paris"}}
    ]
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_0", "content": "sunny"},
        {"type": "text", "text": "and tomorrow?"},
    ]


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_tool_schema_that_is_not_json_is_refused_before_any_call(
    fast_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, kind
):
    tools = [
        common_pb2.ToolDefinition(name="ok", parameters_json_schema='{"type": "object"}'),
        common_pb2.ToolDefinition(name="lookup", parameters_json_schema="{not json"),
    ]
    if kind == "openai":
        provider = OpenAIProvider("fake", ProviderConfig(type="openai", base_url=fast_openai.url))
    else:
        provider = AnthropicProvider("claude", ProviderConfig(type="anthropic", base_url=fake_anthropic.url))
    with pytest.raises(InvalidArgument) as error:
        await drain(provider, request(tools=tools))
    assert (error.value.reason, error.value.field) == (
        "INVALID_TOOL_SCHEMA",
        "tools[1].parameters_json_schema",
    )
    assert "'lookup'" in error.value.message
    assert fast_openai.requests == [] and fake_anthropic.requests == []


async def test_anthropic_refusal_and_length_finish_reasons(fake_anthropic: FakeAnthropic):
    fake_anthropic.script(
        "m", AnthropicReply(stop_reason="max_tokens"), AnthropicReply(stop_reason="refusal")
    )
    config = ProviderConfig(type="anthropic", base_url=fake_anthropic.url)
    assert (await drain(AnthropicProvider("c", config), request()))[-1].finish_reason == "length"
    assert (await drain(AnthropicProvider("c", config), request()))[-1].finish_reason == "content_filter"


async def test_anthropic_wrong_route_is_endpoint_not_found(fake_anthropic: FakeAnthropic):
    provider = AnthropicProvider("c", ProviderConfig(type="anthropic", base_url=fake_anthropic.url + "/beta"))
    error = await failure(provider, request())
    assert error.url == f"{fake_anthropic.url}/beta/messages"
    assert classify_failure(error).reason == FailoverReason.ENDPOINT_NOT_FOUND
    assert json.loads(error.body) == json.loads(anthropic_error("not_found_error", "Not Found"))


# ---------------------------------------------------------------- the event-stream format (httpx-sse)

TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}


@pytest.mark.parametrize(
    "framing",
    [
        {"sse_multiline": True},
        {"sse_comments": True},
        {"sse_crlf": True},
        {"sse_split": True},
        {"sse_multiline": True, "sse_comments": True, "sse_crlf": True, "sse_split": True},
    ],
    ids=["multi-line-data", "comments-and-fields", "crlf", "split-writes", "all-at-once"],
)
async def test_openai_stream_in_every_legal_event_stream_framing(fast_openai: FakeOpenAI, framing):
    fast_openai.script(
        "m", Reply(chunks=["Hel", "lo\nthere"], tool_calls=[TOOL_CALL], usage=(4, 2), **framing)
    )
    chunks = await drain(
        OpenAIProvider("fake", ProviderConfig(type="openai", base_url=fast_openai.url)), request()
    )
    assert "".join(c.text for c in chunks if c.kind == "text") == "Hello\nthere"
    assert [c.tool_call.arguments_json for c in chunks if c.kind == "tool_call"] == ['{"q": "x"}']
    assert [(c.input_tokens, c.output_tokens) for c in chunks if c.kind == "usage"] == [(4, 2)]
    assert chunks[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "framing", [{"sse_multiline": True}, {"sse_crlf": True}, {"sse_multiline": True, "sse_crlf": True}]
)
async def test_anthropic_stream_with_multi_line_data_and_crlf(fake_anthropic: FakeAnthropic, framing):
    fake_anthropic.script("m", AnthropicReply(chunks=["Hi ", "there."], usage=(5, 3), **framing))
    chunks = await drain(
        AnthropicProvider("claude", ProviderConfig(type="anthropic", base_url=fake_anthropic.url)), request()
    )
    assert "".join(c.text for c in chunks if c.kind == "text") == "Hi there."
    assert [(c.input_tokens, c.output_tokens) for c in chunks if c.kind == "usage"] == [(5, 3)]


async def test_keep_alives_are_not_model_output(fast_openai: FakeOpenAI):
    # Comments and empty events before the first token: nothing reaches the
    # router (so its first-token timer keeps running; see test_router_engine).
    fast_openai.script(
        "m", Reply(chunks=["ok"], first_token_delay_s=0.35, keepalive_every_s=0.05, sse_crlf=True)
    )
    chunks = await drain(
        OpenAIProvider("fake", ProviderConfig(type="openai", base_url=fast_openai.url)), request()
    )
    assert [c.kind for c in chunks] == ["text", "usage", "finish"]


async def test_an_answer_that_is_not_an_event_stream_is_reported_with_its_body(fast_openai: FakeOpenAI):
    # A 200 whose body is JSON (here an OpenRouter-style error object) instead of text/event-stream.
    fast_openai.script(
        "m", Reply(status=200, body='{"error": {"code": 503, "message": "Provider overloaded"}}')
    )
    error = await failure(
        OpenAIProvider("fake", ProviderConfig(type="openai", base_url=fast_openai.url)), request()
    )
    assert "application/json instead of an event stream" in error.message
    assert classify_failure(error).reason == FailoverReason.OVERLOADED
