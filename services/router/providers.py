"""Model provider adapters: OpenAI-compatible chat completions, Anthropic
Messages, and the built-in echo provider.

Both HTTP adapters read Server-Sent Events with ``httpx-sse`` (the WHATWG
event-stream rules: multi-line ``data`` fields, ``:`` comments, CR/LF/CRLF
line ends, ``event``/``id``/``retry`` fields); comments and empty events
(keep-alives) are not model output, so they never reset the router's stall
timers.

Every adapter turns one model call into an async stream of :class:`Chunk`
objects and reports failures as :class:`ProviderError` carrying what the
classifier (:mod:`runyard.router.failures`) needs: HTTP status, headers,
body text and the transport exception. Adapters talk HTTP with httpx, which
never retries a request on its own (no SDK retry layer); the router alone
decides what happens after a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from httpx_sse import EventSource, SSEError

from runyard._proto.v1 import common_pb2
from runyard.common.config import ProviderConfig
from runyard.common.errors import InvalidArgument

__all__ = [
    "AnthropicProvider",
    "Chunk",
    "EchoProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderError",
    "Request",
    "anthropic_messages",
    "build_provider",
    "openai_messages",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Chunk:
    """One piece of a streamed answer.

    ``kind`` is ``"text"`` (``text``), ``"tool_call"`` (``tool_call``, complete),
    ``"usage"`` (``input_tokens``/``output_tokens``), ``"finish"``
    (``finish_reason``) or ``"progress"``: the model is producing tokens the
    adapter does not hand on yet (tool-call arguments, which are only
    complete at the end; reasoning). A progress chunk carries nothing; it
    tells the router's stall timers that the model is alive.
    """

    kind: str
    text: str = ""
    tool_call: common_pb2.ToolCall | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""


class ProviderError(Exception):
    """A failed model call, with the raw material for classification.

    Args:
        message: short description (never contains credentials).
        status: HTTP status, if the provider answered.
        body: response body text (truncated), if any.
        headers: response headers (lower-case names), if any.
        url: the URL called (no query secrets).
        cause: the transport exception, if any (httpx.ConnectError, ...).
        stalled: "ttft" or "idle" when the router's stall timer fired.
        budget_cut: the stall timer was the run budget's share, shorter
            than the configured timer (says nothing about the model).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: str = "",
        headers: dict[str, str] | None = None,
        url: str = "",
        cause: BaseException | None = None,
        stalled: str = "",
        budget_cut: bool = False,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.url = url
        self.cause = cause
        self.stalled = stalled
        self.budget_cut = budget_cut

    def redact(self, secret: str) -> None:
        """Replace ``secret`` (the API key sent) wherever the provider echoed it
        back in the message or body, before anything logs or stores them."""
        if len(secret) < 8 or (secret not in self.body and secret not in self.message):
            return
        self.body = self.body.replace(secret, "[redacted]")
        self.message = self.message.replace(secret, "[redacted]")
        self.args = (self.message,)


@dataclass(slots=True)
class Request:
    """One model call."""

    model: str
    messages: Sequence[common_pb2.Message]
    tools: Sequence[common_pb2.ToolDefinition] = ()
    temperature: float | None = None
    max_output_tokens: int = 0
    extra: dict[str, str] = field(default_factory=dict)


class Provider(Protocol):
    """A model provider adapter."""

    name: str

    def stream(self, request: Request, api_key: str) -> AsyncIterator[Chunk]:
        """Stream one answer; raise :class:`ProviderError` on failure."""
        ...

    async def aclose(self) -> None: ...


_ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}


def openai_messages(messages: Sequence[common_pb2.Message]) -> list[dict[str, object]]:
    """Messages in the OpenAI chat completions format."""
    out: list[dict[str, object]] = []
    for message in messages:
        item: dict[str, object] = {"role": _ROLE_NAMES.get(message.role, "user"), "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments_json or "{}"},
                }
                for c in message.tool_calls
            ]
        if message.role == common_pb2.ROLE_TOOL:
            item["tool_call_id"] = message.tool_call_id
        out.append(item)
    return out


class OpenAIProvider:
    """OpenAI-compatible ``POST {base_url}/chat/completions`` with ``stream: true``.

    Works with OpenAI, vLLM, Ollama, llama.cpp's server and OpenRouter. The
    stream is Server-Sent Events of ``chat.completion.chunk`` objects ending
    with ``data: [DONE]``; usage arrives in the last chunk when
    ``stream_options.include_usage`` is honoured
    (https://platform.openai.com/docs/api-reference/chat-streaming).
    """

    def __init__(self, name: str, config: ProviderConfig, *, connect_timeout_s: float = 5.0):
        self.name = name
        self.base_url = config.base_url.rstrip("/")
        self.headers = dict(config.headers)
        self.client = HttpClients(connect_timeout_s)

    async def aclose(self) -> None:
        await self.client.aclose()

    def stream(self, request: Request, api_key: str) -> AsyncIterator[Chunk]:
        """Stream one answer (see :func:`_post_sse`).

        Raises:
            InvalidArgument: a tool's parameter schema is not JSON.
        """
        url = f"{self.base_url}/chat/completions"
        body: dict[str, object] = {
            "model": request.model,
            "messages": openai_messages(request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_output_tokens:
            body["max_tokens"] = request.max_output_tokens
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": _tool_schema(t, index, "{}"),
                    },
                }
                for index, t in enumerate(request.tools)
            ]
        headers = {"accept": "text/event-stream", **self.headers}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        return _post_sse(self.name, self.client, url, body, headers, self._parse)

    async def _parse(self, response: httpx.Response, url: str) -> AsyncIterator[Chunk]:
        calls: dict[int, dict[str, str]] = {}
        finish = ""
        done = False
        events = _sse_data(response, self.name, url)
        async for data in events:
            if data.strip() == "[DONE]":
                done = True
                await _drain(events)
                break
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                event = None
            if not isinstance(event, dict):
                raise ProviderError(f"{self.name} sent a malformed stream chunk", url=url, body=data[:2048])
            if "error" in event:
                raise ProviderError(
                    f"{self.name} reported an error mid-stream", body=json.dumps(event)[:8192], url=url
                )
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if text:
                    yield Chunk("text", text=text)
                elif delta.get("tool_calls") or delta.get("reasoning_content") or delta.get("reasoning"):
                    # vLLM/DeepSeek stream reasoning as reasoning_content, OpenRouter as reasoning.
                    yield Chunk("progress")
                for call in delta.get("tool_calls") or ():
                    slot = calls.setdefault(
                        int(call.get("index", 0)), {"id": "", "name": "", "arguments": ""}
                    )
                    slot["id"] = call.get("id") or slot["id"]
                    function = call.get("function") or {}
                    slot["name"] = function.get("name") or slot["name"]
                    slot["arguments"] += function.get("arguments") or ""
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
            usage = event.get("usage")
            if usage:
                yield Chunk(
                    "usage",
                    input_tokens=int(usage.get("prompt_tokens") or 0),
                    output_tokens=int(usage.get("completion_tokens") or 0),
                )
        if not done and not finish:
            # Neither [DONE] nor a finish_reason: the answer was cut short.
            raise ProviderError(
                f"{self.name} ended the stream before the answer was finished",
                url=url,
                cause=httpx.RemoteProtocolError("incomplete chat completions stream"),
            )
        for index in sorted(calls):
            slot = calls[index]
            yield Chunk(
                "tool_call",
                tool_call=common_pb2.ToolCall(
                    id=slot["id"], name=slot["name"], arguments_json=slot["arguments"]
                ),
            )
        yield Chunk("finish", finish_reason=finish or ("tool_calls" if calls else "stop"))


_WORD = re.compile(r"\S+\s*|\s+")


class EchoProvider:
    """Built-in deterministic provider: answers ``echo: <last user text>``.

    Streams the answer word by word (``echo_delay_ms`` apart), reports usage
    as word counts, and needs no network or key. The model name is ignored
    except ``fail-*`` models, which always fail (for demonstrating failover:
    ``echo/fail-404`` behaves like a model that does not exist).

    Tool calls, for exercising the tool loop without a real model: when
    tools are offered and the last message is a user message
    ``/tool NAME {json arguments}``, echo answers with that one tool call
    (id ``echo-call-<number of messages>``, finish reason ``tool_calls``).
    When the last message is a tool result it answers
    ``echo: tool result: <content>``, and when it is a system message after
    the conversation started (a background-task notification) it answers
    ``echo: <content>``.
    """

    def __init__(self, name: str, config: ProviderConfig):
        self.name = name
        self.delay_s = config.echo_delay_ms / 1000

    async def aclose(self) -> None:
        return None

    async def stream(self, request: Request, api_key: str) -> AsyncIterator[Chunk]:
        if request.model.startswith("fail-"):
            suffix = request.model.removeprefix("fail-")
            status = int(suffix) if suffix.isdigit() else 500
            body = "echo failure"
            if status == 404:
                body = json.dumps(
                    {
                        "error": {
                            "message": f"The model `{request.model}` does not exist",
                            "code": "model_not_found",
                        }
                    }
                )
            raise ProviderError(f"echo model {request.model} fails by design", status=status, body=body)
        last = request.messages[-1] if request.messages else None
        if last is not None and last.role == common_pb2.ROLE_USER and request.tools:
            name, _, arguments = last.content.removeprefix("/tool ").strip().partition(" ")
            if last.content.startswith("/tool ") and name:
                call = common_pb2.ToolCall(
                    id=f"echo-call-{len(request.messages)}",
                    name=name,
                    arguments_json=arguments.strip() or "{}",
                )
                yield Chunk("tool_call", tool_call=call)
                yield Chunk("usage", input_tokens=sum(len(m.content.split()) for m in request.messages))
                yield Chunk("finish", finish_reason="tool_calls")
                return
        if last is not None and last.role == common_pb2.ROLE_TOOL:
            answer = f"echo: tool result: {last.content}"
        elif last is not None and last.role == common_pb2.ROLE_SYSTEM and len(request.messages) > 1:
            answer = f"echo: {last.content}"
        else:
            last_user = next(
                (m.content for m in reversed(request.messages) if m.role == common_pb2.ROLE_USER), ""
            )
            answer = f"echo: {last_user}"
        words = _WORD.findall(answer)
        for index, word in enumerate(words):
            if index and self.delay_s:
                await asyncio.sleep(self.delay_s)
            yield Chunk("text", text=word)
        prompt_words = sum(len(m.content.split()) for m in request.messages)
        yield Chunk("usage", input_tokens=prompt_words, output_tokens=len(answer.split()))
        yield Chunk("finish", finish_reason="stop")


#: How long to wait for the end of a response body after the end-of-answer
#: marker before giving up on reusing the connection.
DRAIN_TIMEOUT_S = 0.5


async def _drain(events: AsyncIterator[str]) -> None:
    """Read what follows the end-of-answer marker (normally just the end of
    the chunked body) so httpx can put the connection back in its pool, as
    the OpenAI SDK does; a server that keeps the body open is cut off after
    :data:`DRAIN_TIMEOUT_S` (the answer is complete either way)."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError, ProviderError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for _ in events:
                pass


async def _sse_data(response: httpx.Response, name: str, url: str) -> AsyncIterator[str]:
    """The ``data`` of each Server-Sent Event of ``response`` that carries
    any (parsed by ``httpx-sse``: multi-line data joined with ``\n``,
    comments and empty keep-alive events skipped, any line ending).

    Raises:
        ProviderError: the response is not an event stream (its body, up to
            8 KiB, is attached for the classifier: an error object in a
            ``200 application/json`` answer is read like any other).
    """
    source = EventSource(response)
    try:
        async for event in source.aiter_sse():
            if event.data:
                yield event.data
    except SSEError:
        content_type = response.headers.get("content-type", "") or "no content type"
        raise await _error_from(
            name,
            response,
            url,
            f"{name} answered {content_type} instead of an event stream (text/event-stream) for {url}",
        ) from None


class HttpClients:
    """httpx clients of one provider, each request on the least busy one.

    httpcore's connection pool looks at every pooled connection (a socket
    poll per idle one) each time a request takes or returns a connection
    (https://github.com/encode/httpcore/pull/924), so one pool serving many
    concurrent streams costs O(streams) system calls per request. A few
    smaller pools keep that flat; a lone request always uses the first
    client, so its connection stays warm. Clients are created on first use.
    No read timeout: the router's first-token and idle timers bound reads.
    """

    def __init__(self, connect_timeout_s: float, shards: int = 8):
        self.connect_timeout_s = connect_timeout_s
        self._clients: list[httpx.AsyncClient | None] = [None] * shards
        self._busy = [0] * shards

    def _client(self, index: int) -> httpx.AsyncClient:
        client = self._clients[index]
        if client is None:
            timeout = self.connect_timeout_s
            client = self._clients[index] = httpx.AsyncClient(
                timeout=httpx.Timeout(connect=timeout, read=None, write=30.0, pool=timeout),
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            )
        return client

    @contextlib.asynccontextmanager
    async def stream(self, method: str, url: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """``httpx.AsyncClient.stream`` on the least busy client."""
        busy = self._busy
        index = busy.index(min(busy))
        busy[index] += 1
        try:
            async with self._client(index).stream(method, url, **kwargs) as response:
                yield response
        finally:
            busy[index] -= 1

    async def aclose(self) -> None:
        for client in self._clients:
            if client is not None:
                await client.aclose()
        self._clients = [None] * len(self._clients)


def _tool_schema(tool: common_pb2.ToolDefinition, index: int, default: str) -> object:
    """``tool``'s parameter schema, parsed.

    Raises:
        InvalidArgument: not JSON (INVALID_TOOL_SCHEMA, field
            ``tools[<index>].parameters_json_schema``).
    """
    try:
        return json.loads(tool.parameters_json_schema or default)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(
            f"tool {tool.name!r}: parameters_json_schema is not valid JSON ({exc})",
            reason="INVALID_TOOL_SCHEMA",
            field=f"tools[{index}].parameters_json_schema",
        ) from None


async def _post_sse(
    name: str,
    client: HttpClients,
    url: str,
    body: dict[str, object],
    headers: dict[str, str],
    parse: Callable[[httpx.Response, str], AsyncIterator[Chunk]],
) -> AsyncIterator[Chunk]:
    """POST ``body`` to ``url`` and stream ``parse(response, url)``. An HTTP
    error status and a transport failure become a :class:`ProviderError`."""
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code >= 400:
                raise await _error_from(name, response, url)
            if response.headers.get("content-type", "").lower().startswith("text/html"):
                # A web page, not an API: the base URL is wrong (classified
                # ENDPOINT_NOT_FOUND, never retried or cascaded).
                raise await _error_from(
                    name, response, url, f"{name} answered a web page (HTTP {response.status_code}) for {url}"
                )
            async for chunk in parse(response, url):
                yield chunk
    except httpx.TransportError as exc:
        raise ProviderError(f"{name}: {type(exc).__name__} calling {url}: {exc}", url=url, cause=exc) from exc


async def _error_from(name: str, response: httpx.Response, url: str, message: str = "") -> ProviderError:
    raw = await response.aread()
    return ProviderError(
        message or f"{name} answered HTTP {response.status_code} for {url}",
        status=response.status_code,
        body=raw[:8192].decode("utf-8", "replace"),
        headers={k.lower(): v for k, v in response.headers.items()},
        url=url,
    )


_ANTHROPIC_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}


def anthropic_messages(messages: Sequence[common_pb2.Message]) -> tuple[str, list[dict[str, object]]]:
    """``(system, messages)`` in the Anthropic Messages format.

    Leading system messages become the top-level ``system`` text; a system
    message later in the conversation (a background-task notification) is a
    user turn's text block, so it stays in place and the conversation still
    ends on a user turn. Assistant tool calls become ``tool_use`` blocks;
    tool results become ``tool_result`` blocks of a user turn; consecutive
    turns of one role are merged, since the API expects user and assistant
    turns to alternate (https://docs.claude.com/en/api/messages).
    """
    system: list[str] = []
    out: list[dict[str, object]] = []
    for message in messages:
        if message.role == common_pb2.ROLE_SYSTEM and not out:
            if message.content:
                system.append(message.content)
            continue
        blocks: list[dict[str, object]] = []
        if message.role == common_pb2.ROLE_TOOL:
            role = "user"
            blocks.append(
                {"type": "tool_result", "tool_use_id": message.tool_call_id, "content": message.content}
            )
        else:
            role = "assistant" if message.role == common_pb2.ROLE_ASSISTANT else "user"
            if message.content:
                blocks.append({"type": "text", "text": message.content})
            for call in message.tool_calls:
                try:
                    arguments = json.loads(call.arguments_json or "{}")
                except json.JSONDecodeError:
                    arguments = {"_raw": call.arguments_json}
                blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
        if not blocks:
            continue
        if out and out[-1]["role"] == role:
            previous = out[-1]["content"]
            assert isinstance(previous, list)
            previous.extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    return "\n\n".join(system), out


class AnthropicProvider:
    """Anthropic Messages API: ``POST {base_url}/messages`` with ``stream: true``.

    Headers ``x-api-key`` and ``anthropic-version``. The stream is
    Server-Sent Events: ``message_start`` (usage.input_tokens),
    ``content_block_start`` (``text`` or ``tool_use`` with id and name),
    ``content_block_delta`` (``text_delta`` or ``input_json_delta``),
    ``content_block_stop``, ``message_delta`` (stop_reason,
    usage.output_tokens), ``message_stop``, ``ping``, and ``error`` events
    carrying ``{"type": "error", "error": {"type", "message"}}``
    (https://docs.claude.com/en/docs/build-with-claude/streaming).
    """

    def __init__(self, name: str, config: ProviderConfig, *, connect_timeout_s: float = 5.0):
        self.name = name
        self.base_url = config.base_url.rstrip("/")
        self.headers = dict(config.headers)
        self.version = config.anthropic_version
        self.default_max_tokens = config.default_max_tokens
        self.client = HttpClients(connect_timeout_s)

    async def aclose(self) -> None:
        await self.client.aclose()

    def body(self, request: Request) -> dict[str, object]:
        """The JSON body of one streamed Messages call.

        Raises:
            InvalidArgument: a tool's parameter schema is not JSON.
        """
        system, messages = anthropic_messages(request.messages)
        body: dict[str, object] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_output_tokens or self.default_max_tokens,
            "stream": True,
        }
        if system:
            body["system"] = system
        if request.temperature is not None:
            body["temperature"] = min(request.temperature, 1.0)
        if request.tools:
            body["tools"] = [
                {
                    "name": t.name,
                    "description": t.description,
                    "input_schema": _tool_schema(t, index, '{"type": "object"}'),
                }
                for index, t in enumerate(request.tools)
            ]
        return body

    def stream(self, request: Request, api_key: str) -> AsyncIterator[Chunk]:
        """Stream one answer (see :func:`_post_sse`).

        Raises:
            InvalidArgument: a tool's parameter schema is not JSON.
        """
        url = f"{self.base_url}/messages"
        headers = {"accept": "text/event-stream", "anthropic-version": self.version, **self.headers}
        if api_key:
            headers["x-api-key"] = api_key
        return _post_sse(self.name, self.client, url, self.body(request), headers, self._parse)

    async def _parse(self, response: httpx.Response, url: str) -> AsyncIterator[Chunk]:
        blocks: dict[int, dict[str, str]] = {}
        input_tokens = output_tokens = 0
        finish = ""
        stopped = False
        events = _sse_data(response, self.name, url)
        async for data in events:
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                raise ProviderError(
                    f"{self.name} sent a malformed stream event", url=url, body=data[:2048]
                ) from None
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "error":
                raise ProviderError(
                    f"{self.name} reported an error mid-stream", body=json.dumps(event)[:8192], url=url
                )
            if kind == "message_start":
                usage = (event.get("message") or {}).get("usage") or {}
                input_tokens = int(usage.get("input_tokens") or 0)
                output_tokens = int(usage.get("output_tokens") or 0)
            elif kind == "content_block_start":
                block = event.get("content_block") or {}
                index = int(event.get("index", 0))
                if block.get("type") == "text" and block.get("text"):
                    yield Chunk("text", text=block["text"])
                else:  # tool_use, thinking, ...: output the stall timers must see
                    if block.get("type") == "tool_use":
                        blocks[index] = {"id": block.get("id", ""), "name": block.get("name", ""), "json": ""}
                    yield Chunk("progress")
            elif kind == "content_block_delta":
                delta = event.get("delta") or {}
                if delta.get("type") == "text_delta" and delta.get("text"):
                    yield Chunk("text", text=delta["text"])
                else:  # input_json_delta, thinking_delta, ...
                    if delta.get("type") == "input_json_delta":
                        slot = blocks.get(int(event.get("index", 0)))
                        if slot is not None:
                            slot["json"] += delta.get("partial_json") or ""
                    yield Chunk("progress")
            elif kind == "content_block_stop":
                slot = blocks.pop(int(event.get("index", 0)), None)
                if slot is not None:
                    yield Chunk(
                        "tool_call",
                        tool_call=common_pb2.ToolCall(
                            id=slot["id"], name=slot["name"], arguments_json=slot["json"] or "{}"
                        ),
                    )
            elif kind == "message_delta":
                stop_reason = (event.get("delta") or {}).get("stop_reason")
                if stop_reason:
                    finish = _ANTHROPIC_FINISH.get(stop_reason, stop_reason)
                usage = event.get("usage") or {}
                if usage.get("output_tokens") is not None:
                    output_tokens = int(usage["output_tokens"])
                if usage.get("input_tokens"):
                    input_tokens = int(usage["input_tokens"])
            elif kind == "message_stop":
                stopped = True
                await _drain(events)
                break
        if not stopped:
            raise ProviderError(
                f"{self.name} ended the stream without message_stop",
                url=url,
                cause=httpx.RemoteProtocolError("incomplete Anthropic stream"),
            )
        yield Chunk("usage", input_tokens=input_tokens, output_tokens=output_tokens)
        yield Chunk("finish", finish_reason=finish or "stop")


def build_provider(name: str, config: ProviderConfig, *, connect_timeout_s: float = 5.0) -> Provider:
    """The adapter for a configured provider.

    Raises:
        ValueError: unknown provider type.
    """
    if config.type == "echo":
        return EchoProvider(name, config)
    if config.type == "openai":
        return OpenAIProvider(name, config, connect_timeout_s=connect_timeout_s)
    if config.type == "anthropic":
        return AnthropicProvider(name, config, connect_timeout_s=connect_timeout_s)
    raise ValueError(f"provider type {config.type!r} is not supported")
