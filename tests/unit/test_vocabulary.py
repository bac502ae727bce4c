"""The typed vocabulary pinned to what it must agree with: run and task
statuses to the ``CHECK`` constraints of the migrations (read from the SQL,
last definition wins), failover reasons to the protobuf enum, and each
TERMINAL / ACTIVE set to its enum."""

from __future__ import annotations

import re

import pytest

from runyard._proto.v1 import common_pb2, worker_hub_pb2
from runyard.gateway import run_status
from runyard.gateway.events import TERMINAL_EVENTS
from runyard.gateway.run_status import RunStatus
from runyard.gateway.tasks import model as task_model
from runyard.gateway.tasks.model import TaskStatus
from runyard.router.failures import RULES, FailoverReason
from runyard.router.policy import DISABLE_REASONS, POLICIES, RETRIES, SWITCHES, Decision
from tests.support import ROOT

_TABLE = re.compile(r"\b(?:CREATE|ALTER)\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?([\w.]+)", re.IGNORECASE)
_CHECK_IN = re.compile(r"CHECK\s*\(\s*(\w+)\s+IN\s*\(([^)]*)\)\s*\)", re.IGNORECASE)


def allowed_values(service: str) -> dict[tuple[str, str], frozenset[str]]:
    """``(table, column) -> values`` of every ``CHECK (column IN (...))`` in
    ``services/<service>/migrations/*.sql``, the later migration winning
    (``ALTER TABLE ... ADD CONSTRAINT`` replaces the earlier check)."""
    found: dict[tuple[str, str], frozenset[str]] = {}
    for path in sorted((ROOT / "services" / service / "migrations").glob("*.sql")):
        sql = re.sub(r"--[^\n]*", "", path.read_text())
        tables = [(m.start(), m.group(1)) for m in _TABLE.finditer(sql)]
        for check in _CHECK_IN.finditer(sql):
            table = [name for start, name in tables if start < check.start()][-1]
            values = frozenset(re.findall(r"'([^']*)'", check.group(2)))
            found[(table, check.group(1))] = values
    return found


def test_the_migration_parser_reads_the_latest_constraint() -> None:
    checks = allowed_values("gateway")
    # 0001 allowed five statuses; 0007 replaced the constraint with six.
    assert "requires_action" in checks[("gateway.runs", "status")]
    assert checks[("gateway.tasks", "notify_state")] == {"none", "pending", "batched", "skipped"}


def test_run_status_is_what_gateway_runs_allows() -> None:
    assert set(RunStatus) == allowed_values("gateway")[("gateway.runs", "status")]


def test_task_status_is_what_gateway_tasks_allows() -> None:
    assert set(TaskStatus) == allowed_values("gateway")[("gateway.tasks", "status")]


@pytest.mark.parametrize(
    ("enum", "terminal", "active"),
    [
        (RunStatus, run_status.TERMINAL, run_status.ACTIVE),
        (TaskStatus, task_model.TERMINAL, task_model.ACTIVE),
    ],
)
def test_terminal_and_active_split_each_status_enum(
    enum: type, terminal: frozenset, active: frozenset
) -> None:
    assert terminal <= set(enum) and active <= set(enum)
    assert not terminal & active
    assert terminal | active == set(enum)


def test_run_status_maps_to_the_protobuf_enum_by_name() -> None:
    assert set(run_status.TO_PROTO) == set(RunStatus)
    for status, value in run_status.TO_PROTO.items():
        assert common_pb2.RunStatus.Name(value) == f"RUN_STATUS_{status.name}"


def test_task_status_maps_to_the_protobuf_enum_by_name() -> None:
    statuses = task_model.TO_PROTO
    assert set(statuses) == set(TaskStatus)
    for status, value in statuses.items():
        assert common_pb2.TaskStatus.Name(value) == f"TASK_STATUS_{status.name}"


def test_terminal_run_events_are_the_terminal_statuses_and_oneof_members() -> None:
    assert TERMINAL_EVENTS == set(run_status.TERMINAL)
    event_oneof = {f.name for f in common_pb2.RunEvent.DESCRIPTOR.oneofs_by_name["event"].fields}
    outcome_oneof = {
        f.name for f in worker_hub_pb2.WorkerRunResult.DESCRIPTOR.oneofs_by_name["outcome"].fields
    }
    assert TERMINAL_EVENTS <= event_oneof
    assert TERMINAL_EVENTS <= outcome_oneof
    assert RunStatus.REQUIRES_ACTION in outcome_oneof


def test_failover_reasons_are_the_protobuf_enum_without_its_prefix() -> None:
    names = {name.removeprefix("FAILOVER_REASON_") for name in common_pb2.FailoverReason.keys()}
    assert set(FailoverReason) == names - {"UNSPECIFIED"}
    assert all(reason.value == reason.name for reason in FailoverReason)


def test_every_failover_reason_has_a_policy_and_the_rules_use_only_reasons() -> None:
    assert set(POLICIES) == set(FailoverReason)
    assert all(policy.reason == reason for reason, policy in POLICIES.items())
    assert {rule.reason for rule in RULES} <= set(FailoverReason)
    assert DISABLE_REASONS <= set(FailoverReason)


def test_decision_groups_are_decisions() -> None:
    assert SWITCHES <= set(Decision) and RETRIES <= set(Decision)
    assert not SWITCHES & RETRIES
    assert all(decision.value == decision.name.lower() for decision in Decision)


def test_members_compare_equal_to_the_stored_strings() -> None:
    assert RunStatus.RUNNING == "running" and "running" in run_status.ACTIVE
    assert TaskStatus.ERROR == "error" and "error" in task_model.TERMINAL
    assert f"{RunStatus.CANCELLED}" == "cancelled" and str(FailoverReason.RATE_LIMIT) == "RATE_LIMIT"
