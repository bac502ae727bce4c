"""A minimal, fast OpenAI-compatible streaming server for benchmarks.

``python -m runyard.bench.loopback --port 0`` serves
``POST /v1/chat/completions`` (``stream: true``) on 127.0.0.1 with HTTP/1.1
keep-alive and chunked Server-Sent Events: ``--chunks`` text deltas
(``--chunk-delay-ms`` apart), a finish chunk, a usage chunk and
``data: [DONE]``. A model whose name starts with ``missing`` gets the
OpenAI 404 ``model_not_found`` error instead. Any other path gets an HTML
404. It prints ``listening on <port>`` once ready.

It is written on raw asyncio streams (no framework) so that its own cost per
request stays in the tens of microseconds and the benchmark measures the
router, not the fake.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

__all__ = ["LoopbackProvider", "main"]


def _chunk(payload: bytes) -> bytes:
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


class LoopbackProvider:
    """The server: ``chunks`` deltas per answer, ``delay_s`` between them."""

    def __init__(self, chunks: int = 8, delay_s: float = 0.0):
        self.chunks = chunks
        self.delay_s = delay_s
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:``port`` (0 = any); returns the port."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                await self._answer(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()

    async def _answer(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if method != "POST" or not path.rstrip("/").endswith("/chat/completions"):
            page = b"<html><body><h1>404 Not Found</h1></body></html>"
            writer.write(
                b"HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\ncontent-length: %d\r\n\r\n%s"
                % (len(page), page)
            )
            await writer.drain()
            return
        model = str(json.loads(body or b"{}").get("model", ""))
        if model.startswith("missing"):
            error = json.dumps(
                {
                    "error": {
                        "message": f"The model `{model}` does not exist or you do not have access to it.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "model_not_found",
                    }
                }
            ).encode()
            writer.write(
                b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                % (len(error), error)
            )
            await writer.drain()
            return
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        base = {"id": "chatcmpl-loop", "object": "chat.completion.chunk", "model": model}
        for index in range(self.chunks):
            if index and self.delay_s:
                await writer.drain()
                await asyncio.sleep(self.delay_s)
            event = {**base, "choices": [{"index": 0, "delta": {"content": f"tok{index} "}}]}
            writer.write(_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
            if index == 0:
                await writer.drain()
        finish: dict[str, Any] = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        usage: dict[str, Any] = {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": self.chunks},
        }
        for event in (finish, usage):
            writer.write(_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _run(port: int, chunks: int, delay_s: float) -> None:
    provider = LoopbackProvider(chunks, delay_s)
    bound = await provider.start(port)
    print(f"listening on {bound}", flush=True)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    """Run the server until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        asyncio.run(_run(args.port, args.chunks, args.chunk_delay_ms / 1000))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
