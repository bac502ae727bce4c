"""MCP tool servers of the agents (issue 13, part 2): a tool source of the worker's tool loop.

An agent lists its Model Context Protocol servers in the configuration
(``[agents.<id>.mcp_servers.<name>]``, :class:`runyard.common.config.McpServerConfig`):
a stdio command the worker starts, or a streamable HTTP URL it connects to.
:class:`McpTools` talks to them with the official ``mcp`` SDK and offers
their tools to the agent's model next to the built-in and client tools
(``source = "mcp"`` of the tool loop's :class:`ToolSource` protocol).

Behaviour (each point is what a user of Claude Code / Codex / the OpenAI
Agents SDK would expect from an MCP host):

* **Eager start.** The worker starts (or connects to) every enabled server
  when it starts, before it takes runs, waiting at most each server's
  ``startup_timeout_ms``: the first run of an agent then pays no start-up
  (``npx`` servers take seconds), a broken server shows up in ``runyard
  status`` at once rather than at its first use, and the tool-list change
  notifications need a live connection anyway. A server not up by then is
  retried in the background; runs go without its tools until it is.
* **Names.** The model sees each tool as ``<server>__<tool>`` (the server's
  configured name, two underscores, the tool's name with characters other
  than ``A-Za-z0-9_-`` replaced by ``_``, at most 64 characters: OpenAI's
  rule for function names). The prefix keeps servers apart and can never
  clash with the built-in tools (``spawn_task``, ``task_output``), whose
  names have no double underscore.
* **Listing.** Tools are listed once per connection (every page) and
  cached; the listing is refreshed when the server announces
  ``notifications/tools/list_changed`` (on 2026-07-28 connections through a
  ``subscriptions/listen`` stream) and on every reconnect. ``allow`` /
  ``deny`` (``fnmatch`` patterns over the server's own tool names) filter
  what is offered; ``deny`` wins.
* **Calls.** Each call gets ``call_timeout_ms``; on expiry the SDK sends the
  server a cancellation and the model gets an ``is_error`` result saying so.
  A result's content blocks become text (images, audio and binary resources
  are described, not inlined); text longer than ``max_result_bytes`` (UTF-8)
  is cut at that size and a note saying so is appended: the model keeps
  what fits and learns that there was more (the call did succeed, so it is
  not an error). A server's own tool errors (``isError``), protocol errors,
  unknown tools and bad arguments come back as ``is_error`` results; nothing
  a server does fails the run.
* **Failures.** A server that cannot start, or whose connection is lost
  (a stdio process that exits, mid-call or idle), is logged with its agent
  and name, reported in ``runyard status`` (AdminService ``worker`` part)
  and ``runyard_mcp_servers{agent,server,state}``, and restarted: at once
  after a lost connection, then with exponential backoff (tenacity, 0.5 s
  doubling to 30 s, with jitter) while starting fails. A call in flight when
  the server dies gets an ``is_error`` result; a call made while the server
  restarts waits for it (at most ``startup_timeout_ms``; a server waiting
  out its backoff is tried again at once). Nothing here ever stops the worker.
* **Logs.** A stdio server's stderr is logged line by line with its name
  (its last lines also explain a failed start in the status). The values of
  the variables a server names (its keys) are masked in what it reports.
* **Cancellation.** Each server's lifetime runs inside anyio cancel scopes
  (the SDK is built on anyio): the start-up deadline is a scope lifted once
  the server is ready, and :meth:`McpServer.stop` cancels the supervisor's
  scope, so the SDK's shielded shutdown of a process runs as designed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential, wait_random

from runyard._proto.v1 import admin_pb2, common_pb2
from runyard._version import __version__
from runyard.common import metrics
from runyard.common.config import Config, McpServerConfig
from runyard.worker.tools import ToolResult

# The MCP SDK is imported where it is used, not here: it takes about 0.9 s
# of CPU and tens of MB to import, which a worker with no MCP server (the
# common case) never needs to pay at start.
if TYPE_CHECKING:
    import mcp_types as mcp_t
    from mcp import Client

__all__ = ["McpServer", "McpTools", "exposed_name", "render_result"]

log = logging.getLogger(__name__)

#: Longest tool name the model sees (OpenAI: ^[a-zA-Z0-9_-]{1,64}$).
MAX_TOOL_NAME = 64
#: Separator between the server's name and the tool's.
SEPARATOR = "__"
#: Backoff between failed starts of one server (seconds): 0.5 doubling to 30, plus jitter.
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 30.0
#: Pages of tools/list read per listing (a server that pages forever cannot hang the worker).
MAX_LIST_PAGES = 100
#: Stderr lines of a stdio server kept for the status; longest line logged.
_STDERR_KEEP = 5
_STDERR_LINE_MAX = 2_000

_STATE_ENUM = {
    "starting": admin_pb2.MCP_SERVER_STATE_STARTING,
    "ready": admin_pb2.MCP_SERVER_STATE_READY,
    "failed": admin_pb2.MCP_SERVER_STATE_FAILED,
}
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def exposed_name(server: str, tool: str, taken: Iterable[str] = ()) -> str:
    """The name the model sees for ``server``'s tool ``tool``:
    ``<server>__<tool>`` with characters outside ``A-Za-z0-9_-`` replaced by
    ``_``, at most :data:`MAX_TOOL_NAME` long; a name cut to fit, or equal to
    one in ``taken`` after the replacement, ends in ``_`` and 8 hex digits of
    the tool's real name (sha256) instead."""
    name = f"{server}{SEPARATOR}{_UNSAFE.sub('_', tool)}"
    if len(name) <= MAX_TOOL_NAME and name not in taken:
        return name
    digest = hashlib.sha256(tool.encode()).hexdigest()[:8]
    return f"{name[: MAX_TOOL_NAME - 9]}_{digest}"


def _describe_block(block: Any) -> str:
    """One content block of a tool result as text."""
    import mcp_types as mcp_t

    if isinstance(block, mcp_t.TextContent):
        return block.text
    if isinstance(block, mcp_t.ImageContent | mcp_t.AudioContent):
        kind = "image" if isinstance(block, mcp_t.ImageContent) else "audio"
        size = len(block.data) * 3 // 4
        return f"[{kind} {block.mime_type}, about {size} bytes: not shown]"
    if isinstance(block, mcp_t.ResourceLink):
        label = f" ({block.name})" if block.name else ""
        return f"[resource link {block.uri}{label}]"
    if isinstance(block, mcp_t.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, mcp_t.TextResourceContents):
            return f"[resource {resource.uri}]\n{resource.text}"
        mime = f" {resource.mime_type}" if resource.mime_type else ""
        return f"[resource {resource.uri}{mime}, about {len(resource.blob) * 3 // 4} bytes: not shown]"
    return f"[{getattr(block, 'type', type(block).__name__)} content: not shown]"


def render_result(result: mcp_t.CallToolResult, max_bytes: int) -> ToolResult:
    """A ``tools/call`` result as the model reads it.

    The content blocks, as text, one after the other (blank line between);
    with no content, the structured content as JSON. Text longer than
    ``max_bytes`` (UTF-8) is cut at a character boundary within that size and
    ``[truncated by runyard: ...]`` appended (the note is not counted).
    ``is_error`` is the server's.
    """
    parts = [_describe_block(block) for block in result.content]
    text = "\n\n".join(part for part in parts if part)
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content, ensure_ascii=False)
    data = text.encode()
    if len(data) > max_bytes:
        kept = data[:max_bytes].decode(errors="ignore")
        text = (
            f"{kept}\n[truncated by runyard: the result was {len(data)} bytes; "
            f"this server's limit (max_result_bytes) is {max_bytes}]"
        )
    return ToolResult(text, is_error=bool(result.is_error))


def _error(message: str) -> ToolResult:
    return ToolResult(json.dumps({"error": message}), is_error=True)


def _short(exc: BaseException) -> str:
    """An exception as one line for logs and the status (a task group's first inner error)."""
    from mcp.shared.exceptions import MCPError

    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return f"MCP error {exc.code}: {exc.message}"
    if isinstance(exc, TimeoutError):
        return str(exc) or "timed out"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@asynccontextmanager
async def _watched(transport: Any, on_close: Callable[[], None]) -> AsyncIterator[Any]:
    """``transport``'s streams, calling ``on_close`` once the server's side ends
    (a stdio process that exits closes its stdout): a dead server is noticed
    and restarted at once, not when the next call fails on it."""
    async with transport as (read, write):
        send, receive = anyio.create_memory_object_stream[Any](0)

        async def pump() -> None:
            try:
                async with send:
                    async for item in read:
                        await send.send(item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            finally:
                on_close()

        async with anyio.create_task_group() as group:
            group.start_soon(pump)
            try:
                yield receive, write
            finally:
                group.cancel_scope.cancel()
                receive.close()


@dataclass(slots=True)
class _Tool:
    """One offered tool: its definition for the model and its real name."""

    definition: common_pb2.ToolDefinition
    name: str


@dataclass
class McpServer:
    """One MCP server of one agent: its connection, supervised, and its tools.

    Args:
        agent_id: the agent whose configuration names it.
        name: its name there (the prefix of its tools).
        config: its settings.
        environ: where the variables it names are read (default ``os.environ``).
    """

    agent_id: str
    name: str
    config: McpServerConfig
    environ: dict[str, str] | None = None
    #: "starting", "ready" or "failed" (metrics.MCP_SERVER_STATES).
    state: str = "starting"
    since: float = field(default_factory=time.time)
    last_error: str = ""
    restarts: int = 0
    protocol_version: str = ""
    #: Exposed name -> tool, after allow/deny (kept while the server restarts).
    tools: dict[str, _Tool] = field(default_factory=dict)
    _client: Client | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    _attempted: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set by a call while the server is failed: try again now instead of after the backoff.
    _kick: asyncio.Event = field(default_factory=asyncio.Event)
    _lost: str = ""
    _changed: bool = False
    _task: asyncio.Task[None] | None = None
    _stderr: deque[str] = field(default_factory=lambda: deque(maxlen=_STDERR_KEEP))
    _errlog: Any = None
    _scope: anyio.CancelScope | None = None

    def __post_init__(self) -> None:
        self._set_state("starting")

    @property
    def label(self) -> str:
        """``agent/server`` for logs."""
        return f"{self.agent_id}/{self.name}"

    # ------------------------------------------------------------ state

    def _redact(self, text: str) -> str:
        """``text`` with the values of the variables this server names (its keys) masked."""
        env = os.environ if self.environ is None else self.environ
        for name in self.config.environment_names:
            value = env.get(name, "")
            if len(value) >= 8:  # as the log formatter: short values would mask everything
                text = text.replace(value, "***")
        return text

    def _set_state(self, state: str, error: str = "") -> None:
        if state != self.state:
            self.since = time.time()
        self.state = state
        if error:
            self.last_error = self._redact(error)
        for candidate in metrics.MCP_SERVER_STATES:
            metrics.MCP_SERVERS.labels(self.agent_id, self.name, candidate).set(
                1 if candidate == state else 0
            )
        if state == "ready":
            self._ready.set()
        else:
            self._ready.clear()

    def _mark_lost(self, why: str) -> None:
        if not self._lost:
            self._lost = why
        self._ready.clear()
        self._wake.set()

    def offered(self) -> list[common_pb2.ToolDefinition]:
        """The tools offered now: none while the server is failed."""
        if self.state == "failed":
            return []
        return [tool.definition for tool in self.tools.values()]

    # ------------------------------------------------------------ supervision

    def start(self) -> None:
        """Start supervising (a background task)."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"mcp-{self.label}")

    async def wait_attempted(self) -> None:
        """Until the first start attempt ended (ready or failed)."""
        await self._attempted.wait()

    async def stop(self) -> None:
        """Stop the server (a stdio process gets its stdin closed, then SIGTERM, then SIGKILL:
        the SDK's shutdown, at most about 5 s)."""
        if self._task is not None:
            if self._scope is not None:
                self._scope.cancel()  # an anyio cancellation: the SDK's own clean-up runs as designed
            else:
                self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._client = None

    async def _supervise(self) -> None:
        # Every wait of the server's lifetime is inside anyio cancel scopes (the SDK is built on
        # anyio): stop() cancels this scope, a start-up deadline is a scope of its own.
        with anyio.CancelScope() as self._scope:
            while True:
                async for attempt in AsyncRetrying(
                    wait=wait_exponential(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S)
                    + wait_random(0, 0.25),
                    retry=retry_if_exception_type(Exception),
                    before_sleep=self._log_retry,
                    sleep=self._backoff,
                ):
                    with attempt:
                        await self._session()
                # The connection was up and is lost: restart at once (backoff starts afresh).
                self.restarts += 1
                why = self._lost or "the connection ended"
                log.warning("MCP server %s: %s; restarting it", self.label, why)
                self._set_state("starting", why)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        error = _short(exc) if exc is not None else "failed"
        if self._stderr:
            error = f"{error} (stderr: {self._stderr[-1]})"
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning(
            "MCP server %s could not start (attempt %d): %s; retrying in %.1f s",
            self.label,
            state.attempt_number,
            error,
            wait,
        )
        self._set_state("failed", error)
        self._attempted.set()

    async def _backoff(self, seconds: float) -> None:
        """Wait ``seconds`` between failed starts, or less when a call asks for the server."""
        self._kick.clear()
        with anyio.move_on_after(seconds):
            await self._kick.wait()

    async def _session(self) -> None:
        """One connection: start / connect, handshake and first listing within
        ``startup_timeout_ms``, then serve until the connection is lost.

        Returns when a connection that was ready is lost; raises when the
        server could not get ready (``TimeoutError`` past the deadline)."""
        self._lost = ""
        self._changed = False
        self._wake.clear()
        self._stderr.clear()
        startup_ms = self.config.startup_timeout_ms
        ready = False
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + startup_ms / 1000) as deadline:
                async with AsyncExitStack() as stack:
                    client = await self._open(stack)
                    tools = await self._list(client)
                    deadline.deadline = math.inf  # ready: no deadline any more
                    ready = True
                    self._became_ready(client, tools)
                    try:
                        await self._serve(client)
                    finally:
                        self._client = None
                        self._ready.clear()
        except Exception as exc:
            if not ready:
                raise
            # The connection was up: whatever its clean-up raised (a server that vanished
            # mid-request), it is a lost connection, restarted at once, not a failed start.
            log.info("MCP server %s: closing the lost connection raised %s", self.label, _short(exc))
            self._lost = self._lost or _short(exc)
            return
        if deadline.cancelled_caught:
            raise TimeoutError(f"not ready within startup_timeout_ms ({startup_ms})")

    async def _open(self, stack: AsyncExitStack) -> Client:
        """Start the process / open the HTTP session and complete the handshake (on ``stack``)."""
        import mcp_types as mcp_t
        from mcp import Client

        transport = _watched(
            await self._transport(stack), lambda: self._mark_lost("the server closed the connection")
        )
        client = Client(
            transport,
            message_handler=self._on_message,
            client_info=mcp_t.Implementation(name="runyard", version=__version__),
            cache=None,  # our own cache: refreshed on list_changed and reconnect
        )
        try:
            await stack.enter_async_context(client)
        finally:
            if self._errlog is not None:  # the process has its copy of stderr's pipe (or never started)
                self._errlog.close()
                self._errlog = None
        return client

    def _became_ready(self, client: Client, tools: dict[str, _Tool]) -> None:
        self._client = client
        self.protocol_version = client.protocol_version
        self.tools = tools
        self._set_state("ready")
        self._attempted.set()
        log.info(
            "MCP server %s ready (%s, protocol %s): %d tool(s) offered: %s",
            self.label,
            self.config.transport,
            self.protocol_version,
            len(tools),
            ", ".join(tools) or "none",
        )

    async def _transport(self, stack: AsyncExitStack) -> Any:
        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client  # the SDK's client factory (MCP timeouts)

        config = self.config
        env = os.environ if self.environ is None else self.environ
        if config.transport == "stdio":
            errlog = self._stderr_pipe(stack)
            params = StdioServerParameters(
                command=config.command,
                args=list(config.args),
                env={**config.env, **{name: env[name] for name in config.pass_env if name in env}},
                cwd=config.cwd or None,
            )
            return stdio_client(params, errlog=errlog)
        headers = dict(config.headers)
        headers.update({header: env.get(var, "") for header, var in config.env_headers.items()})
        if config.bearer_token_env:
            headers["Authorization"] = f"Bearer {env.get(config.bearer_token_env, '')}"
        http = await stack.enter_async_context(create_mcp_http_client(headers=headers))
        return streamable_http_client(config.url, http_client=http)

    def _stderr_pipe(self, stack: AsyncExitStack) -> Any:
        """A pipe for the process's stderr, logged line by line with the server's name.

        Our copy of the write end is closed when the stack closes (and by
        :meth:`_connect` as soon as the process has its own), so the reader
        sees the end of the pipe when the process exits."""
        read_fd, write_fd = os.pipe()
        writer = os.fdopen(write_fd, "w")
        reader = os.fdopen(read_fd, "rb")
        task = asyncio.create_task(self._log_stderr(reader), name=f"mcp-stderr-{self.label}")
        stack.push_async_callback(self._end_stderr, task)
        stack.callback(writer.close)
        self._errlog = writer
        return writer

    async def _end_stderr(self, task: asyncio.Task[None]) -> None:
        """Let the stderr logger read what the exited process left (at most 1 s), then stop it."""
        with anyio.move_on_after(1.0, shield=True), contextlib.suppress(Exception):
            await task
        task.cancel()

    async def _log_stderr(self, reader: Any) -> None:
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), reader)
        try:
            while True:
                try:
                    raw = await stream.readline()
                except ValueError:  # a line past the limit
                    raw = await stream.read(1 << 16)
                if not raw:
                    return
                line = self._redact(raw.decode(errors="replace").rstrip()[:_STDERR_LINE_MAX])
                if line:
                    self._stderr.append(line)
                    log.info("MCP server %s stderr: %s", self.label, line)
        finally:
            transport.close()

    async def _list(self, client: Client) -> dict[str, _Tool]:
        """Every tool of the server (all pages), filtered and named for the model."""
        found: list[mcp_t.Tool] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            page = await client.list_tools(cursor=cursor)
            found.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        allow, deny = self.config.allow, self.config.deny
        tools: dict[str, _Tool] = {}
        for tool in found:
            if allow and not any(fnmatch.fnmatchcase(tool.name, p) for p in allow):
                continue
            if any(fnmatch.fnmatchcase(tool.name, p) for p in deny):
                continue
            exposed = exposed_name(self.name, tool.name, tools)
            definition = common_pb2.ToolDefinition(
                name=exposed,
                description=tool.description or tool.title or "",
                parameters_json_schema=json.dumps(tool.input_schema or {"type": "object"}),
            )
            tools[exposed] = _Tool(definition, tool.name)
        return tools

    async def _on_message(self, message: Any) -> None:
        import mcp_types as mcp_t

        if isinstance(message, mcp_t.ToolListChangedNotification):
            self._changed = True
            self._wake.set()
        elif isinstance(message, Exception):
            log.warning("MCP server %s: transport error: %s", self.label, _short(message))

    async def _listen(self, client: Client) -> None:
        """2026-07-28 connections announce tool-list changes on a ``subscriptions/listen`` stream."""
        import mcp_types as mcp_t
        from mcp.client.subscriptions import ListenNotSupportedError
        from mcp.shared.exceptions import MCPError

        try:
            async with client.listen(tools_list_changed=True) as subscription:
                async for _ in subscription:
                    pass  # each event also reaches _on_message as ToolListChangedNotification
        except ListenNotSupportedError:
            return
        except MCPError as exc:
            if exc.code == mcp_t.CONNECTION_CLOSED:
                self._mark_lost("the server closed the connection")
            else:
                log.info("MCP server %s does not announce tool changes: %s", self.label, _short(exc))
        except Exception as exc:  # noqa: BLE001 - SubscriptionLost and transport errors: the connection is gone
            self._mark_lost(f"the change stream was lost ({_short(exc)})")

    async def _serve(self, client: Client) -> None:
        """Until the connection is lost: refresh the listing when it changes."""
        capabilities = client.server_capabilities
        async with anyio.create_task_group() as group:
            if capabilities.tools is not None and capabilities.tools.list_changed:
                group.start_soon(self._listen, client)
            try:
                while not self._lost:
                    await self._wake.wait()
                    self._wake.clear()
                    if self._lost or not self._changed:
                        continue
                    self._changed = False
                    try:
                        with anyio.fail_after(self.config.startup_timeout_ms / 1000):
                            self.tools = await self._list(client)
                    except Exception as exc:  # noqa: BLE001 - the connection is not trustworthy any more
                        self._mark_lost(f"listing its tools failed ({_short(exc)})")
                        return
                    log.info(
                        "MCP server %s changed its tools: %d offered: %s",
                        self.label,
                        len(self.tools),
                        ", ".join(self.tools) or "none",
                    )
            finally:
                group.cancel_scope.cancel()

    # ------------------------------------------------------------ calls

    async def call(self, exposed: str, arguments: dict[str, Any]) -> ToolResult:
        """Call the tool the model knows as ``exposed``; never raises (errors are ``is_error`` results)."""
        import mcp_types as mcp_t
        from mcp.shared.exceptions import MCPError

        tool = self.tools.get(exposed)
        if tool is None:
            return _error(f"MCP server {self.name!r} offers no tool {exposed!r}")
        if not self._ready.is_set():
            # Restarting after a crash or a lost connection: wait for it, within reason.
            self._kick.set()
            try:
                async with asyncio.timeout(self.config.startup_timeout_ms / 1000):
                    await self._ready.wait()
            except TimeoutError:
                why = f": {self.last_error}" if self.last_error else ""
                return _error(f"MCP server {self.name!r} is unavailable ({self.state}{why}); try again later")
        client = self._client
        tool = self.tools.get(exposed)
        if client is None or tool is None:
            return _error(f"MCP server {self.name!r} is unavailable; try again later")
        timeout_s = self.config.call_timeout_ms / 1000
        try:
            # The SDK's read timeout sends the server a cancellation; ours only backs it up.
            async with asyncio.timeout(timeout_s + 5):
                result = await client.call_tool(tool.name, arguments, read_timeout_seconds=timeout_s)
        except MCPError as exc:
            if exc.code == mcp_t.REQUEST_TIMEOUT:
                return _error(
                    f"the tool {tool.name!r} did not answer within {self.config.call_timeout_ms} ms"
                )
            if exc.code == mcp_t.CONNECTION_CLOSED:
                self._mark_lost(f"the connection closed during a call of {tool.name!r}")
                return _error(
                    f"MCP server {self.name!r} closed the connection during the call (it may have crashed); "
                    "it is being restarted"
                )
            return _error(f"MCP server {self.name!r} answered error {exc.code}: {exc.message}")
        except TimeoutError:
            self._mark_lost(f"a call of {tool.name!r} hung past its timeout")
            return _error(f"the tool {tool.name!r} did not answer within {self.config.call_timeout_ms} ms")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken result or transport: the model hears of it
            log.warning("MCP server %s: call of %s failed: %s", self.label, tool.name, _short(exc))
            if not isinstance(exc, ValueError):  # pydantic's ValidationError: the connection is fine
                self._mark_lost(f"a call of {tool.name!r} failed ({_short(exc)})")
            return _error(f"calling {tool.name!r} on MCP server {self.name!r} failed: {_short(exc)}")
        return render_result(result, self.config.max_result_bytes)

    def status(self) -> admin_pb2.McpServerStatus:
        """This server's entry of the worker's status."""
        entry = admin_pb2.McpServerStatus(
            agent_id=self.agent_id,
            name=self.name,
            transport=self.config.transport,
            state=_STATE_ENUM[self.state],
            tools=len(self.offered()),
            last_error=self.last_error,
            restarts=self.restarts,
            protocol_version=self.protocol_version,
        )
        entry.since.FromNanoseconds(int(self.since * 1e9))
        return entry


class McpTools:
    """The agents' MCP servers as a tool source of the tool loop (``source = "mcp"``).

    Also a status source of the worker's AdminService (:meth:`fill`).

    Args:
        config: the worker's configuration; every enabled server of every
            agent is run (``agents.<id>.mcp_servers``).
        environ: where the variables the servers name are read (default
            ``os.environ``; :func:`runyard.common.config.mcp_environment_problems`
            checked them at start-up).
    """

    source = "mcp"

    def __init__(self, config: Config, environ: dict[str, str] | None = None):
        self.config = config
        self.servers: dict[tuple[str, str], McpServer] = {
            (agent_id, name): McpServer(agent_id, name, server, environ)
            for agent_id, agent in sorted(config.agents.items())
            for name, server in sorted(agent.mcp_servers.items())
            if server.enabled
        }

    def _agent_servers(self, agent_id: str) -> list[McpServer]:
        agent = agent_id or self.config.gateway.default_agent
        return [server for (owner, _), server in self.servers.items() if owner == agent]

    async def start(self) -> None:
        """Start every server; return once each is ready or failed its first
        attempt (at most the longest ``startup_timeout_ms``, plus the few
        seconds a stuck process takes to stop). Failed ones keep being
        retried in the background."""
        for server in self.servers.values():
            server.start()
        if not self.servers:
            return
        # Plus the SDK's shutdown of a process that ignored the deadline (stdin closed, SIGTERM, SIGKILL).
        bound = max(s.config.startup_timeout_ms for s in self.servers.values()) / 1000 + 6.0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                await asyncio.gather(*(s.wait_attempted() for s in self.servers.values()))

    async def aclose(self) -> None:
        """Stop every server."""
        await asyncio.gather(*(server.stop() for server in self.servers.values()))

    def offered(self, payload: common_pb2.RunPayload) -> list[common_pb2.ToolDefinition]:
        """The MCP tools of ``payload``'s agent (its servers that are not failed)."""
        return [tool for server in self._agent_servers(payload.agent_id) for tool in server.offered()]

    async def call(self, payload: common_pb2.RunPayload, call: common_pb2.ToolCall) -> ToolResult:
        """Run one tool call of ``payload``'s run on the server that offers it.

        Returns an ``is_error`` result (never raises) for bad arguments, an
        unknown tool, a timeout, a crashed or unavailable server, or the
        server's own error."""
        server = next((s for s in self._agent_servers(payload.agent_id) if call.name in s.tools), None)
        if server is None:
            return _error(f"unknown tool {call.name!r}")
        try:
            arguments = json.loads(call.arguments_json or "{}")
        except json.JSONDecodeError as exc:
            return _error(f"arguments are not valid JSON: {exc}")
        if not isinstance(arguments, dict):
            return _error("arguments must be a JSON object")
        return await server.call(call.name, arguments)

    # ------------------------------------------------------------ AdminService (StatusSource)

    async def fill(self, response: admin_pb2.GetStatusResponse) -> None:
        """The worker's part of ``runyard status``: one entry per MCP server."""
        response.worker.SetInParent()
        for server in self.servers.values():
            response.worker.mcp_servers.append(server.status())

    async def run(self) -> None:
        """No background work (the servers run from :meth:`start`)."""
