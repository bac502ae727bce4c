"""Client-side tools without a stack: declarations checked at send time, one
name per tool in a run, results in call order, the CLI's demo tools."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from runyard._proto.v1 import common_pb2
from runyard.cli.demo_tools import answer, calculate
from runyard.common import metrics
from runyard.common.errors import InvalidArgument
from runyard.gateway.tool_results import check_client_tools
from runyard.worker.runner import _order_tool_results
from runyard.worker.tools import ClientTools, ToolResult, record_tool_call, resolve_tools

Tool = common_pb2.ToolDefinition


@pytest.mark.parametrize(
    ("tools", "reason", "field"),
    [
        ([Tool(name=f"t{i}") for i in range(129)], "TOO_MANY_ITEMS", "options.client_tools"),
        ([Tool(name="ok"), Tool(name="has space")], "INVALID_TOOL_NAME", "options.client_tools[1].name"),
        ([Tool(name="x" * 65)], "INVALID_TOOL_NAME", "options.client_tools[0].name"),
        ([Tool(name="task_output")], "TOOL_NAME_RESERVED", "options.client_tools[0].name"),
        ([Tool(name="a"), Tool(name="a")], "DUPLICATE_TOOL_NAME", "options.client_tools[1].name"),
        ([Tool(name="a", description="d" * 4097)], "VALUE_TOO_LONG", "options.client_tools[0].description"),
        (
            [Tool(name="a", parameters_json_schema="{nope")],
            "INVALID_TOOL_SCHEMA",
            "options.client_tools[0].parameters_json_schema",
        ),
        (
            [Tool(name="a", parameters_json_schema='"string"')],
            "INVALID_TOOL_SCHEMA",
            "options.client_tools[0].parameters_json_schema",
        ),
    ],
)
def test_bad_client_tool_declarations_are_refused_naming_the_field(tools, reason, field):
    with pytest.raises(InvalidArgument) as refused:
        check_client_tools(tools)
    assert (refused.value.reason, refused.value.field) == (reason, field)


def test_good_client_tool_declarations_pass():
    check_client_tools(
        [Tool(name="get_weather-2", parameters_json_schema='{"type": "object"}'), Tool(name="b")]
    )


class _Source:
    def __init__(self, source: str, *names: str):
        self.source = source
        self.names = names

    def offered(self, payload):
        return [Tool(name=name) for name in self.names]

    async def call(self, payload, call):
        return ToolResult("{}")


def test_tool_names_are_unique_per_run_the_first_server_source_wins_and_a_client_clash_fails():
    builtin, mcp = _Source("builtin", "spawn_task", "task_output"), _Source("mcp", "task_output", "search")
    payload = common_pb2.RunPayload(options=common_pb2.RunOptions(client_tools=[Tool(name="clock")]))
    tools = resolve_tools([builtin, mcp, ClientTools()], payload)
    assert [d.name for d in tools.definitions] == ["spawn_task", "task_output", "search", "clock"]
    assert [tools.source_of(n) for n in ("task_output", "search", "clock", "nope")] == [
        "builtin",
        "mcp",
        "client",
        "",
    ]

    payload.options.client_tools.add(name="search")
    with pytest.raises(InvalidArgument) as clash:
        resolve_tools([builtin, mcp, ClientTools()], payload)
    assert clash.value.reason == "TOOL_NAME_CONFLICT"
    assert (clash.value.metadata["tool"], clash.value.metadata["source"]) == ("search", "mcp")


def test_tool_results_follow_the_order_of_the_calls():
    assistant = common_pb2.Message(
        role=common_pb2.ROLE_ASSISTANT,
        tool_calls=[common_pb2.ToolCall(id="a"), common_pb2.ToolCall(id="b"), common_pb2.ToolCall(id="c")],
    )
    user = common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")
    messages = [user, assistant] + [
        common_pb2.Message(role=common_pb2.ROLE_TOOL, tool_call_id=i) for i in "cab"
    ]
    _order_tool_results(messages)
    assert [m.tool_call_id for m in messages[2:]] == ["a", "b", "c"] and messages[:2] == [user, assistant]


def test_tool_metrics_label_only_offered_names():
    record_tool_call("", "an invented name", True, 0.0)
    assert metrics.TOOL_CALLS_TOTAL.labels("(undeclared)", "none", "error")._value.get() >= 1  # type: ignore[attr-defined]


def test_the_calculator_computes_exactly_and_refuses_anything_else():
    assert calculate("6 * (3 + 4)") == 42
    assert calculate("-2 ** 3 + 7 // 2 % 3") == -8
    assert calculate("1 / 4") == 0.25
    for expression, problem in (
        ("__import__('os')", "only numbers"),
        ("2 ** 5000", "exponents above 1000"),
        ("1 / 0", "division by zero"),
        ("10 ** 999 * 10 ** 999", "out of range"),
        ("1 +", "not an arithmetic expression"),
    ):
        with pytest.raises(ValueError, match=problem):
            calculate(expression)


def test_demo_tool_answers_and_errors():
    def noon():
        return dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)

    clock = answer(
        common_pb2.ToolCall(id="1", name="clock", arguments_json='{"tz": "Asia/Tokyo"}'), clock=noon
    )
    assert (clock.tool_call_id, clock.is_error) == ("1", False)
    assert json.loads(clock.content) == {
        "time": "2026-03-01T21:00:00+09:00",
        "tz": "Asia/Tokyo",
        "weekday": "Sunday",
    }
    bad_zone = answer(common_pb2.ToolCall(id="2", name="clock", arguments_json='{"tz": "Mars/Base"}'))
    assert bad_zone.is_error and json.loads(bad_zone.content) == {"error": "unknown time zone 'Mars/Base'"}
    sum_ = answer(common_pb2.ToolCall(id="3", name="calculator", arguments_json='{"expression": "2+2"}'))
    assert json.loads(sum_.content) == {"expression": "2+2", "result": 4} and not sum_.is_error
    assert answer(common_pb2.ToolCall(id="4", name="rm", arguments_json="{}")).is_error


def test_submit_tool_results_request_rules():
    from runyard._proto.v1 import gateway_pb2
    from runyard.common.validation import check_request

    run_id = "6f1c8b8e-8d5e-4a53-9d55-0f3f3f8e2a10"
    for request, field in (
        (gateway_pb2.SubmitToolResultsRequest(run_id=run_id), "results"),
        (
            gateway_pb2.SubmitToolResultsRequest(run_id=run_id, results=[gateway_pb2.ToolOutput()]),
            "results[0].tool_call_id",
        ),
    ):
        with pytest.raises(InvalidArgument) as refused:
            check_request(request)
        assert (refused.value.reason, refused.value.field) == ("MISSING_FIELD", field)
    # A result is conversation content: a NUL character in it is just a character.
    check_request(
        gateway_pb2.SubmitToolResultsRequest(
            run_id=run_id, results=[gateway_pb2.ToolOutput(tool_call_id="c", content="a\x00b")]
        )
    )
