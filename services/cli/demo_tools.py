"""Demo client-side tools for ``runyard chat --demo-tools`` and ``runyard send --demo-tools``.

The CLI declares them with each message (``RunOptions.client_tools``). When
the model calls one, the run waits (``requires_action``); the CLI computes
the result here, on the caller's machine, and sends it back with
``SubmitToolResults``, so a person sees the whole round trip:

* ``clock {tz?}``: the current date and time in an IANA time zone (default UTC);
* ``calculator {expression}``: arithmetic on numbers (``+ - * / // % **``,
  parentheses), evaluated from the syntax tree (never ``eval``), with
  bounded exponents so an expression cannot hang the terminal.

A bad call (unknown zone, malformed expression, division by zero) gets an
``is_error`` result that the model reads.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import math
import operator
import zoneinfo
from collections.abc import Callable
from typing import Any

from runyard._proto.v1 import common_pb2, gateway_pb2

__all__ = ["DEMO_TOOLS", "answer", "calculate"]

CLOCK = common_pb2.ToolDefinition(
    name="clock",
    description="The current date and time on the user's machine, in an IANA time zone (default UTC).",
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {"tz": {"type": "string", "description": "IANA time zone, e.g. Europe/Paris"}},
            "additionalProperties": False,
        }
    ),
)
CALCULATOR = common_pb2.ToolDefinition(
    name="calculator",
    description="Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses.",
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "e.g. (17 + 25) * 3"}},
            "required": ["expression"],
            "additionalProperties": False,
        }
    ),
)
#: The tools ``--demo-tools`` declares.
DEMO_TOOLS = [CLOCK, CALCULATOR]

_BINARY: dict[type[ast.operator], Callable[[Any, Any], int | float | complex]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], int | float]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_MAX_EXPRESSION = 1000
_MAX_EXPONENT = 1000
_MAX_MAGNITUDE = 10**300


def calculate(expression: str) -> int | float:
    """The value of an arithmetic ``expression``.

    Raises:
        ValueError: anything but numbers, the operators above and
            parentheses; an exponent over 1000; a result over 1e300;
            a division by zero.
    """
    if len(expression) > _MAX_EXPRESSION:
        raise ValueError(f"the expression is longer than {_MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression ({exc.msg})") from None

    def value(node: ast.AST) -> int | float:
        # A parsed constant is an int, float, complex, bool, str, bytes, None or Ellipsis.
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, int | float)
            and not isinstance(node.value, bool)
        ):
            return node.value
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
                raise ValueError(f"exponents above {_MAX_EXPONENT} are not supported")
            try:
                result = _BINARY[type(node.op)](left, right)
            except ZeroDivisionError:
                raise ValueError("division by zero") from None
            if isinstance(result, complex) or abs(result) > _MAX_MAGNITUDE:
                raise ValueError("the result is out of range")
            return result
        raise ValueError(
            f"only numbers, + - * / // % ** and parentheses are allowed, not {type(node).__name__}"
        )

    result = value(tree.body)
    if isinstance(result, float) and not math.isfinite(result):
        raise ValueError("the result is out of range")
    return result


def answer(
    call: common_pb2.ToolCall, clock: Callable[[], dt.datetime] | None = None
) -> gateway_pb2.ToolOutput:
    """The result of one demo tool call (``is_error`` when it cannot be answered)."""

    def error(message: str) -> gateway_pb2.ToolOutput:
        return gateway_pb2.ToolOutput(
            tool_call_id=call.id, content=json.dumps({"error": message}), is_error=True
        )

    try:
        arguments = json.loads(call.arguments_json or "{}")
    except json.JSONDecodeError as exc:
        return error(f"arguments are not valid JSON: {exc.msg}")
    if not isinstance(arguments, dict):
        return error("arguments must be a JSON object")
    if call.name == "clock":
        name = arguments.get("tz") or "UTC"
        try:
            zone = zoneinfo.ZoneInfo(str(name))
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            return error(f"unknown time zone {name!r}")
        moment = (clock or (lambda: dt.datetime.now(dt.UTC)))().astimezone(zone)
        content = {
            "time": moment.isoformat(timespec="seconds"),
            "tz": str(name),
            "weekday": moment.strftime("%A"),
        }
        return gateway_pb2.ToolOutput(tool_call_id=call.id, content=json.dumps(content))
    if call.name == "calculator":
        expression = arguments.get("expression")
        if not isinstance(expression, str) or not expression.strip():
            return error("'expression' (a string) is required")
        try:
            result = calculate(expression)
        except ValueError as exc:
            return error(str(exc))
        return gateway_pb2.ToolOutput(
            tool_call_id=call.id, content=json.dumps({"expression": expression, "result": result})
        )
    return error(f"unknown tool {call.name!r}; this client answers clock and calculator")
