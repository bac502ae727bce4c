"""Background tasks below the service level (issue 6): keys and limits, the
[tasks] config, notices, notification text, the echo provider's scripted tool
calls and the tools' argument checks. The slot queue on PostgreSQL is in
tests/db/test_task_queue.py."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from runyard._proto.v1 import common_pb2
from runyard.common.config import ConfigError, ProviderConfig, load_config
from runyard.gateway.tasks import concurrency_key, normalise_notice, notification_message, slot_limit
from runyard.router.providers import EchoProvider, Request, anthropic_messages
from runyard.worker.tools import BUILTIN_TOOLS, TaskTools, offered_tools

pytestmark = pytest.mark.timeout(60)


# ---------------------------------------------------------------- keys, limits, config


def test_the_key_is_the_model_else_the_provider_else_default(tmp_path: Path):
    path = tmp_path / "runyard.toml"
    path.write_text(
        """
[providers.local]
type = "openai"
base_url = "http://127.0.0.1:1/v1"

[tasks.concurrency]
default = 3
models = { "local/big" = 1, "echo/echo" = 0 }
providers = { local = 4 }
"""
    )
    config = load_config(path, environ={})
    assert concurrency_key(config, "local/big") == "model:local/big"
    assert concurrency_key(config, "local/small") == "provider:local"
    assert concurrency_key(config, "echo/echo") == "model:echo/echo"
    assert concurrency_key(config, "echo/other") == "default"
    assert [
        slot_limit(config, k) for k in ("model:local/big", "provider:local", "model:echo/echo", "default")
    ] == [1, 4, 0, 3]
    defaults = load_config(environ={})
    assert defaults.tasks.concurrency.default == 5 and defaults.tasks.stale_after_s == 1800


def test_tasks_config_errors_name_their_path(tmp_path: Path):
    path = tmp_path / "runyard.toml"
    path.write_text(
        """
[tasks]
stale_after_s = 0
[tasks.concurrency]
default = -1
models = { "no-slash" = 1 }
providers = { ghost = 2 }
[agents.default]
model = "echo/echo"
tools = ["spawn_task", "rm_rf"]
"""
    )
    with pytest.raises(ConfigError) as bad:
        load_config(path, environ={})
    paths = {p for p, _ in bad.value.problems}
    assert {
        "tasks.stale_after_s",
        "tasks.concurrency.default",
        "tasks.concurrency.models",
        "agents.default.tools.1",
    } <= paths
    path.write_text('[tasks.concurrency]\nproviders = { ghost = 2 }\nmodels = { "nowhere/x" = 1 }\n')
    with pytest.raises(ConfigError) as dangling:
        load_config(path, environ={})
    assert dict(dangling.value.problems) == {
        "tasks.concurrency.providers.ghost": "provider 'ghost' is not configured (known: echo)",
        "tasks.concurrency.models.nowhere/x": (
            "model 'nowhere/x' names a provider that is not configured (known: echo)"
        ),
    }


# ---------------------------------------------------------------- notices and messages


def test_notices_that_differ_only_in_numbers_ids_case_or_spacing_normalise_alike():
    a = (
        "fa/a -> fb/b (RATE_LIMIT): Rate limited, retry after 2.5 s "
        "(request 1f0e4c1a-0b8e-4a49-9d1a-3c2b1a0f9e8d)"
    )
    b = (
        "fa/a -> fb/b (RATE_LIMIT):  rate limited, retry after 30 s "
        "(request 7a1c2b3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d)"
    )
    assert normalise_notice(a) == normalise_notice(b)
    assert normalise_notice(a) != normalise_notice("fa/a -> fb/b (OVERLOADED): overloaded")


def _row(status: str, *, result: str = "", error: str = "", seconds: float = 1.5) -> dict[str, Any]:
    created = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    return {
        "id": uuid.UUID(int=len(status) + int(seconds * 10)),
        "description": f"{status} job",
        "status": status,
        "result": result,
        "error": common_pb2.RunError(message=error).SerializeToString() if error else None,
        "created_at": created,
        "ended_at": created + dt.timedelta(seconds=seconds),
    }


def test_a_notification_names_each_task_and_says_when_all_are_complete():
    rows = [_row("completed", result="x" * 50), _row("error", error="the model refused", seconds=95)]
    note_id = uuid.uuid4()
    partial = notification_message(rows, notification_id=note_id, result_chars=20, totals=None)
    final = notification_message(rows, notification_id=note_id, result_chars=20, totals=(3, 1, 1))
    assert partial.role == common_pb2.ROLE_SYSTEM and partial.id == str(note_id)
    assert partial.content.splitlines() == [
        "Background task update: 2 tasks finished.",
        f'- Task {rows[0]["id"]} "completed job": COMPLETED after 1.5 s. Result: {"x" * 19}…',
        f'- Task {rows[1]["id"]} "error job": ERROR after 1.6 min. Error: the model refused',
    ]
    assert partial.metadata["all_complete"] == "false"
    assert partial.metadata["task_ids"] == f"{rows[0]['id']},{rows[1]['id']}"
    assert (
        final.content.splitlines()[-1]
        == "All background tasks are complete (3 tasks; 1 failed, 1 cancelled)."
    )
    assert final.metadata["all_complete"] == "true"


# ---------------------------------------------------------------- echo's scripted tool calls


async def _echo(messages: list[common_pb2.Message], tools: bool = True) -> list[Any]:
    provider = EchoProvider("echo", ProviderConfig(type="echo"))
    request = Request(model="echo", messages=messages, tools=list(BUILTIN_TOOLS.values()) if tools else [])
    return [chunk async for chunk in provider.stream(request, "")]


async def test_echo_calls_a_tool_when_asked_and_answers_tool_results_and_notifications():
    user = common_pb2.Message(role=common_pb2.ROLE_USER, content='/tool spawn_task {"prompt": "p"}')
    chunks = await _echo([user])
    assert [c.kind for c in chunks] == ["tool_call", "usage", "finish"]
    assert (chunks[0].tool_call.id, chunks[0].tool_call.name, chunks[0].tool_call.arguments_json) == (
        "echo-call-1",
        "spawn_task",
        '{"prompt": "p"}',
    )
    assert chunks[-1].finish_reason == "tool_calls"
    # Without tools offered it is an ordinary message.
    assert (
        "".join(c.text for c in await _echo([user], tools=False)) == 'echo: /tool spawn_task {"prompt": "p"}'
    )
    result = common_pb2.Message(
        role=common_pb2.ROLE_TOOL, content='{"task_id": "t"}', tool_call_id="echo-call-1"
    )
    assert "".join(c.text for c in await _echo([user, result])) == 'echo: tool result: {"task_id": "t"}'
    note = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Background task update: done")
    system = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief.")
    assert "".join(c.text for c in await _echo([system, user, note])) == "echo: Background task update: done"
    assert "".join(c.text for c in await _echo([system])) == "echo: "


def test_anthropic_keeps_a_notification_in_place_as_a_user_turn():
    system, messages = anthropic_messages(
        [
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
            common_pb2.Message(role=common_pb2.ROLE_USER, content="hi"),
            common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="hello"),
            common_pb2.Message(
                role=common_pb2.ROLE_SYSTEM, content="Background task update: 1 task finished."
            ),
        ]
    )
    assert system == "Be brief."
    assert messages[-1] == {
        "role": "user",
        "content": [{"type": "text", "text": "Background task update: 1 task finished."}],
    }


# ---------------------------------------------------------------- the tools


class _NoGateway:
    """A TaskService stub that must not be called."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} called for a request the tool should have refused")


async def test_tools_refuse_bad_arguments_without_calling_the_gateway():
    async def retrying(call):
        return await call()

    tools = TaskTools(_NoGateway(), (), wait_max_s=1.0, retrying=retrying)  # type: ignore[arg-type]
    payload = common_pb2.RunPayload(run_id="r", run_token="t")

    async def run(name: str, arguments: str) -> tuple[str, bool]:
        result = await tools.execute(
            payload, common_pb2.ToolCall(id="c", name=name, arguments_json=arguments), 1
        )
        return json.loads(result.content)["error"], result.is_error

    assert await run("spawn_task", "{not json") == (
        "arguments are not valid JSON: "
        "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        True,
    )
    assert await run("spawn_task", "[1]") == ("arguments must be a JSON object", True)
    assert await run("spawn_task", '{"prompt": " "}') == ("'prompt' (a non-empty string) is required", True)
    assert await run("spawn_task", '{"prompt": "p", "max_tool_calls": -1}') == (
        "'max_tool_calls' must be a whole number >= 0",
        True,
    )
    assert await run("task_output", "{}") == ("'task_id' (a string) is required", True)
    assert await run("task_output", '{"task_id": "x", "wait_s": "soon"}') == (
        "'wait_s' must be a number >= 0",
        True,
    )
    assert await run("rm", "{}") == ("unknown tool 'rm'; available: spawn_task, task_output", True)


def test_tools_are_offered_by_agent_config_or_run_option():
    config = load_config(
        environ={
            "RUNYARD_AGENTS__DEFAULT__TOOLS": '["task_output"]',
            "RUNYARD_AGENTS__DEFAULT__MODEL": "echo/echo",
            "RUNYARD_AGENTS__PLAIN__MODEL": "echo/echo",
        }
    )

    def names(payload: common_pb2.RunPayload) -> list[str]:
        return [t.name for t in offered_tools(config, payload)]

    assert names(common_pb2.RunPayload(agent_id="default")) == ["task_output"]
    assert names(common_pb2.RunPayload(agent_id="plain")) == []
    enabled = common_pb2.RunPayload(agent_id="plain", options=common_pb2.RunOptions(tools_enabled=True))
    assert names(enabled) == ["spawn_task", "task_output"]
    schema = json.loads(BUILTIN_TOOLS["spawn_task"].parameters_json_schema)
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False
