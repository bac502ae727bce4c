"""A scriptable Anthropic Messages API server on loopback.

It answers ``POST /v1/messages`` with ``stream: true`` the way the real API
does (Server-Sent Events ``message_start``, ``content_block_start``,
``content_block_delta`` with ``text_delta``/``input_json_delta``,
``content_block_stop``, ``message_delta``, ``message_stop``, with ``ping``
in between), records every request, and injects faults: error statuses with
Anthropic-shaped bodies, ``error`` events mid-stream, stalls and cut
connections.

    server = FakeAnthropic().start()
    overloaded = anthropic_error("overloaded_error", "Overloaded")
    server.script("claude-x", AnthropicReply(status=529, body=overloaded))
    ... base_url = server.url  # http://127.0.0.1:PORT/v1
    server.stop()
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

__all__ = ["AnthropicReply", "FakeAnthropic", "anthropic_error"]


def anthropic_error(error_type: str, message: str) -> str:
    """An error body in the documented shape (https://docs.claude.com/en/api/errors)."""
    return json.dumps(
        {"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_fake"}
    )


@dataclass
class AnthropicReply:
    """One scripted answer.

    status: HTTP status; >= 400 sends ``body`` as is.
    chunks: text deltas (None = "Hello from <model>.").
    tool_uses: ``{"id", "name", "input"}`` blocks streamed after the text.
    stop_reason: ``message_delta.delta.stop_reason``.
    first_token_delay_s / delay_between_s: pauses (TTFT stall, pacing; delay_between_s
    also paces the two halves of each tool_use's input_json_delta).
    stall_after / cut_after: hang / close the connection after N text chunks.
    stream_error: ``{"type", "message"}`` sent as an ``error`` event after the chunks.
    sse_multiline / sse_crlf: each event's JSON over several ``data:`` lines / CRLF line ends,
        with a ``:`` comment before each event.
    """

    status: int = 200
    chunks: list[str] | None = None
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    tool_uses: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str = "end_turn"
    usage: tuple[int, int] = (12, 6)
    first_token_delay_s: float = 0.0
    delay_between_s: float = 0.0
    stall_after: int | None = None
    cut_after: int | None = None
    stream_error: dict[str, str] | None = None
    sse_multiline: bool = False
    sse_crlf: bool = False


class FakeAnthropic:
    """The server; ``requests`` lists every decoded body (with ``_path`` and ``_headers``)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._scripts: dict[str, collections.deque[AnthropicReply]] = collections.defaultdict(
            collections.deque
        )
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.closed = threading.Event()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, model: str, *replies: AnthropicReply) -> None:
        """Queue replies for ``model`` (each used once, in order; then the default answer)."""
        with self._lock:
            self._scripts[model].extend(replies)

    def _next(self, model: str) -> AnthropicReply:
        with self._lock:
            queue = self._scripts.get(model)
            return queue.popleft() if queue else AnthropicReply()

    def start(self) -> FakeAnthropic:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                return

            def handle(self) -> None:
                # A client that drops a kept-alive connection (after an error
                # event, say) is normal here, not a server error to print.
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):
                    pass

            def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            reply: AnthropicReply = AnthropicReply()

            def _event(self, name: str, data: dict[str, Any]) -> None:
                reply = self.reply
                end = "\r\n" if reply.sse_crlf else "\n"
                lines = [f"event: {name}"]
                if reply.sse_multiline:
                    lines.insert(0, ": spread over several data lines")
                    lines += [f"data: {line}" for line in json.dumps(data, indent=1).split("\n")]
                else:
                    lines.append(f"data: {json.dumps(data)}")
                payload = (end.join(lines) + end + end).encode()
                self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
                self.wfile.flush()

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    request = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    request = {"_raw": raw.decode("utf-8", "replace")}
                request["_path"] = self.path
                request["_headers"] = {k.lower(): v for k, v in self.headers.items()}
                with fake._lock:
                    fake.requests.append(request)
                if self.path.rstrip("/") != "/v1/messages":
                    body = anthropic_error("not_found_error", "Not Found").encode()
                    self._send(404, body, "application/json", {})
                    return
                model = str(request.get("model", ""))
                reply = fake._next(model)
                if reply.status >= 400:
                    kind = "application/json" if reply.body.lstrip().startswith("{") else "text/html"
                    self._send(reply.status, reply.body.encode(), kind, reply.headers)
                    return
                try:
                    self._stream(model, reply)
                except (BrokenPipeError, ConnectionResetError):
                    return

            def _stream(self, model: str, reply: AnthropicReply) -> None:
                self.reply = reply
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                prompt, completion = reply.usage
                self._event(
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {
                            "id": "msg_fake",
                            "type": "message",
                            "role": "assistant",
                            "model": model,
                            "content": [],
                            "stop_reason": None,
                            "usage": {"input_tokens": prompt, "output_tokens": 1},
                        },
                    },
                )
                if reply.first_token_delay_s:
                    time.sleep(reply.first_token_delay_s)
                chunks = reply.chunks if reply.chunks is not None else ["Hello ", "from ", f"{model}."]
                index = 0
                if chunks:
                    self._event(
                        "content_block_start",
                        {
                            "type": "content_block_start",
                            "index": 0,
                            "content_block": {"type": "text", "text": ""},
                        },
                    )
                    self._event("ping", {"type": "ping"})
                    for position, text in enumerate(chunks):
                        if reply.stall_after is not None and position >= reply.stall_after:
                            self._hang()
                            return
                        if reply.cut_after is not None and position >= reply.cut_after:
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        if position and reply.delay_between_s:
                            time.sleep(reply.delay_between_s)
                        self._event(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": 0,
                                "delta": {"type": "text_delta", "text": text},
                            },
                        )
                    self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
                    index = 1
                if reply.stall_after is not None and reply.stall_after >= len(chunks):
                    self._hang()
                    return
                if reply.cut_after is not None and reply.cut_after >= len(chunks):
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.stream_error is not None:
                    self._event("error", {"type": "error", "error": reply.stream_error})
                    self.wfile.write(b"0\r\n\r\n")
                    return
                for tool in reply.tool_uses:
                    self._event(
                        "content_block_start",
                        {
                            "type": "content_block_start",
                            "index": index,
                            "content_block": {
                                "type": "tool_use",
                                "id": tool["id"],
                                "name": tool["name"],
                                "input": {},
                            },
                        },
                    )
                    encoded = json.dumps(tool.get("input", {}))
                    half = len(encoded) // 2
                    for part in (encoded[:half], encoded[half:]):
                        if reply.delay_between_s:
                            time.sleep(reply.delay_between_s)
                        self._event(
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": part},
                            },
                        )
                    self._event("content_block_stop", {"type": "content_block_stop", "index": index})
                    index += 1
                self._event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
                        "usage": {"output_tokens": completion},
                    },
                )
                self._event("message_stop", {"type": "message_stop"})
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def _hang(self) -> None:
                while not fake.closed.is_set():
                    try:
                        self.connection.settimeout(0.2)
                        if self.connection.recv(1) == b"":
                            return
                    except TimeoutError:
                        continue
                    except OSError:
                        return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-anthropic",
            daemon=True,
        ).start()
        return self

    def stop(self) -> None:
        self.closed.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
