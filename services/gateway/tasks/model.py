"""The vocabulary of background tasks and the rules that need no I/O:
statuses, limits, concurrency keys, the spawn request and its checks, the
``Task`` message and lifecycle events built from a row, the payload of a
task's run, and which models a retry leaves out.

Rows are ``gateway.tasks`` records (:data:`runyard.gateway.tasks.store.COLUMNS`).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from runyard._proto.v1 import common_pb2
from runyard.common.config import Config
from runyard.common.errors import InvalidArgument, NotFound
from runyard.common.protoutil import now, parse_uuid, timestamp

__all__ = [
    "ACTIVE",
    "BATCH",
    "MAX_EVENTS_SCANNED",
    "TASK_KEY_PREFIX",
    "TERMINAL",
    "TO_PROTO",
    "Activity",
    "Duplicate",
    "Effects",
    "SpawnRequest",
    "TaskStatus",
    "chain_of",
    "concurrency_key",
    "error_of",
    "excerpt",
    "failover_notices",
    "lifecycle_event",
    "normalise_notice",
    "request_fingerprint",
    "retry_exclusions",
    "slot_limit",
    "task_proto",
    "task_run_payload",
    "validate_spawn",
]


class TaskStatus(enum.StrEnum):
    """The status of a background task, as stored in ``gateway.tasks.status``
    (the ``CHECK`` of migration 0004; members compare equal to those strings)."""

    #: Waits for a concurrency slot.
    PENDING = "pending"
    #: Its run is queued or executing (or it waits for its subtasks, without a slot).
    RUNNING = "running"
    COMPLETED = "completed"
    #: Failed for good (its run failed and no retry is left, or no run could be queued).
    ERROR = "error"
    #: Cancelled: by a caller, with its parent task, or with its (parent) session.
    CANCELLED = "cancelled"
    #: Its run was cancelled, or its run's worker was lost on every attempt.
    INTERRUPTED = "interrupted"


#: Statuses of a task that has not ended.
ACTIVE: frozenset[TaskStatus] = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING})
#: Statuses a task never leaves.
TERMINAL: frozenset[TaskStatus] = frozenset(TaskStatus) - ACTIVE
#: The ``runyard.v1.TaskStatus`` value of each status.
TO_PROTO: dict[TaskStatus, common_pb2.TaskStatus] = {
    TaskStatus.PENDING: common_pb2.TASK_STATUS_PENDING,
    TaskStatus.RUNNING: common_pb2.TASK_STATUS_RUNNING,
    TaskStatus.COMPLETED: common_pb2.TASK_STATUS_COMPLETED,
    TaskStatus.ERROR: common_pb2.TASK_STATUS_ERROR,
    TaskStatus.CANCELLED: common_pb2.TASK_STATUS_CANCELLED,
    TaskStatus.INTERRUPTED: common_pb2.TASK_STATUS_INTERRUPTED,
}
_MAX_DESCRIPTION = 500
_MAX_IDEMPOTENCY_KEY = 255
#: Rows one statement of the loop handles at most.
BATCH = 100
#: Run events read per ended run for its failover notices.
MAX_EVENTS_SCANNED = 20_000
#: A task's session key is the prefix and the task id.
TASK_KEY_PREFIX = "task:"

_FAILOVER_REASONS = {v: k.removeprefix("FAILOVER_REASON_") for k, v in common_pb2.FailoverReason.items()}


# ---------------------------------------------------------------- keys and limits


def concurrency_key(config: Config, model_ref: str) -> str:
    """The concurrency key of a task running ``model_ref`` ("provider/model"):
    ``model:<ref>``, else ``provider:<name>``, else ``default``."""
    concurrency = config.tasks.concurrency
    if model_ref in concurrency.models:
        return f"model:{model_ref}"
    provider = model_ref.split("/", 1)[0]
    if provider in concurrency.providers:
        return f"provider:{provider}"
    return "default"


def slot_limit(config: Config, key: str) -> int:
    """Slots of ``key`` (0 = unlimited)."""
    concurrency = config.tasks.concurrency
    kind, _, name = key.partition(":")
    if kind == "model" and name in concurrency.models:
        return concurrency.models[name]
    if kind == "provider" and name in concurrency.providers:
        return concurrency.providers[name]
    return concurrency.default


# ---------------------------------------------------------------- text


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SPACE = re.compile(r"\s+")


def normalise_notice(text: str) -> str:
    """A notice with what varies between repeats of the same problem (ids,
    numbers such as Retry-After seconds, case, spacing) folded away."""
    folded = _UUID.sub("<id>", text.lower())
    folded = _NUMBER.sub("<n>", folded)
    return _SPACE.sub(" ", folded).strip()


def excerpt(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters (an ellipsis marks a cut)."""
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: max(limit - 1, 1)].rstrip() + "…"


def request_fingerprint(parts: Iterable[str]) -> bytes:
    """SHA-256 of ``parts`` (NUL-separated): what an idempotency key was used for."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.digest()


def error_of(row: Any) -> common_pb2.RunError:
    """The ``RunError`` stored in a row's ``error`` column (empty when NULL)."""
    error = common_pb2.RunError()
    if row["error"] is not None:
        error.ParseFromString(bytes(row["error"]))
    return error


# ---------------------------------------------------------------- spawn requests


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """A request to spawn a task (public API or the ``spawn_task`` tool)."""

    parent_session_id: str = ""
    parent_session_key: str = ""
    agent_id: str = ""
    prompt: str = ""
    description: str = ""
    model: str = ""
    max_tool_calls: int = 0
    idempotency_key: str = ""

    def fingerprint(self) -> bytes:
        """What the request asks for (an idempotency key reused for another request is refused)."""
        return request_fingerprint(
            [
                self.parent_session_id,
                self.parent_session_key,
                self.agent_id,
                self.prompt,
                self.description,
                self.model,
                str(self.max_tool_calls),
            ]
        )


def _check_prompt(config: Config, prompt: str) -> None:
    if not prompt.strip():
        raise InvalidArgument("prompt must not be empty", reason="EMPTY_PROMPT", field="prompt")
    size = len(prompt.encode("utf-8"))
    limit = config.gateway.max_text_bytes
    if size > limit:
        raise InvalidArgument(
            f"prompt is {size} bytes; the limit is {limit} (gateway.max_text_bytes)",
            reason="TEXT_TOO_LONG",
            field="prompt",
        )


def _description(request: SpawnRequest) -> str:
    description = request.description.strip()
    if len(description) > _MAX_DESCRIPTION:
        raise InvalidArgument(
            f"description is {len(description)} characters; the limit is {_MAX_DESCRIPTION}",
            reason="DESCRIPTION_TOO_LONG",
            field="description",
        )
    return description or excerpt(request.prompt.strip().splitlines()[0], 80)


def _check_choices(config: Config, request: SpawnRequest) -> None:
    if request.model:
        provider = request.model.split("/", 1)[0]
        if "/" not in request.model or provider not in config.providers:
            raise InvalidArgument(
                f"model {request.model!r} must be 'provider/model' with a configured provider",
                reason="UNKNOWN_MODEL",
                field="model",
            )
    limit = config.tasks.max_tool_calls_limit
    if request.max_tool_calls > limit:
        raise InvalidArgument(
            f"max_tool_calls is {request.max_tool_calls}; the limit is {limit} (tasks.max_tool_calls_limit)",
            reason="MAX_TOOL_CALLS_TOO_LARGE",
            field="max_tool_calls",
        )
    if request.agent_id and request.agent_id not in config.agents:
        raise NotFound(
            f"agent {request.agent_id!r} is not configured", reason="AGENT_NOT_FOUND", field="agent_id"
        )


def _check_ids(request: SpawnRequest) -> None:
    if len(request.idempotency_key) > _MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(
            f"idempotency_key is longer than {_MAX_IDEMPOTENCY_KEY} characters",
            reason="IDEMPOTENCY_KEY_TOO_LONG",
            field="idempotency_key",
        )
    if request.parent_session_id:
        parse_uuid(request.parent_session_id, "parent_session_id", what="session id")
    elif not request.parent_session_key:
        raise InvalidArgument(
            "parent_session_id or parent_session_key is required",
            reason="MISSING_FIELD",
            field="parent_session_id",
        )


def validate_spawn(config: Config, request: SpawnRequest) -> tuple[str, str]:
    """Check a spawn request; returns ``(description, model ref or "")``.

    The description defaults to the prompt's first line (80 characters).

    Raises:
        InvalidArgument: empty or oversized prompt (EMPTY_PROMPT,
            TEXT_TOO_LONG), description over 500 characters, a model that is
            not ``provider/model`` of a configured provider, max_tool_calls
            over ``tasks.max_tool_calls_limit``, an idempotency key over 255
            characters, a bad or missing parent id.
        NotFound: the agent is not configured (AGENT_NOT_FOUND).
    """
    _check_prompt(config, request.prompt)
    description = _description(request)
    _check_choices(config, request)
    _check_ids(request)
    return description, request.model


# ---------------------------------------------------------------- transactions' after-effects


@dataclass(slots=True)
class Effects:
    """What to do once a transaction committed."""

    cancel_runs: list[tuple[str, uuid.UUID, str]] = field(default_factory=list)
    #: Keys that freed a slot: granted before the transaction commits.
    grant_keys: set[str] = field(default_factory=set)
    runs_queued: bool = False
    events: bool = False
    changed: bool = False

    def merge(self, other: Effects) -> None:
        """Add ``other``'s effects to these."""
        self.cancel_runs += other.cancel_runs
        self.grant_keys |= other.grant_keys
        self.runs_queued |= other.runs_queued
        self.events |= other.events
        self.changed |= other.changed


class Duplicate(Exception):
    """An idempotent repeat found inside the spawn transaction."""

    def __init__(self, task_id: uuid.UUID):
        super().__init__(str(task_id))
        self.task_id = task_id


class Activity:
    """The loop's wake-up and whether there is anything to do, shared by the
    parts of one gateway's background tasks.

    ``idle``: no task is active and no notification is open anywhere (as of
    the last full sweep, or until something here changes): run changes and
    claims then cost nothing. Another replica's spawn is seen at the next
    full sweep (``tasks.sweep_interval_ms``).
    """

    def __init__(self) -> None:
        self.wakeup = asyncio.Event()
        self.idle = False

    def wake(self) -> None:
        """Have the loop look at tasks soon."""
        self.wakeup.set()

    def changed(self) -> None:
        """Something here changed: not idle any more, and the loop looks soon."""
        self.idle = False
        self.wakeup.set()


# ---------------------------------------------------------------- messages from rows


def task_proto(row: Any, notices: Sequence[Any] = ()) -> common_pb2.Task:
    """A ``Task`` message from a ``gateway.tasks`` row (and its ``gateway.task_notices`` rows)."""
    task = common_pb2.Task(
        id=str(row["id"]),
        parent_session_id=str(row["parent_session_id"]),
        session_id=str(row["session_id"]),
        session_key=row["session_key"],
        agent_id=row["agent_id"],
        status=TO_PROTO[row["status"]],
        description=row["description"],
        prompt=row["prompt"],
        model=row["model"],
        result=row["result"],
        parent_task_id=str(row["parent_task_id"] or ""),
        run_id=str(row["run_id"] or ""),
        max_tool_calls=row["max_tool_calls"],
        concurrency_key=row["concurrency_key"],
        attempt=row["attempt"],
        depth=row["depth"],
        exclude_models=list(row["exclude_models"] or ()),
        create_time=timestamp(row["created_at"]),
    )
    if row["started_at"] is not None:
        task.start_time.FromDatetime(row["started_at"])
    if row["ended_at"] is not None:
        task.end_time.FromDatetime(row["ended_at"])
    if row["error"] is not None:
        task.error.ParseFromString(bytes(row["error"]))
    for notice in notices:
        task.notices.add(
            attempt=notice["attempt"], message=notice["message"], time=timestamp(notice["created_at"])
        )
    return task


def lifecycle_event(row: Any, kind: str, source: str) -> common_pb2.LifecycleEvent:
    """The ``task.*`` lifecycle event ``kind`` of a task row, from gateway ``source``."""
    # Like message events (which carry a length), no conversation text:
    # the prompt and result are read with GetTask. Each is up to
    # gateway.max_text_bytes, and every event is kept and replayed.
    task = task_proto(row)
    task.ClearField("prompt")
    task.ClearField("result")
    return common_pb2.LifecycleEvent(
        type=kind,
        time=now(),
        org_id=row["org_id"],
        session_id=str(row["session_id"]),
        session_key=row["session_key"],
        agent_id=row["agent_id"],
        run_id=str(row["run_id"] or ""),
        task_id=str(row["id"]),
        source=source,
        task=common_pb2.TaskLifecycleData(task=task),
    )


def task_run_payload(
    row: Any, *, run_id: uuid.UUID, attempt: int, text: str, messages: Sequence[common_pb2.Message]
) -> common_pb2.RunPayload:
    """The payload of attempt ``attempt`` of a task's run: ``text`` (the
    prompt, or empty for a follow-up) and ``messages`` (notifications)."""
    return common_pb2.RunPayload(
        run_id=str(run_id),
        org_id=row["org_id"],
        session_id=str(row["session_id"]),
        session_key=row["session_key"],
        agent_id=row["agent_id"],
        input=common_pb2.RunInput(text=text, messages=list(messages)),
        model=common_pb2.ModelPreferences(
            model=row["model"], exclude_models=list(row["exclude_models"] or ())
        ),
        options=common_pb2.RunOptions(max_tool_calls=row["max_tool_calls"]),
        parent_session_id=str(row["parent_session_id"]),
        task_id=str(row["id"]),
        create_time=now(),
        idempotency_key=f"runyard.task:{row['id']}:{attempt}",
        metadata={"runyard.task_id": str(row["id"])},
    )


# ---------------------------------------------------------------- retries


def failover_notices(
    events: Iterable[common_pb2.RunEvent],
) -> tuple[list[common_pb2.ModelFailover], list[str]]:
    """A run's failovers and one notice line per failover
    (``from -> to (REASON): message``)."""
    failovers = [e.model_failover for e in events if e.HasField("model_failover")]
    notices = [
        f"{f.from_model} -> {f.to_model} ({_FAILOVER_REASONS.get(f.reason, 'UNKNOWN')}): {f.message}"
        for f in failovers
    ]
    return failovers, notices


def retry_exclusions(
    row: Any,
    error: common_pb2.RunError,
    failovers: Iterable[common_pb2.ModelFailover],
    cooling: set[str] | None,
) -> list[str]:
    """The models the retry of a task leaves out: every model that failed
    (in a failover, in the error, or before) and is still cooling down per
    the router (``cooling``; None when it cannot be asked: every one that failed)."""
    failed = {f.from_model for f in failovers if f.from_model}
    if error.metadata.get("model"):
        failed.add(error.metadata["model"])
    failed |= set(row["exclude_models"] or ())
    return sorted(failed if cooling is None else failed & cooling)


def chain_of(config: Config, row: Any) -> list[str]:
    """The models a task may use, first choice first: its own model, then its agent's chain."""
    agent = config.agent(row["agent_id"])
    chain = list(agent.chain) if agent is not None else []
    if row["model"]:
        chain = [row["model"], *[m for m in chain if m != row["model"]]]
    return chain
