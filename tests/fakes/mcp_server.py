"""A real MCP tool server for the tests, written with the official SDK's
high-level server (``MCPServer``: mcp 2's name for FastMCP).

    python tests/fakes/mcp_server.py               # stdio (the worker starts it)
    python tests/fakes/mcp_server.py --http PORT   # streamable HTTP on 127.0.0.1:PORT/mcp

Tools: ``add``, ``echo``, ``whoami`` (the ``FAKE_MCP_TOKEN`` variable, or the
HTTP ``Authorization`` header), ``slow`` (sleeps), ``fail`` (a tool error),
``big`` (a long text), ``crash`` (the process dies mid-call, unless the file
named by ``FAKE_MCP_CRASH_ONCE`` exists; the first crash creates it), and
``grow`` (adds the tool ``fresh`` and announces that the tool list changed).
Every call is appended to the file named by ``FAKE_MCP_LOG`` (if set), one
``name pid`` line each, so tests see which process served it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from pathlib import Path

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server = MCPServer("runyard-fake", version="1.0")


def _record(name: str) -> None:
    path = os.environ.get("FAKE_MCP_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(f"{name} {os.getpid()}\n")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two whole numbers."""
    _record("add")
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Say `text` back."""
    _record("echo")
    return text


@server.tool()
def whoami(ctx: Context) -> str:
    """The caller's credential as this server sees it."""
    _record("whoami")
    headers = ctx.headers or {}
    return headers.get("authorization") or os.environ.get("FAKE_MCP_TOKEN", "(none)")


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep `seconds`, then answer."""
    _record("slow")
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def fail(message: str) -> str:
    """Fail with `message`."""
    _record("fail")
    raise ToolError(message)


@server.tool()
def big(size: int) -> str:
    """A text of `size` characters ("abc" repeated)."""
    _record("big")
    return ("abc" * (size // 3 + 1))[:size]


@server.tool()
def crash() -> str:
    """Kill this server in the middle of the call."""
    _record("crash")
    marker = os.environ.get("FAKE_MCP_CRASH_ONCE")
    if marker and Path(marker).exists():
        return "survived"
    if marker:
        Path(marker).touch()
    sys.stderr.write("fake MCP server: crashing on purpose\n")
    sys.stderr.flush()
    os._exit(17)


@server.tool()
async def grow(ctx: Context) -> str:
    """Add the tool `fresh` and tell the client that the tool list changed."""
    _record("grow")
    if server._tool_manager.get_tool("fresh") is None:
        server.add_tool(lambda: "fresh!", name="fresh", description="A tool added at run time.")
    await ctx.notify_tools_changed()  # 2026-07-28 clients (subscriptions/listen)
    with contextlib.suppress(Exception):  # a 2026-07-28 connection has no such notification
        await ctx.session.send_tool_list_changed()  # handshake-era clients
    return "grown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, default=0, help="serve streamable HTTP on this port")
    args = parser.parse_args()
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run()


if __name__ == "__main__":
    main()
