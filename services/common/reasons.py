"""The catalog of error reasons: every ``reason`` a runyard service reports.

A reason is the UPPER_SNAKE_CASE word in the ``google.rpc.ErrorInfo`` detail
of a failed call (:class:`~runyard.common.errors.RunyardError`) and in the
``RunError`` of a failed run, a cancelled or failed background task, or a
``run.failed`` lifecycle event. Clients branch on it; the message is for
people. :data:`CATALOG` maps each reason to the gRPC code(s) it comes with
and what it means.

``tests/unit/test_reasons.py`` reads the source and checks that every reason
raised is here (with that code) and that every entry is still raised.
``docs/errors.md`` is generated from the catalog::

    python -m runyard.common.reasons            # write docs/errors.md
    python -m runyard.common.reasons --check    # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = ["CATALOG", "DOCS_PATH", "Reason", "main", "render"]

#: Where ``python -m runyard.common.reasons`` writes (in a source checkout).
DOCS_PATH = Path(__file__).resolve().parents[2] / "docs" / "errors.md"


class Reason(NamedTuple):
    """One catalog entry: ``codes``, the names of the gRPC status codes
    (``grpc.StatusCode`` names, as in ``RunError.code``) the reason is
    reported with, and ``meaning``, one line on what happened."""

    codes: tuple[str, ...]
    meaning: str


def _r(codes: str, meaning: str) -> Reason:
    return Reason(tuple(codes.split()), meaning)


_INVALID = "INVALID_ARGUMENT"

#: reason -> its gRPC code(s) and meaning, sorted by reason.
CATALOG: dict[str, Reason] = {
    "AFTER_SEQ_OUT_OF_RANGE": _r("OUT_OF_RANGE", "JoinRun's `after_seq` is beyond the run's last event."),
    "AGENT_NOT_FOUND": _r("NOT_FOUND", "The agent named by `agent_id` is not configured."),
    "ALL_MODELS_COOLING": _r(
        "FAILED_PRECONDITION UNAVAILABLE",
        "Every remaining model of the chain is cooling down and none may be probed now; as for "
        "ALL_MODELS_FAILED, the code says whether waiting helps.",
    ),
    "ALL_MODELS_FAILED": _r(
        "FAILED_PRECONDITION UNAVAILABLE",
        "Every model of the chain failed; metadata lists each with its failover reason. UNAVAILABLE "
        "(with RetryInfo) when waiting may help, else FAILED_PRECONDITION (a bad key, no balance, "
        "a missing model).",
    ),
    "API_KEY_INVALID": _r("UNAUTHENTICATED", "The API key is malformed or unknown."),
    "API_KEY_NOT_FOUND": _r("NOT_FOUND", "No API key with that id (key management)."),
    "API_KEY_REQUIRED": _r("UNAUTHENTICATED", "The call carries no `authorization: Bearer <key>` header."),
    "API_KEY_REVOKED": _r("UNAUTHENTICATED", "The API key has been revoked."),
    "ATTEMPTS_EXHAUSTED": _r(
        "UNAVAILABLE", "The run's worker was lost on every attempt (`gateway.max_attempts`); the run failed."
    ),
    "AUTH_RATE_LIMITED": _r(
        "RESOURCE_EXHAUSTED",
        "Too many failed authentications from this address or key id (`gateway.auth_failure_rate_per_s`).",
    ),
    "CANCELLED": _r(
        "CANCELLED", "The run was cancelled (the error of a `run.failed` event for a cancelled run)."
    ),
    "CONTENT_POLICY": _r(
        "FAILED_PRECONDITION",
        "The model refused under its content policy and the agent's `content_policy_chain` has no "
        "model left.",
    ),
    "CONTEXT_OVERFLOW": _r(
        "FAILED_PRECONDITION",
        "The prompt is too long for the model, and no larger model (`context_window_chain`) or "
        "compaction is left.",
    ),
    "DATABASE_UNAVAILABLE": _r(
        "UNAVAILABLE", "A transient database fault (connection lost, failover, serialization); retry."
    ),
    "DESCRIPTION_TOO_LONG": _r(_INVALID, "A task's `description` is longer than its limit."),
    "DRAINING": _r(
        "UNAVAILABLE",
        "The server is shutting down; retry on another replica (JoinRun resumes a run's stream).",
    ),
    "DUPLICATE_TOOL_CALL_ID": _r(_INVALID, "Tool results answer the same tool call twice."),
    "DUPLICATE_TOOL_NAME": _r(_INVALID, "Two client-side tools are declared with the same name."),
    "EMPTY_PROMPT": _r(_INVALID, "A task's `prompt` is empty."),
    "EMPTY_SUMMARY": _r("INTERNAL", "Compaction asked the model for a summary of the session and got none."),
    "EMPTY_TEXT": _r(_INVALID, "A message's `text` is empty."),
    "ENDPOINT_NOT_FOUND": _r(
        "FAILED_PRECONDITION",
        "The provider URL does not exist (a 404/405 or an HTML page): check `providers.<name>.base_url`.",
    ),
    "FORMAT": _r(
        "FAILED_PRECONDITION",
        "The provider rejected the request as malformed; metadata `provider_field` names the field.",
    ),
    "HANDSHAKE_TIMEOUT": _r(
        "DEADLINE_EXCEEDED", "A worker sent no hello on the hub within `gateway.handshake_timeout_ms`."
    ),
    "HELLO_REQUIRED": _r(_INVALID, "A worker's first hub message was not a hello."),
    "IDEMPOTENCY_KEY_REUSED": _r(
        _INVALID, "The idempotency key was already used for a different request (run or task)."
    ),
    "IDEMPOTENCY_KEY_TOO_LONG": _r(_INVALID, "`idempotency_key` is longer than its limit."),
    "INTERNAL_AUTH_REQUIRED": _r(
        "UNAUTHENTICATED",
        "A call to an internal service lacks the service credential (`x-runyard-internal`).",
    ),
    "INVALID_ARGUMENT": _r(_INVALID, "A request field breaks a rule of the contract (the message names it)."),
    "INVALID_AUTHORIZATION": _r("UNAUTHENTICATED", "The `authorization` header is not `Bearer <api key>`."),
    "INVALID_ENUM_VALUE": _r(_INVALID, "An enum field holds a value the contract does not define."),
    "INVALID_FORMAT": _r(_INVALID, "A string field does not match its pattern."),
    "INVALID_HELLO": _r(_INVALID, "A worker's hello lacks a `worker_id` or a capacity above 0."),
    "INVALID_ID": _r(_INVALID, "An id field is not a valid UUID."),
    "INVALID_LIMIT": _r(_INVALID, "A `limit` is negative."),
    "INVALID_PAGE_SIZE": _r(_INVALID, "`page_size` is negative."),
    "INVALID_PAGE_TOKEN": _r(
        _INVALID, "`page_token` is malformed or from another listing; pass `next_page_token` back unchanged."
    ),
    "INVALID_SCOPE": _r(_INVALID, "An API key is requested with an unknown scope."),
    "INVALID_SESSION_KEY": _r(_INVALID, "A session key holds characters outside the allowed set."),
    "INVALID_TOOL_NAME": _r(_INVALID, "A client-side tool's name is not 1-64 letters, digits, `_` or `-`."),
    "INVALID_TOOL_SCHEMA": _r(
        _INVALID, "A tool's `parameters_json_schema` is not a valid JSON object schema."
    ),
    "LIFECYCLE_UNAVAILABLE": _r("FAILED_PRECONDITION", "This sessions instance has no lifecycle manager."),
    "MAINTENANCE_UNAVAILABLE": _r(
        "FAILED_PRECONDITION", "Maintenance is not available on this sessions instance."
    ),
    "MALFORMED_REQUEST": _r(_INVALID, "The request message could not be decoded."),
    "MAX_TOOL_CALLS_TOO_LARGE": _r(
        _INVALID, "A task's `max_tool_calls` is above `tasks.max_tool_calls_limit`."
    ),
    "METADATA_TOO_LARGE": _r(_INVALID, "`metadata` has too many entries or too many bytes."),
    "MISSING_FIELD": _r(_INVALID, "A required field is empty."),
    "MODEL_NOT_CONFIGURED": _r(
        "FAILED_PRECONDITION", "A model of the agent's chain names no configured provider."
    ),
    "NOTHING_TO_COMMIT": _r(_INVALID, "A run commit carries no messages and the run has no earlier commit."),
    "NOT_IMPLEMENTED": _r(
        "UNIMPLEMENTED",
        "The feature (client-side tools, background tasks, WatchEvents) is off on this gateway.",
    ),
    "NO_ANSWER": _r("INTERNAL", "The router's stream ended without a final answer."),
    "NO_CANDIDATE_MODELS": _r(
        "FAILED_PRECONDITION", "Every model of the agent's chain is excluded for this run."
    ),
    "NO_OUTBOX": _r("FAILED_PRECONDITION", "This router has no event outbox (it runs without a database)."),
    "NUL_CHARACTER": _r(_INVALID, "A string field holds a NUL character (U+0000), which cannot be stored."),
    "OUT_OF_RANGE": _r(
        _INVALID, "A number is outside its allowed range (for example above the int64 range)."
    ),
    "PARENT_SESSION_DELETED": _r(
        "CANCELLED", "Task error: cancelled because the session of the task's parent was deleted."
    ),
    "PARENT_SESSION_ENDED": _r(
        "FAILED_PRECONDITION",
        "A task is spawned under a session that has ended; use the key's current session.",
    ),
    "PARENT_SESSION_RESET": _r(
        "CANCELLED", "Task error: cancelled because the session of the task's parent was reset."
    ),
    "PARENT_TASK_ENDED": _r(
        "CANCELLED FAILED_PRECONDITION",
        "The parent task has ended: its subtasks are cancelled (CANCELLED) and no new one may be spawned "
        "(FAILED_PRECONDITION).",
    ),
    "RATE_LIMITED": _r(
        "RESOURCE_EXHAUSTED", "More requests per second for this API key than `gateway.rate_limit_rps`."
    ),
    "ROUTER_DEADLINE": _r(
        "DEADLINE_EXCEEDED", "The run's time budget ran out while the router waited for a model."
    ),
    "RUN_DEADLINE": _r("DEADLINE_EXCEEDED", "The run's time budget is spent (worker)."),
    "RUN_ENDED": _r("FAILED_PRECONDITION", "Tool results were sent for a run that has ended."),
    "RUN_INTERRUPTED": _r("CANCELLED", "Task error: the task's run was cancelled."),
    "RUN_NOT_ACTIVE": _r(
        "FAILED_PRECONDITION",
        "The run token's run is not running at that epoch any more (or already committed).",
    ),
    "RUN_NOT_AWAITING_TOOL_RESULTS": _r(
        "FAILED_PRECONDITION", "Tool results were sent for a run that does not wait for them."
    ),
    "RUN_NOT_FOUND": _r("NOT_FOUND", "No such run in the caller's organization."),
    "RUN_TOKEN_EXPIRED": _r("UNAUTHENTICATED", "The run token has expired."),
    "RUN_TOKEN_INVALID": _r("UNAUTHENTICATED", "The run token's signature or claims are invalid."),
    "RUN_TOKEN_MISSING": _r("UNAUTHENTICATED", "An internal call that needs a run token carries none."),
    "SCOPE_REQUIRED": _r("PERMISSION_DENIED", "The API key lacks the scope this call needs."),
    "SESSION_AGENT_MISMATCH": _r("FAILED_PRECONDITION", "The session key belongs to another agent."),
    "SESSION_BUSY": _r(
        "FAILED_PRECONDITION", "multitask_strategy REJECT: the session already has an active run."
    ),
    "SESSION_CONTENDED": _r("FAILED_PRECONDITION", "Concurrent calls contend for the session key; retry."),
    "SESSION_ENDED": _r(
        "FAILED_PRECONDITION", "The session has ended (reset, deleted, idle...); its key points on."
    ),
    "SESSION_KEY_TOO_LONG": _r(_INVALID, "A session key is longer than `gateway.max_session_key_length`."),
    "SESSION_NOT_FOUND": _r("NOT_FOUND", "No such session (by id or key)."),
    "SESSION_QUEUE_FULL": _r(
        "RESOURCE_EXHAUSTED", "The session has `gateway.max_queued_runs_per_session` active runs already."
    ),
    "SNAPSHOT_TOO_LARGE": _r(
        "RESOURCE_EXHAUSTED", "The transcript would exceed `sessions.max_snapshot_bytes`."
    ),
    "TASK_CANCELLED": _r("CANCELLED", "Task error: the task was cancelled by the client (CancelTask)."),
    "TASK_DEPTH_EXCEEDED": _r("RESOURCE_EXHAUSTED", "A task would be nested deeper than `tasks.max_depth`."),
    "TASK_NOT_FOUND": _r("NOT_FOUND", "No such task in the caller's organization."),
    "TASK_QUEUE_TTL_EXPIRED": _r(
        "DEADLINE_EXCEEDED", "Task error: the task waited longer than `tasks.queue_ttl_s` for a slot."
    ),
    "TASK_SESSION_DELETED": _r("CANCELLED", "Task error: the task's own session was deleted."),
    "TASK_SESSION_RESET": _r("CANCELLED", "Task error: the task's own session was reset."),
    "TASK_STALE": _r("DEADLINE_EXCEEDED", "Task error: the task made no progress for `tasks.stale_after_s`."),
    "TEXT_TOO_LONG": _r(_INVALID, "`text` (or a task's `prompt`) is longer than `gateway.max_text_bytes`."),
    "TOKEN_SCOPE_MISMATCH": _r(
        "PERMISSION_DENIED", "The run token is not scoped to this session, run or agent."
    ),
    "TOOL_CALL_ALREADY_ANSWERED": _r("FAILED_PRECONDITION", "A tool call already has a different result."),
    "TOOL_CALL_LIMIT_EXCEEDED": _r(
        "RESOURCE_EXHAUSTED", "The model kept calling tools beyond the run's `max_tool_calls`."
    ),
    "TOOL_NAME_CONFLICT": _r(
        _INVALID, "A client-side tool has the name of one of the agent's server-side tools."
    ),
    "TOOL_NAME_RESERVED": _r(_INVALID, "A client-side tool has the name of a built-in tool."),
    "TOOL_RESULTS_TIMEOUT": _r(
        "DEADLINE_EXCEEDED FAILED_PRECONDITION",
        "The client sent no tool results within `gateway.tool_results_timeout_s`: the run failed "
        "(DEADLINE_EXCEEDED), later results are refused (FAILED_PRECONDITION).",
    ),
    "TOOL_RESULT_TOO_LARGE": _r(_INVALID, "A tool result is larger than `gateway.max_tool_result_bytes`."),
    "TOO_MANY_FOLLOWS": _r(
        "RESOURCE_EXHAUSTED", "A Chat stream already follows `gateway.max_follows_per_chat` runs."
    ),
    "TOO_MANY_ITEMS": _r(_INVALID, "A repeated or map field has more entries than allowed."),
    "TOO_MANY_STREAMS": _r(
        "RESOURCE_EXHAUSTED", "The API key already has `gateway.max_streams_per_key` open streams."
    ),
    "TOO_MANY_TASKS": _r(
        "RESOURCE_EXHAUSTED",
        "The session already has `tasks.max_active_per_parent` pending or running tasks.",
    ),
    "UNKNOWN_EVENT_TYPE": _r(_INVALID, "WatchEvents names an unknown lifecycle event type."),
    "UNKNOWN_MODEL": _r(_INVALID, "A model override is not `provider/model` with a configured provider."),
    "UNKNOWN_TOOL_CALL": _r(_INVALID, "A tool result answers a tool call the run does not wait for."),
    "UNSTORABLE_VALUE": _r(
        _INVALID,
        "The request holds a value the database cannot store (a NUL character, an out-of-range integer).",
    ),
    "VALUE_TOO_LONG": _r(_INVALID, "A string field is longer than its limit."),
    "WORKER_ALREADY_CONNECTED": _r(
        "FAILED_PRECONDITION", "A worker with this `worker_id` is already connected to the hub."
    ),
}

_HEADER = """\
# Error reasons

<!-- Generated from services/common/reasons.py by `python -m runyard.common.reasons`; do not edit. -->

Every failed call carries a `google.rpc.Status` detail whose `ErrorInfo`
has a `reason` (domain `runyard.dev`); a failed run, task or `run.failed`
event carries the same word in its `RunError.reason`. Branch on the reason,
not on the message. Errors are raised as `runyard.common.errors` classes
(docs/architecture.md, "Where new things go"); a new reason needs an entry
in the catalog, which `tests/unit/test_reasons.py` checks.

| reason | gRPC code | meaning |
|---|---|---|
"""


def render() -> str:
    """docs/errors.md: the catalog as a Markdown table, sorted by reason."""
    rows = [
        f"| `{reason}` | {' or '.join(entry.codes)} | {entry.meaning} |\n"
        for reason, entry in sorted(CATALOG.items())
    ]
    return _HEADER + "".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Write docs/errors.md (or ``--output``); with ``--check``, only compare
    and return 1 if the file is missing or stale."""
    parser = argparse.ArgumentParser(prog="python -m runyard.common.reasons", description=main.__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is not current")
    parser.add_argument("--output", type=Path, default=DOCS_PATH, help=f"default: {DOCS_PATH}")
    args = parser.parse_args(argv)
    text = render()
    current = args.output.read_text() if args.output.exists() else None
    if args.check:
        if current != text:
            print(f"{args.output} is stale: run python -m runyard.common.reasons", file=sys.stderr)
            return 1
        return 0
    if current != text:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
