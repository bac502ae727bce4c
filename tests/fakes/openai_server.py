"""A scriptable OpenAI-compatible chat completions server on loopback.

It streams Server-Sent Events like the real API, records every request it
receives, and injects faults on demand: error statuses with any body and
headers, stalls before the first token or mid-stream, cut connections, every
legal variant of the event-stream format (multi-line ``data``, comments,
CRLF, keep-alives, events split across writes) and a context window per
model (prompts longer than it get OpenAI's ``context_length_exceeded``).

    server = FakeOpenAI().start()
    server.script("gpt-x", Reply(status=404, body='{"error": {"code": "model_not_found"}}'))
    ... base_url = server.url  # http://127.0.0.1:PORT/v1
    server.stop()

Models without a script answer ``Reply()`` (text "Hello from <model>.").
"""

from __future__ import annotations

import collections
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeOpenAI", "Reply", "provider_config"]


@dataclass
class Reply:
    """One scripted answer.

    status: HTTP status; anything >= 400 (or any reply with a ``body``) sends
        ``body`` (JSON or any text) as is instead of an event stream.
    chunks: text deltas streamed on success (None = "Hello from <model>.").
    headers: extra response headers (e.g. ``{"retry-after": "1"}``).
    delay_before_s: wait before sending the status line (stall before headers).
    first_token_delay_s: after headers, wait before the first chunk (TTFT stall).
    delay_between_s: pause between chunks.
    stall_after: hang forever (until the client leaves) after N chunks.
    cut_after: close the connection abruptly after N chunks.
    tool_calls: OpenAI tool_call dicts streamed after the text.
    usage: (prompt_tokens, completion_tokens) in the last chunk.
    stream_error: a JSON object sent as an ``error`` event mid-stream (after the chunks).
    sse_multiline: each event's JSON is spread over several ``data:`` lines.
    sse_comments: a ``: comment`` line before each event, and ``event:``/``id:`` fields.
    sse_crlf: CRLF line ends instead of LF.
    sse_split: every event is written in 3-byte pieces, each flushed (lines split mid-way).
    keepalive_every_s: while waiting for the first token, a ``: keep-alive``
        comment and an empty event this often (not model output).
    """

    status: int = 200
    chunks: list[str] | None = None
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_before_s: float = 0.0
    first_token_delay_s: float = 0.0
    delay_between_s: float = 0.0
    stall_after: int | None = None
    cut_after: int | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: tuple[int, int] = (10, 5)
    stream_error: dict[str, Any] | None = None
    sse_multiline: bool = False
    sse_comments: bool = False
    sse_crlf: bool = False
    sse_split: bool = False
    keepalive_every_s: float = 0.0


class FakeOpenAI:
    """The server; ``requests`` lists every decoded request body (with ``_path``, ``_headers``)."""

    def __init__(self, *, poll_interval_s: float = 0.5) -> None:
        #: How often serve_forever checks for shutdown (stop() waits up to this long).
        self.poll_interval_s = poll_interval_s
        self.requests: list[dict[str, Any]] = []
        self._scripts: dict[str, collections.deque[Reply]] = collections.defaultdict(collections.deque)
        self._defaults: dict[str, Reply] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.closed = threading.Event()
        #: Set when a client disconnected while we were streaming (cancellation);
        #: ``client_gone_at`` is the time.monotonic() when it was noticed.
        self.client_gone = threading.Event()
        self.client_gone_at: float | None = None
        #: model -> context window in characters of message content (see context_window()).
        self._windows: dict[str, int] = {}

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, model: str, *replies: Reply) -> None:
        """Queue replies for ``model`` (each used once, in order)."""
        with self._lock:
            self._scripts[model].extend(replies)

    def default(self, model: str, reply: Reply) -> None:
        """The reply for ``model`` once its script is used up."""
        with self._lock:
            self._defaults[model] = reply

    def context_window(self, model: str, chars: int) -> None:
        """``model`` answers HTTP 400 ``context_length_exceeded`` (OpenAI's
        body) to any request whose messages' content is longer than ``chars``
        characters in total, before any script."""
        with self._lock:
            self._windows[model] = chars

    def requests_for(self, model: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r.get("model") == model]

    def _gone(self) -> None:
        if self.client_gone_at is None:
            self.client_gone_at = time.monotonic()
        self.client_gone.set()

    def _next(self, model: str, request: dict[str, Any]) -> Reply:
        with self._lock:
            window = self._windows.get(model)
            if window is not None:
                size = sum(len(str(m.get("content") or "")) for m in request.get("messages") or ())
                if size > window:
                    return Reply(
                        status=400,
                        body=json.dumps(
                            {
                                "error": {
                                    "message": f"This model's maximum context length is {window} characters. "
                                    f"However, your messages resulted in {size} characters. "
                                    "Please reduce the length of the messages.",
                                    "type": "invalid_request_error",
                                    "param": "messages",
                                    "code": "context_length_exceeded",
                                }
                            }
                        ),
                    )
            queue = self._scripts.get(model)
            if queue:
                return queue.popleft()
            return self._defaults.get(model, Reply())

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                return

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                if self.path.rstrip("/").endswith("/models"):
                    body = json.dumps(
                        {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}
                    ).encode()
                    self._send(200, body, "application/json")
                else:
                    self._send(404, b"<html><body>Not Found</body></html>", "text/html")

            def _send(
                self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _write(self, payload: bytes, split: bool = False) -> None:
                pieces = [payload[i : i + 3] for i in range(0, len(payload), 3)] if split else [payload]
                for piece in pieces:
                    self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    self.wfile.flush()

            def _event(self, data: str, reply: Reply | None = None) -> None:
                reply = reply or Reply()
                end = "\r\n" if reply.sse_crlf else "\n"
                lines: list[str] = []
                if reply.sse_comments:
                    lines += [": this is a comment", "event: message", "id: 42"]
                if reply.sse_multiline and data.startswith("{"):
                    # json.dumps(indent=1) puts every member on its own line: one data field each.
                    lines += [f"data: {line}" for line in json.dumps(json.loads(data), indent=1).split("\n")]
                else:
                    lines.append(f"data: {data}")
                payload = (end.join(lines) + end + end).encode()
                self._write(payload, reply.sse_split)

            def _keepalive(self, reply: Reply) -> None:
                end = "\r\n" if reply.sse_crlf else "\n"
                self._write(f": keep-alive{end}{end}data:{end}{end}".encode())

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    request = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    request = {"_raw": raw.decode("utf-8", "replace")}
                request["_path"] = self.path
                request["_headers"] = {k.lower(): v for k, v in self.headers.items()}
                request["_time"] = time.monotonic()
                with fake._lock:
                    fake.requests.append(request)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b"<html><body><h1>404 Not Found</h1></body></html>", "text/html")
                    return
                model = str(request.get("model", ""))
                reply = fake._next(model, request)
                if reply.delay_before_s:
                    time.sleep(reply.delay_before_s)
                if reply.status >= 400 or reply.body:
                    # An error, or a non-stream answer such as a web page at a wrong base URL.
                    headers = {k.lower(): v for k, v in reply.headers.items()}
                    default_type = "application/json" if reply.body.lstrip().startswith("{") else "text/html"
                    content_type = headers.pop("content-type", default_type)
                    self._send(reply.status, reply.body.encode(), content_type, headers)
                    return
                try:
                    self._stream(model, reply)
                except (BrokenPipeError, ConnectionResetError):
                    fake._gone()

            def _stream(self, model: str, reply: Reply) -> None:
                self.send_response(reply.status)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.flush()
                if reply.first_token_delay_s:
                    until = time.monotonic() + reply.first_token_delay_s
                    while reply.keepalive_every_s and time.monotonic() + reply.keepalive_every_s < until:
                        time.sleep(reply.keepalive_every_s)
                        self._keepalive(reply)
                    time.sleep(max(until - time.monotonic(), 0))
                chunks = reply.chunks if reply.chunks is not None else ["Hello ", "from ", f"{model}."]
                base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model}
                for index, text in enumerate(chunks):
                    if reply.stall_after is not None and index >= reply.stall_after:
                        self._hang()
                        return
                    if reply.cut_after is not None and index >= reply.cut_after:
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    if index and reply.delay_between_s:
                        time.sleep(reply.delay_between_s)
                    self._event(
                        json.dumps({**base, "choices": [{"index": 0, "delta": {"content": text}}]}), reply
                    )
                if reply.stall_after is not None and reply.stall_after >= len(chunks):
                    self._hang()
                    return
                if reply.cut_after is not None and reply.cut_after >= len(chunks):
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.stream_error is not None:
                    self._event(json.dumps({"error": reply.stream_error}), reply)
                    self.wfile.write(b"0\r\n\r\n")
                    return
                for index, call in enumerate(reply.tool_calls):
                    self._event(
                        json.dumps(
                            {
                                **base,
                                "choices": [
                                    {"index": 0, "delta": {"tool_calls": [{"index": index, **call}]}}
                                ],
                            }
                        ),
                        reply,
                    )
                finish = "tool_calls" if reply.tool_calls else "stop"
                self._event(
                    json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}),
                    reply,
                )
                prompt, completion = reply.usage
                self._event(
                    json.dumps(
                        {
                            **base,
                            "choices": [],
                            "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
                        }
                    ),
                    reply,
                )
                self._event("[DONE]", reply)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def _hang(self) -> None:
                # Keep the connection open without sending until the client goes away.
                while not fake.closed.is_set():
                    try:
                        self.connection.settimeout(0.01)
                        if self.connection.recv(1) == b"":
                            fake._gone()
                            return
                    except TimeoutError:
                        continue
                    except OSError:
                        fake._gone()
                        return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": self.poll_interval_s},
            name="fake-openai",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.closed.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def provider_config(
    fake: FakeOpenAI, *, model: str = "model-a", fallbacks: list[str] | None = None, provider: str = "fake"
) -> dict[str, Any]:
    """Stack config pointing the default agent at ``fake`` (provider ``fake``)."""
    return {
        "providers": {provider: {"type": "openai", "base_url": fake.url}},
        "agents": {
            "default": {
                "model": f"{provider}/{model}",
                "fallbacks": fallbacks or [],
                "system_prompt": "Be brief.",
            }
        },
    }
