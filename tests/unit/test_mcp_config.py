"""MCP servers of agents (issue 13): their configuration, the names the model
sees, and how a tool result reads to the model. No server is started here
(tests/integration/test_mcp.py does that)."""

from __future__ import annotations

import json
from pathlib import Path

import mcp_types as mcp_t
import pytest

from runyard import ConfigError, load_config
from runyard.common.config import mcp_environment_problems
from runyard.common.runtime import check_service_config
from runyard.worker.mcp import MAX_TOOL_NAME, exposed_name, render_result
from runyard.worker.tools import BUILTIN_TOOLS
from tests.stack import INTERNAL_SECRET


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "runyard.toml"
    path.write_text(text)
    return path


def test_stdio_and_http_servers_load_from_the_file(tmp_path: Path):
    config = load_config(
        write(
            tmp_path,
            """
[agents.default]
model = "echo/echo"

[agents.default.mcp_servers.files]
command = "npx"
args = ["-y", "@modelcontextprotocol/server-filesystem", "/srv/docs"]
env = { LOG_LEVEL = "debug" }
pass_env = ["GITHUB_TOKEN"]
deny = ["write_*"]
call_timeout_ms = 5000

[agents.default.mcp_servers.search]
url = "https://mcp.example.com/mcp"
headers = { X-Team = "research" }
env_headers = { X-Api-Key = "SEARCH_KEY" }
allow = ["search", "fetch_*"]
max_result_bytes = 4096
""",
        ),
        environ={},
    )
    servers = config.agent("default").mcp_servers
    assert servers["files"].transport == "stdio" and servers["files"].args[-1] == "/srv/docs"
    assert servers["files"].call_timeout_ms == 5000 and servers["files"].startup_timeout_ms == 30_000
    assert servers["search"].transport == "http" and servers["search"].env_headers == {
        "X-Api-Key": "SEARCH_KEY"
    }
    assert servers["search"].environment_names == ["SEARCH_KEY"]


@pytest.mark.parametrize(
    ("server", "path", "expected"),
    [
        ({"command": "x", "url": "http://h/mcp"}, "agents.default.mcp_servers.s", "exactly one of command"),
        ({}, "agents.default.mcp_servers.s", "exactly one of command"),
        ({"url": "ftp://h/mcp"}, "agents.default.mcp_servers.s", "http:// or https://"),
        (
            {"url": "http://h/mcp", "args": ["-v"]},
            "agents.default.mcp_servers.s",
            "args do not apply to an HTTP",
        ),
        (
            {"command": "x", "bearer_token_env": "T"},
            "agents.default.mcp_servers.s",
            "do not apply to a stdio",
        ),
        (
            {"url": "http://h/", "headers": {"Authorization": "Bearer sk-live-123"}},
            "agents.default.mcp_servers.s.headers",
            "carries a credential",
        ),
        (
            {"url": "http://h/", "env_headers": {"X-Key": "sk-live-123"}},
            "agents.default.mcp_servers.s.env_headers",
            "name of an environment variable",
        ),
        (
            {"url": "http://h/", "bearer_token_env": "sk-live 123"},
            "agents.default.mcp_servers.s.bearer_token_env",
            "name of an environment variable",
        ),
        (
            {"command": "x", "pass_env": ["NOT-A-NAME"]},
            "agents.default.mcp_servers.s.pass_env",
            "names of environment",
        ),
        ({"command": "x", "deny": [" "]}, "agents.default.mcp_servers.s.deny", "must not be empty"),
        (
            {"command": "x", "call_timeout_ms": 0},
            "agents.default.mcp_servers.s.call_timeout_ms",
            "greater than",
        ),
        ({"command": "x", "alow": ["a"]}, "agents.default.mcp_servers.s.alow", "did you mean 'allow'"),
    ],
)
def test_a_bad_server_is_a_config_error_naming_the_field(server: dict, path: str, expected: str):
    env = {"RUNYARD_AGENTS": json.dumps({"default": {"model": "echo/echo", "mcp_servers": {"s": server}}})}
    with pytest.raises(ConfigError) as error:
        load_config(environ=env)
    assert [p for p, _ in error.value.problems] == [path]
    assert expected in error.value.problems[0][1]
    assert "sk-live" not in str(error.value)  # a key pasted by mistake is never echoed


@pytest.mark.parametrize("name", ["a__b", "_a", "a_", "a.b", "x" * 33])
def test_server_names_must_make_clean_tool_prefixes(name: str):
    env = {
        "RUNYARD_AGENTS": json.dumps(
            {"default": {"model": "echo/echo", "mcp_servers": {name: {"command": "x"}}}}
        )
    }
    with pytest.raises(ConfigError) as error:
        load_config(environ=env)
    [(path, message)] = error.value.problems
    assert path == "agents.default.mcp_servers" and repr(name) in message


def test_a_worker_without_the_variables_its_servers_name_does_not_start():
    servers = {
        "gh": {"command": "gh-mcp", "pass_env": ["GH_TOKEN", "HOME_DIR"]},
        "web": {"url": "https://h/mcp", "bearer_token_env": "WEB_TOKEN", "env_headers": {"X-Org": "WEB_ORG"}},
        "off": {"command": "x", "pass_env": ["NEVER_SET"], "enabled": False},
    }
    environ = {
        "RUNYARD_AGENTS": json.dumps({"default": {"model": "echo/echo", "mcp_servers": servers}}),
        "RUNYARD_DATABASE_URL": "postgresql://db/x",
        "RUNYARD_INTERNAL_SECRET": INTERNAL_SECRET,
        "RUNYARD_RUN_TOKEN_PUBLIC_KEY": "",
    }
    config = load_config(environ=environ)
    problems = mcp_environment_problems(config, {"HOME_DIR": "/h", "WEB_ORG": "o"})
    assert problems == [
        (
            "agents.default.mcp_servers.gh.pass_env",
            "environment variable GH_TOKEN is not set (the worker needs it)",
        ),
        (
            "agents.default.mcp_servers.web.bearer_token_env",
            "environment variable WEB_TOKEN is not set (the worker needs it)",
        ),
    ]
    # `runyard serve worker` refuses to start with them listed (the other services do not care).
    with pytest.raises(ConfigError) as error:
        check_service_config(config, "worker")
    paths = [path for path, _ in error.value.problems]
    assert (
        "agents.default.mcp_servers.gh.pass_env" in paths
        and "agents.default.mcp_servers.off.pass_env" not in paths
    )


def test_exposed_names_are_prefixed_safe_and_short():
    assert exposed_name("files", "read_file") == "files__read_file"
    assert exposed_name("files", "dir/list.all") == "files__dir_list_all"
    long = exposed_name("files", "a" * 100)
    assert len(long) == MAX_TOOL_NAME and long.startswith("files__aaa")
    assert exposed_name("files", "a" * 100) == long  # stable across listings
    # Two tools that read the same once made safe keep apart.
    clash = exposed_name("files", "dir.list", taken={"files__dir_list"})
    assert clash != "files__dir_list" and clash.startswith("files__dir_list_")
    # Built-in tool names have no double underscore: a prefixed name never equals one.
    assert BUILTIN_TOOLS and not any("__" in name for name in BUILTIN_TOOLS)


def test_a_result_reads_as_text_with_other_content_described():
    result = mcp_t.CallToolResult(
        content=[
            mcp_t.TextContent(type="text", text="first"),
            mcp_t.ImageContent(type="image", data="aGVsbG8gd29ybGQh", mime_type="image/png"),
            mcp_t.EmbeddedResource(
                type="resource", resource=mcp_t.TextResourceContents(uri="file:///a.txt", text="body")
            ),
            mcp_t.ResourceLink(type="resource_link", uri="file:///b.bin", name="b"),
        ]
    )
    rendered = render_result(result, 10_000)
    assert not rendered.is_error
    assert rendered.content.split("\n\n") == [
        "first",
        "[image image/png, about 12 bytes: not shown]",
        "[resource file:///a.txt]\nbody",
        "[resource link file:///b.bin (b)]",
    ]
    structured = render_result(mcp_t.CallToolResult(content=[], structured_content={"n": 1}), 100)
    assert json.loads(structured.content) == {"n": 1}
    failed = render_result(
        mcp_t.CallToolResult(content=[mcp_t.TextContent(type="text", text="no")], is_error=True), 100
    )
    assert failed.is_error and failed.content == "no"


def test_a_long_result_is_cut_at_the_limit_with_a_note():
    text = "é" * 400  # 800 bytes of UTF-8
    rendered = render_result(mcp_t.CallToolResult(content=[mcp_t.TextContent(type="text", text=text)]), 301)
    kept, note = rendered.content.split("\n[truncated by runyard:")
    assert kept == "é" * 150  # cut within the limit, at a character boundary
    assert "800 bytes" in note and "(max_result_bytes) is 301" in note
    assert not rendered.is_error
