"""The decision table and the cooldown state machine (pure functions)."""

from __future__ import annotations

import pytest

from runyard.common.config import RouterConfig
from runyard.router.cooldowns import (
    COOLING,
    DISABLED,
    OK,
    CooldownKey,
    CooldownState,
    CooldownStore,
    Failure,
    Schedules,
    cleared_state,
    next_state,
)
from runyard.router.failures import FailoverReason
from runyard.router.policy import POLICIES, policy_for

HOUR = 3600.0
KEY = CooldownKey("p", "a", "m")


@pytest.mark.parametrize(
    ("reason", "retry_same", "rotate", "next_model", "scope", "schedule", "retryable"),
    [
        (FailoverReason.RATE_LIMIT, "retry_after", "once", "yes", "model_or_profile", "standard", True),
        (FailoverReason.OVERLOADED, "backoff", "no", "yes", "model", "transient", True),
        (FailoverReason.SERVER_ERROR, "backoff", "no", "yes", "model", "transient", True),
        (FailoverReason.TIMEOUT, "backoff_if_last", "no", "yes", "model", "transient", True),
        (FailoverReason.NETWORK, "backoff", "no", "yes", "model", "transient", True),
        (FailoverReason.AUTH, "no", "all", "yes", "profile", "standard", False),
        (FailoverReason.AUTH_PERMANENT, "no", "all", "yes", "profile", "disable", False),
        (FailoverReason.BILLING, "no", "all", "yes", "profile", "disable", False),
        (FailoverReason.MODEL_NOT_FOUND, "no", "no", "yes", "model", "standard", False),
        (FailoverReason.ENDPOINT_NOT_FOUND, "no", "no", "abort", "none", "none", False),
        (FailoverReason.FORMAT, "no", "no", "abort", "none", "none", False),
        (FailoverReason.CONTEXT_OVERFLOW, "no", "no", "context_window_chain", "none", "none", False),
        (FailoverReason.CONTENT_POLICY, "no", "no", "content_policy_chain", "none", "none", False),
        (FailoverReason.UNKNOWN, "no", "no", "yes", "none", "none", True),
    ],
)
def test_decision_table_row(reason, retry_same, rotate, next_model, scope, schedule, retryable):
    policy = policy_for(reason)
    row = (
        policy.retry_same,
        policy.rotate,
        policy.next_model,
        policy.scope,
        policy.schedule,
        policy.retryable,
    )
    assert row == (retry_same, rotate, next_model, scope, schedule, retryable)


def test_every_reason_has_a_row():
    reasons = {name for name in vars(FailoverReason) if name.isupper()}
    assert set(POLICIES) == reasons
    assert policy_for("SOMETHING_NEW") is POLICIES[FailoverReason.UNKNOWN]


def schedules(**overrides: object) -> Schedules:
    return Schedules(RouterConfig(**overrides))


def fail(
    reason: str,
    at: float,
    *,
    started: float | None = None,
    retry_after: float | None = None,
    repeat: bool = False,
) -> Failure:
    return Failure(
        reason, f"{reason} at {at}", retry_after, at if started is None else started, at, repeat=repeat
    )


def test_standard_schedule_doubles_to_the_cap():
    s = schedules()
    assert [s.duration("standard", n) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    assert [s.duration("transient", n) for n in range(1, 6)] == [5, 10, 20, 40, 60]


def test_billing_disables_for_5h_doubling_to_24h():
    s = schedules()
    state = None
    now = 1_000_000.0
    ends = []
    for _ in range(4):
        state = next_state(state, KEY, fail(FailoverReason.BILLING, now), s)
        ends.append(state.until - now)
        assert state.health == DISABLED
        now = state.until + 60  # the probe after the disable fails again
    assert ends == [5 * HOUR, 10 * HOUR, 20 * HOUR, 24 * HOUR]


def test_failure_during_cooldown_extends_and_escalates():
    s = schedules()
    first = next_state(None, KEY, fail(FailoverReason.RATE_LIMIT, 100.0), s)
    assert (first.health, first.until, first.failure_count) == (COOLING, 130.0, 1)
    # A probe that started during the cooldown fails: count 2, 60 s from now.
    second = next_state(first, KEY, fail(FailoverReason.RATE_LIMIT, 110.0), s)
    assert (second.until, second.failure_count) == (170.0, 2)
    # Never shortens: a short transient failure on the same key keeps the end.
    third = next_state(second, KEY, fail(FailoverReason.SERVER_ERROR, 111.0), s)
    assert (
        third.until == 170.0 and third.failure_count == 3 and third.last_reason == FailoverReason.SERVER_ERROR
    )


def test_in_flight_attempt_from_before_the_failure_does_not_escalate():
    s = schedules()
    first = next_state(None, KEY, fail(FailoverReason.RATE_LIMIT, 100.0), s)
    # Started at 99 (before the recorded failure at 100), failed at 101.
    late = next_state(first, KEY, fail(FailoverReason.RATE_LIMIT, 101.0, started=99.0), s)
    assert (late.until, late.failure_count) == (130.0, 1)
    # ... but its longer Retry-After still extends the cooldown.
    longer = next_state(
        first, KEY, fail(FailoverReason.RATE_LIMIT, 101.0, started=99.0, retry_after=100.0), s
    )
    assert (longer.until, longer.failure_count) == (201.0, 1)


def test_one_request_escalates_a_key_once():
    s = schedules()
    first = next_state(None, KEY, fail(FailoverReason.RATE_LIMIT, 100.0, retry_after=1.0), s)
    # The same request's retry 1 s later fails on the same key: extended, not escalated.
    retried = next_state(first, KEY, fail(FailoverReason.RATE_LIMIT, 101.0, retry_after=1.0, repeat=True), s)
    assert (retried.failure_count, retried.until) == (1, 131.0)
    # The next request (a new incident) escalates.
    later = next_state(retried, KEY, fail(FailoverReason.RATE_LIMIT, 140.0), s)
    assert (later.failure_count, later.until) == (2, 200.0)


def test_retry_after_overrides_when_longer():
    s = schedules()
    assert next_state(None, KEY, fail(FailoverReason.RATE_LIMIT, 0.0, retry_after=90.0), s).until == 90.0
    assert next_state(None, KEY, fail(FailoverReason.RATE_LIMIT, 0.0, retry_after=5.0), s).until == 30.0


def test_count_restarts_after_the_failure_window():
    s = schedules(failure_window_s=600)
    first = next_state(None, KEY, fail(FailoverReason.RATE_LIMIT, 0.0), s)
    soon = next_state(first, KEY, fail(FailoverReason.RATE_LIMIT, first.until + 599), s)
    assert soon.failure_count == 2
    later = next_state(first, KEY, fail(FailoverReason.RATE_LIMIT, first.until + 601), s)
    assert (later.failure_count, later.until - (first.until + 601)) == (1, 30.0)


def test_a_disabled_profile_stays_disabled_when_a_transient_error_adds_to_it():
    s = schedules()
    disabled = next_state(None, KEY, fail(FailoverReason.AUTH_PERMANENT, 0.0), s)
    after = next_state(disabled, KEY, fail(FailoverReason.TIMEOUT, 10.0), s)
    assert after.health == DISABLED and after.until == disabled.until


def test_no_cooldown_reasons_are_refused():
    with pytest.raises(ValueError):
        next_state(None, KEY, fail(FailoverReason.FORMAT, 0.0), schedules())


def test_success_clears_unless_it_started_before_the_failure():
    state = next_state(None, KEY, fail(FailoverReason.RATE_LIMIT, 100.0), schedules())
    assert cleared_state(state, attempt_started_at=99.0) is None
    cleared = cleared_state(state, attempt_started_at=101.0)
    assert cleared is not None
    assert (cleared.health, cleared.until, cleared.failure_count, cleared.last_reason) == (
        OK,
        None,
        0,
        FailoverReason.RATE_LIMIT,
    )
    assert cleared_state(cleared, 200.0) is None
    assert cleared_state(None, 200.0) is None


def test_state_health_follows_the_clock():
    state = CooldownState(KEY, health=COOLING, until=50.0, failure_count=1)
    assert state.health_at(49.0) == COOLING and state.health_at(50.0) == OK


def test_memory_store_blocks_the_right_keys():
    store = CooldownStore(RouterConfig())
    now = 1_000.0
    store.record_failure(CooldownKey("p", "a", "m1"), fail(FailoverReason.RATE_LIMIT, now))
    store.record_failure(CooldownKey("p", "a", "broken"), fail(FailoverReason.SERVER_ERROR, now))
    store.record_failure(
        CooldownKey("p", "", "gone"), fail(FailoverReason.MODEL_NOT_FOUND, now)
    )  # an older row
    store.record_failure(CooldownKey("p", "b", ""), fail(FailoverReason.AUTH, now))
    assert store.blocking("p", "a", "m1", now + 1) is not None
    assert store.blocking("p", "a", "m2", now + 1) is None  # sibling model stays usable
    assert store.blocking("p", "b", "m2", now + 1) is not None  # whole profile b
    assert store.blocking("p", "a", "gone", now + 1) is not None  # every profile
    assert store.blocking("p", "a", "m1", now + 31) is None  # expired
    store.record_success("p", "a", "m1", attempt_started_at=now + 1)
    assert store.get(CooldownKey("p", "a", "m1")).failure_count == 0
    # A success on one model never clears another model's state on the same key.
    store.record_success("p", "a", "m2", attempt_started_at=now + 1)
    assert store.blocking("p", "a", "broken", now + 2) is not None
