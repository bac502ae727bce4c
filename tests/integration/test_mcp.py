"""MCP servers of agents (issue 13 part 2) against a real MCP server written with
the official SDK (tests/fakes/mcp_server.py, ``MCPServer``: mcp 2's FastMCP).

* :class:`McpTools` directly: a stdio server it starts and an HTTP server the
  test starts; calls reach the server and results come back; allow/deny; the
  per-call timeout; the result size limit; tool-list changes; a server that
  crashes mid-call (or while idle) is restarted and the next call works; a
  server that cannot start is reported and the others work.
* Through a small tool loop (:func:`run_tools`): the tool sources' names route
  calls back to the source that offered them, next to a built-in tool.
* The real worker process: a server that cannot start shows in ``runyard
  status`` and the metrics while the worker stays SERVING.
* End to end (needs the client-tools branch's shared tool loop): the fake
  model's call reaches the stdio server, the result reaches the model; a crash
  mid-call is an ``is_error`` result and the session stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from runyard._proto.v1 import admin_pb2, common_pb2
from runyard.cli.status_commands import collect_status, render_table
from runyard.common.config import Config
from runyard.worker.mcp import McpTools
from runyard.worker.tools import BUILTIN_TOOLS, ToolResult
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.stack import INTERNAL_SECRET, Stack, free_port

pytestmark = pytest.mark.timeout(90)

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "mcp_server.py"
AGENT = "a"


def stdio(**settings: Any) -> dict[str, Any]:
    """A stdio server entry running the fake server."""
    return {"command": sys.executable, "args": [str(FAKE)], **settings}


def make_config(servers: dict[str, Any], **agents: dict[str, Any]) -> Config:
    return Config.model_validate(
        {
            "gateway": {"default_agent": AGENT},
            "agents": {AGENT: {"model": "echo/echo", "mcp_servers": servers}, **agents},
        }
    )


@pytest.fixture
async def mcp_tools() -> AsyncIterator[Callable[..., McpTools]]:
    """``make(servers, environ=None) -> McpTools`` (not started); all are closed at teardown."""
    made: list[McpTools] = []

    def make(servers: dict[str, Any], environ: dict[str, str] | None = None) -> McpTools:
        tools = McpTools(make_config(servers), environ)
        made.append(tools)
        return tools

    yield make
    for tools in made:
        await tools.aclose()


async def call(tools: McpTools, name: str, arguments: Any = None, *, agent: str = AGENT) -> ToolResult:
    payload = common_pb2.RunPayload(agent_id=agent)
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
    return await tools.call(payload, common_pb2.ToolCall(id="call-1", name=name, arguments_json=raw))


def offered(tools: McpTools, agent: str = AGENT) -> dict[str, common_pb2.ToolDefinition]:
    return {tool.name: tool for tool in tools.offered(common_pb2.RunPayload(agent_id=agent))}


async def status(tools: McpTools) -> dict[str, admin_pb2.McpServerStatus]:
    response = admin_pb2.GetStatusResponse()
    await tools.fill(response)
    return {entry.name: entry for entry in response.worker.mcp_servers}


async def eventually(check: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


def served_by(log: Path) -> list[tuple[str, int]]:
    """``(tool, pid)`` of every call the fake servers recorded."""
    if not log.exists():
        return []
    return [(name, int(pid)) for name, pid in (line.split() for line in log.read_text().splitlines())]


# ---------------------------------------------------------------- McpTools, directly


async def test_a_stdio_server_answers_calls_with_allow_deny_limits_and_list_changes(mcp_tools):
    tools = mcp_tools(
        {
            "fake": stdio(deny=["crash", "slo*"], pass_env=["FAKE_MCP_TOKEN"], max_result_bytes=300),
            "only": stdio(allow=["ech*"]),
        },
        environ={"FAKE_MCP_TOKEN": "tok-123"},
    )
    await tools.start()

    tools_now = offered(tools)
    assert sorted(tools_now) == [
        "fake__add",
        "fake__big",
        "fake__echo",
        "fake__fail",
        "fake__grow",
        "fake__whoami",
        "only__echo",
    ]
    add = tools_now["fake__add"]
    assert add.description == "Add two whole numbers."
    assert json.loads(add.parameters_json_schema)["required"] == ["a", "b"]
    assert offered(tools, "someone-else") == {}  # servers belong to their agent

    assert await call(tools, "fake__add", {"a": 2, "b": 3}) == ToolResult("5", is_error=False)
    assert await call(tools, "only__echo", {"text": "hi"}) == ToolResult("hi", is_error=False)
    # The process got the worker's variable named in pass_env.
    assert (await call(tools, "fake__whoami")).content == "tok-123"
    # The server's own error, bad arguments, unknown and denied tools: is_error results.
    failed = await call(tools, "fake__fail", {"message": "disk on fire"})
    assert failed.is_error and "disk on fire" in failed.content
    assert (await call(tools, "fake__add", {"a": "two"})).is_error
    assert (await call(tools, "fake__add", "{not json")).is_error
    denied = await call(tools, "fake__crash")
    assert denied.is_error and "unknown tool" in denied.content
    # A long result is cut at max_result_bytes, with a note; the call itself succeeded.
    big = await call(tools, "fake__big", {"size": 5000})
    assert not big.is_error and big.content.startswith("abcabc")
    assert "[truncated by runyard: the result was 5000 bytes" in big.content
    assert len(big.content.split("\n[truncated")[0]) == 300

    # The server adds a tool and announces it: the listing is refreshed.
    assert (await call(tools, "fake__grow")).content == "grown"
    assert await eventually(lambda: asyncio.sleep(0, "fake__fresh" in offered(tools)))
    assert await call(tools, "fake__fresh") == ToolResult("fresh!", is_error=False)
    entries = await status(tools)
    assert entries["fake"].state == admin_pb2.MCP_SERVER_STATE_READY and entries["fake"].tools == 7
    assert entries["fake"].transport == "stdio" and entries["fake"].protocol_version


async def test_a_call_past_its_timeout_is_an_error_and_the_server_stays_usable(mcp_tools, tmp_path: Path):
    log = tmp_path / "calls.log"
    tools = mcp_tools({"fake": stdio(call_timeout_ms=300, env={"FAKE_MCP_LOG": str(log)})})
    await tools.start()

    slow = await call(tools, "fake__slow", {"seconds": 10})
    after = await call(tools, "fake__add", {"a": 1, "b": 1})

    assert slow.is_error and "did not answer within 300 ms" in slow.content
    assert after == ToolResult("2", is_error=False)
    # The same process answered both: a timeout does not restart the server.
    assert len({pid for _, pid in served_by(log)}) == 1
    assert (await status(tools))["fake"].restarts == 0


async def test_a_server_that_crashes_mid_call_or_idle_is_restarted_and_the_next_call_works(
    mcp_tools, tmp_path: Path
):
    log = tmp_path / "calls.log"
    tools = mcp_tools({"fake": stdio(env={"FAKE_MCP_LOG": str(log)})})
    await tools.start()

    crashed = await call(tools, "fake__crash")
    next_call = await call(tools, "fake__add", {"a": 1, "b": 2})
    assert crashed.is_error and "closed the connection during the call" in crashed.content
    assert next_call == ToolResult("3", is_error=False)
    (_, first_pid), (_, second_pid) = served_by(log)
    assert first_pid != second_pid

    # Killed while idle: noticed at once and restarted, so the next call does not fail on it.
    os.kill(second_pid, signal.SIGKILL)
    assert await eventually(lambda: asyncio.sleep(0, tools.servers[(AGENT, "fake")].restarts == 2))
    assert await call(tools, "fake__add", {"a": 2, "b": 2}) == ToolResult("4", is_error=False)
    pids = [pid for _, pid in served_by(log)]
    assert len(set(pids)) == 3
    entry = (await status(tools))["fake"]
    assert (entry.state, entry.restarts) == (admin_pb2.MCP_SERVER_STATE_READY, 2)


async def test_a_server_that_cannot_start_is_reported_and_the_others_work(mcp_tools):
    tools = mcp_tools(
        {
            "broken": {
                "command": sys.executable,
                "args": ["-c", "import sys; sys.stderr.write('missing dependency: libfoo\\n'); sys.exit(3)"],
                "startup_timeout_ms": 3000,
            },
            "missing": {"command": "/nonexistent/mcp-server"},
            # Never answers the handshake: given up after its startup_timeout_ms, and stopped.
            "mute": {
                "command": sys.executable,
                "args": ["-c", "import time; time.sleep(600)"],
                "startup_timeout_ms": 1000,
            },
            "fake": stdio(),
        }
    )
    await tools.start()  # returns: a broken server does not hold the others up

    entries = await status(tools)
    assert entries["fake"].state == admin_pb2.MCP_SERVER_STATE_READY
    assert entries["broken"].state == admin_pb2.MCP_SERVER_STATE_FAILED
    assert "libfoo" in entries["broken"].last_error  # its stderr says why
    assert entries["missing"].state == admin_pb2.MCP_SERVER_STATE_FAILED
    assert "/nonexistent/mcp-server" in entries["missing"].last_error
    assert entries["mute"].state == admin_pb2.MCP_SERVER_STATE_FAILED
    assert entries["mute"].last_error == "not ready within startup_timeout_ms (1000)"
    assert {name.split("__")[0] for name in offered(tools)} == {"fake"}
    assert (await call(tools, "fake__echo", {"text": "still here"})).content == "still here"


# ---------------------------------------------------------------- streamable HTTP


@contextlib.contextmanager
def http_server(port: int, log: Path):
    handle = log.open("ab")
    proc = subprocess.Popen([sys.executable, str(FAKE), "--http", str(port)], stdout=handle, stderr=handle)
    handle.close()
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


async def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            writer.close()
            return


async def test_a_streamable_http_server_with_headers_from_the_environment(mcp_tools, tmp_path: Path):
    port = free_port()
    server = {
        "url": f"http://127.0.0.1:{port}/mcp",
        "bearer_token_env": "FAKE_BEARER",
        "env_headers": {"X-Team": "FAKE_TEAM"},
        "headers": {"X-Client": "runyard-tests"},
        "deny": ["grow"],
        "startup_timeout_ms": 10_000,
    }
    with http_server(port, tmp_path / "http.log") as proc:
        await wait_port(port)
        tools = mcp_tools({"web": server}, environ={"FAKE_BEARER": "tok-http", "FAKE_TEAM": "blue"})
        await tools.start()
        assert "web__add" in offered(tools) and "web__grow" not in offered(tools)
        assert await call(tools, "web__add", {"a": 20, "b": 22}) == ToolResult("42", is_error=False)
        assert (await call(tools, "web__whoami")).content == "Bearer tok-http"
        entry = (await status(tools))["web"]
        assert (entry.transport, entry.state) == ("http", admin_pb2.MCP_SERVER_STATE_READY)
        # The server dies in the middle of a call: the call is an error, not a hang.
        crashed = await call(tools, "web__crash")
        assert crashed.is_error and "closed the connection during the call" in crashed.content
        assert proc.wait(timeout=10) == 17

    # The server is gone: noticed, reported, its tools withdrawn while it is down.
    async def down() -> bool:
        return (await status(tools))["web"].state == admin_pb2.MCP_SERVER_STATE_FAILED

    assert await eventually(down)
    assert offered(tools) == {}
    # Back on the same address: the worker reconnects (a call asks for it at once).
    with http_server(port, tmp_path / "http.log"):
        await wait_port(port)
        assert await call(tools, "web__add", {"a": 1, "b": 1}) == ToolResult("2", is_error=False)
        entry = (await status(tools))["web"]
        assert entry.state == admin_pb2.MCP_SERVER_STATE_READY and entry.restarts == 1


# ---------------------------------------------------------------- through a tool loop


class BuiltinStandIn:
    """A tool source like the built-in tools (``source = "builtin"``): one tool."""

    source = "builtin"

    def offered(self, payload: common_pb2.RunPayload) -> list[common_pb2.ToolDefinition]:
        return [BUILTIN_TOOLS["task_output"]]

    async def call(self, payload: common_pb2.RunPayload, call: common_pb2.ToolCall) -> ToolResult:
        return ToolResult(json.dumps({"task_id": json.loads(call.arguments_json)["task_id"]}))


async def run_tools(
    sources: list[Any], payload: common_pb2.RunPayload, calls: list[common_pb2.ToolCall]
) -> list[tuple[str, ToolResult]]:
    """What the shared tool loop does with a model's calls: offer every
    source's tools, route each call to the source that offered its name.
    Returns ``(source, result)`` per call."""
    owners: dict[str, Any] = {}
    for source in sources:
        for tool in source.offered(payload):
            assert tool.name not in owners, f"two sources offer {tool.name}"
            owners[tool.name] = source
    results = []
    for tool_call in calls:
        source = owners[tool_call.name]
        results.append((source.source, await source.call(payload, tool_call)))
    return results


async def test_tool_sources_route_each_call_back_to_the_source_that_offered_it(mcp_tools):
    tools = mcp_tools({"fake": stdio(allow=["add", "echo"])})
    await tools.start()
    payload = common_pb2.RunPayload(agent_id=AGENT)
    calls = [
        common_pb2.ToolCall(id="1", name="fake__add", arguments_json='{"a": 40, "b": 2}'),
        common_pb2.ToolCall(id="2", name="task_output", arguments_json='{"task_id": "t-1"}'),
        common_pb2.ToolCall(id="3", name="fake__echo", arguments_json='{"text": "bye"}'),
    ]

    results = await run_tools([BuiltinStandIn(), tools], payload, calls)

    assert tools.source == "mcp"
    assert [(source, result.content) for source, result in results] == [
        ("mcp", "42"),
        ("builtin", '{"task_id": "t-1"}'),
        ("mcp", "bye"),
    ]


# ---------------------------------------------------------------- the worker process


async def test_the_worker_reports_a_server_that_cannot_start_and_stays_healthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    metrics_port = free_port()
    monkeypatch.setenv("BROKEN_MCP_TOKEN", "tok-very-secret-42")  # the worker's environment
    servers = {
        "broken": {
            "command": sys.executable,
            "args": [
                "-c",
                "import os; raise SystemExit('no config for broken, ' + os.environ['BROKEN_MCP_TOKEN'])",
            ],
            "pass_env": ["BROKEN_MCP_TOKEN"],
            "startup_timeout_ms": 3000,
        },
        "fake": stdio(),
    }
    # The worker needs no database; the gateway it looks for is not there (it keeps retrying).
    stack = Stack(
        tmp_path,
        "postgresql://127.0.0.1:1/unused",
        {
            "agents": {"default": {"model": "echo/echo", "mcp_servers": json.dumps(servers)}},
        },
    )
    try:
        name = await stack.add_worker(wait_connected=False, extra={"worker": {"metrics_port": metrics_port}})
        address = f"127.0.0.1:{stack.ports[name]}"
        await stack.wait_log(name, "MCP server default/fake ready")
        await stack.wait_log(name, "MCP server default/broken could not start")
        (result,) = await collect_status([("worker", address)], secret=INTERNAL_SECRET)
        metrics_text = await asyncio.to_thread(
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
            )
        )
        logs = stack.logs(name)
    finally:
        await stack.close()

    assert result.health == "SERVING" and not result.problems
    report = {m["name"]: m for m in result.as_dict()["mcp_servers"]}
    assert report["fake"]["state"] == "ready" and report["fake"]["tools"] == 8
    assert report["broken"]["state"] == "failed" and "no config for broken" in report["broken"]["last_error"]
    table = io.StringIO()
    render_table([result], table)
    assert "MCP servers that are not ready (worker" in table.getvalue()
    (row,) = [line for line in table.getvalue().splitlines() if " broken " in line]
    assert "default" in row and "stdio" in row and "failed" in row and "no config for broken" in row
    assert 'runyard_mcp_servers{agent="default",server="broken",state="failed"} 1.0' in metrics_text
    assert 'runyard_mcp_servers{agent="default",server="fake",state="ready"} 1.0' in metrics_text
    assert "MCP server default/broken stderr: no config for broken, ***" in logs
    # The key the server got (and printed) is masked in the log and the status.
    assert "tok-very-secret-42" not in logs + json.dumps(result.as_dict()) + table.getvalue()


# ---------------------------------------------------------------- end to end


def _shared_tool_loop() -> bool:
    try:
        from runyard.worker.tools import ToolSource  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _shared_tool_loop(),
    reason="needs the client-tools branch of issue 13 (runyard.worker.tools.ToolSource, RunExecutor.sources)",
)
async def test_the_models_call_reaches_the_mcp_server_and_a_crash_leaves_the_session_usable(
    stack_factory, fake_openai: FakeOpenAI, tmp_path: Path
):
    def tool_call(name: str, arguments: dict[str, Any]) -> Reply:
        return Reply(
            chunks=[],
            tool_calls=[
                {
                    "id": f"call-{name}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
            ],
        )

    fake_openai.script(
        "tooler",
        tool_call("fake__add", {"a": 2, "b": 3}),
        Reply(chunks=["The sum is 5."]),
        tool_call("fake__crash", {}),
        Reply(chunks=["The tool crashed."]),
        tool_call("fake__crash", {}),
        Reply(chunks=["It works again."]),
    )
    servers = {"fake": stdio(env={"FAKE_MCP_CRASH_ONCE": str(tmp_path / "crashed-once")})}
    stack = await stack_factory(
        {
            "providers": {"fake": {"type": "openai", "base_url": fake_openai.url}},
            "agents": {"default": {"model": "fake/tooler", "mcp_servers": json.dumps(servers)}},
        }
    ).start()
    async with stack.client() as client:
        first = [e async for e in client.send("mcp:1", "add 2 and 3")]
        second = [e async for e in client.send("mcp:1", "crash it")]
        third = [e async for e in client.send("mcp:1", "again")]

    def results(events: list[Any]) -> list[Any]:
        return [e.tool_result for e in events if e.HasField("tool_result")]

    (added,) = results(first)
    assert (added.name, added.content, added.is_error) == ("fake__add", "5", False)
    assert first[-1].completed.message.content == "The sum is 5."
    requests = fake_openai.requests_for("tooler")
    assert "fake__add" in {t["function"]["name"] for t in requests[0]["tools"]}
    assert {"role": "tool", "content": "5"}.items() <= requests[1]["messages"][-1].items()
    (crashed,) = results(second)
    assert crashed.is_error and "closed the connection" in crashed.content
    assert second[-1].completed.message.content == "The tool crashed."
    (again,) = results(third)
    assert (again.content, again.is_error) == ("survived", False)  # a fresh process answered
    assert third[-1].completed.message.content == "It works again."
