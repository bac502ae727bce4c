"""The failover engine in process, against fault-injecting providers on
loopback and a real PostgreSQL: one test per decision row, stalls, cuts,
Retry-After, probes, the shared deadline, profile rotation, cooldown
extension and clearing, replicas sharing state."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from runyard._proto.v1 import common_pb2
from runyard.common.config import RouterConfig
from runyard.common.errors import DeadlineExceeded, FailedPrecondition, Unavailable
from runyard.router.cooldowns import CooldownKey
from runyard.router.failures import FailoverReason
from tests.fakes.anthropic_server import AnthropicReply, FakeAnthropic, anthropic_error
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.support import router as support
from tests.support.router import NotFoundServer, failovers, kinds, payload, text_of

# Fixtures shared by the router tests.
router_factory = support.router_factory
fast_openai = support.fast_openai

pytestmark = pytest.mark.timeout(60)

NOT_FOUND = (
    '{"error": {"message": "The model `%s` does not exist", "type": "invalid_request_error", '
    '"code": "model_not_found"}}'
)
RATE_LIMITED = (
    '{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}'
)


def reason(name: str) -> int:
    return common_pb2.FailoverReason.Value(f"FAILOVER_REASON_{name}")


def setup(
    fake: FakeOpenAI,
    chain: list[str],
    *,
    profiles: dict[str, str] | None = None,
    router: dict | None = None,
    agent: dict | None = None,
    **extra: Any,
) -> dict[str, Any]:
    provider: dict[str, Any] = {"type": "openai", "base_url": fake.url}
    if profiles:
        provider["auth_profiles"] = profiles
    return {
        "providers": {"fake": provider, **extra.pop("providers", {})},
        "agents": {"default": {"model": chain[0], "fallbacks": chain[1:], **(agent or {})}},
        "router": router or {},
        **extra,
    }


def keys_used(fake: FakeOpenAI, model: str) -> list[str]:
    return [r["_headers"].get("authorization", "").removeprefix("Bearer ") for r in fake.requests_for(model)]


@pytest.fixture
def two_keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("RY_TEST_KEY_A", "key-a")
    monkeypatch.setenv("RY_TEST_KEY_B", "key-b")
    return {"a": "RY_TEST_KEY_A", "b": "RY_TEST_KEY_B"}


# ---------------------------------------------------------------- RATE_LIMIT


async def test_rate_limit_with_short_retry_after_retries_the_same_model_after_waiting(
    router_factory, fast_openai
):
    fast_openai.script("m", Reply(status=429, body=RATE_LIMITED, headers={"retry-after-ms": "300"}))
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/other"]))
    out = await h.generate()

    assert text_of(out) == "Hello from m." and failovers(out) == []
    first, second = fast_openai.requests_for("m")
    assert second["_time"] - first["_time"] >= 0.3
    assert fast_openai.requests_for("other") == []
    events = await h.events()
    assert [(e.model.decision, e.model.reason) for e in events] == [
        ("retry_same_model", reason("RATE_LIMIT"))
    ]
    row = await h.row("fake", "default", "m")
    assert (row["failure_count"], row["until"], row["last_reason"]) == (
        0,
        None,
        "RATE_LIMIT",
    )  # the success cleared it


async def test_rate_limit_rotates_the_profile_once_then_moves_on_and_keeps_sibling_models(
    router_factory, fast_openai, two_keys, monkeypatch
):
    monkeypatch.setenv("RY_TEST_KEY_C", "key-c")
    limited = Reply(status=429, body=RATE_LIMITED, headers={"retry-after": "120"})
    fast_openai.script("m", limited, limited, limited)
    h = await router_factory(
        setup(fast_openai, ["fake/m", "fake/sibling"], profiles={**two_keys, "c": "RY_TEST_KEY_C"})
    )
    before = time.time()
    out = await h.generate()

    assert keys_used(fast_openai, "m") == ["key-a", "key-b"]  # rotated once (c left untried), not forever
    assert text_of(out) == "Hello from sibling."  # same provider, other model: not cooled
    [failover] = failovers(out)
    assert (failover.from_model, failover.to_model, failover.reason) == (
        "fake/m",
        "fake/sibling",
        reason("RATE_LIMIT"),
    )
    decisions = [(e.model.decision, e.model.auth_profile, e.model.to_auth_profile) for e in await h.events()]
    # The sibling gets the least recently used profile, which is the untried c.
    assert decisions == [("rotate_auth_profile", "a", "b"), ("next_model", "b", "c")]
    assert keys_used(fast_openai, "sibling") == ["key-c"]
    for profile in ("a", "b"):
        row = await h.row("fake", profile, "m")  # model-scoped, Retry-After (120 s) beats the 30 s schedule
        assert row["health"] == "cooling" and row["until"].timestamp() >= before + 119
    assert await h.row("fake", "c", "m") is None
    assert await h.row("fake", "a", "") is None and await h.row("fake", "", "m") is None


# ---------------------------------------------------------------- transient reasons


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(status=503, body='{"error": {"message": "Service Unavailable"}}'), "OVERLOADED"),
        (Reply(status=500, body='{"error": {"message": "boom", "type": "server_error"}}'), "SERVER_ERROR"),
        (Reply(cut_after=0), "NETWORK"),
    ],
    ids=["overloaded", "server_error", "network"],
)
async def test_transient_errors_retry_with_backoff_then_succeed(router_factory, fast_openai, reply, expected):
    fast_openai.script("m", reply, reply)
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/other"]))
    out = await h.generate()

    assert text_of(out) == "Hello from m." and failovers(out) == []
    assert len(fast_openai.requests_for("m")) == 3 and fast_openai.requests_for("other") == []
    events = await h.events()
    assert [(e.model.decision, e.model.reason) for e in events] == [
        ("retry_same_model", reason(expected))
    ] * 2
    assert events[1].model.cooldown_key == "fake/default/m"  # that model on that key, briefly
    row = await h.row("fake", "default", "m")
    assert (row["failure_count"], row["health"]) == (0, "ok")  # cleared by the success
    assert await h.row("fake", "default", "") is None  # the key itself never cooled


async def test_a_stall_moves_to_the_next_model_at_once_and_is_retried_only_when_last(
    router_factory, fast_openai
):
    stall = Reply(stall_after=0)
    fast_openai.script("m", stall)
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/other"], router={"ttft_timeout_ms": 300}))
    out = await h.generate()
    assert text_of(out) == "Hello from other."
    assert len(fast_openai.requests_for("m")) == 1  # no same-model retry while another model is left
    assert [f.reason for f in failovers(out)] == [reason("TIMEOUT")]

    # The last model left is retried (with backoff) rather than given up.
    fast_openai.script("last", stall, stall)
    out = await h.generate(payload(model="fake/last", exclude_models=["fake/m", "fake/other"]))
    assert text_of(out) == "Hello from last." and len(fast_openai.requests_for("last")) == 3


async def test_retries_are_bounded_then_next_model_and_that_model_cools_briefly_once(
    router_factory, fast_openai
):
    fast_openai.default("m", Reply(status=502, body="<html>Bad Gateway</html>"))
    fast_openai.script("other", Reply(status=502, body="<html>Bad Gateway</html>"))
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/other"], router={"max_retries": 1}))
    before = time.time()
    out = await h.generate()
    assert len(fast_openai.requests_for("m")) == 2  # one try + max_retries
    assert text_of(out) == "Hello from other."  # same provider, same key: not cooled by m's errors
    assert failovers(out)[0].reason == reason("SERVER_ERROR")
    row = await h.row("fake", "default", "m")
    # One request is one failure: the initial transient cooldown (5 s), however many retries failed.
    assert (row["health"], row["failure_count"]) == ("cooling", 1)
    assert before + 5 <= row["until"].timestamp() <= time.time() + 5
    # other's success cleared other's state, never m's.
    assert (await h.row("fake", "default", "other"))["failure_count"] == 0


async def test_a_5xx_primary_with_a_same_provider_fallback_answers_ten_messages_in_a_row(
    router_factory, fast_openai
):
    fast_openai.default("broken", Reply(status=500, body='{"error": {"message": "boom"}}'))
    provider = {"p": {"type": "openai", "base_url": fast_openai.url}}
    h = await router_factory(setup(fast_openai, ["p/broken", "p/good"], providers=provider))
    answers = [await h.generate() for _ in range(10)]

    assert [text_of(out) for out in answers] == ["Hello from good."] * 10
    # The first message's try and its two retries; then skipped while it cools.
    assert len(fast_openai.requests_for("broken")) == 3
    assert [out[0].model_select.rule for out in answers[1:]] == ["cooldown_skip"] * 9
    assert (await h.row("p", "default", "broken"))["failure_count"] == 1
    assert await h.row("p", "default", "") is None and await h.row("p", "default", "good") is None


async def test_a_429_with_retry_after_cools_only_that_model_for_the_initial_cooldown(
    router_factory, fast_openai
):
    fast_openai.default("m", Reply(status=429, body=RATE_LIMITED, headers={"retry-after": "1"}))
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/sibling"], router={"max_retries": 2}))
    out = await h.generate()
    assert text_of(out) == "Hello from sibling."
    assert len(fast_openai.requests_for("m")) == 3  # waited out Retry-After twice
    row = await h.row("fake", "default", "m")
    # Three 429s in one request: one failure, the initial cooldown (30 s), not 4x.
    assert (row["health"], row["failure_count"]) == ("cooling", 1)
    assert (row["until"] - row["last_failure_at"]).total_seconds() == pytest.approx(30, abs=0.01)
    assert await h.row("fake", "default", "") is None and await h.row("fake", "default", "sibling") is None
    out = await h.generate()  # the sibling on the same key is used at once
    assert (out[0].model_select.model, text_of(out)) == ("fake/sibling", "Hello from sibling.")


async def test_a_key_wide_rate_limit_cools_the_key_and_is_probed_once_per_request(
    router_factory, fast_openai
):
    key_wide = Reply(
        status=429,
        body='{"error": {"code": 429, "message": "Rate limit exceeded: free-models-per-day"}}',
        headers={"retry-after": "90"},
    )
    fast_openai.script("a", key_wide, key_wide)
    h = await router_factory(setup(fast_openai, ["fake/a", "fake/b"], router={"probe_interval_ms": 0}))
    with pytest.raises(Unavailable):
        await h.generate()  # a's 429 cools the whole key, so b (same key) is not tried
    assert [r["model"] for r in fast_openai.requests] == ["a"]
    assert (await h.row("fake", "default", ""))["last_reason"] == "RATE_LIMIT"
    with pytest.raises(Unavailable) as cooling:
        await h.generate()  # one probe of the key (a fails again); b waits on the same key
    assert [r["model"] for r in fast_openai.requests] == ["a", "a"]
    assert cooling.value.reason == "ALL_MODELS_COOLING"


# ---------------------------------------------------------------- AUTH, AUTH_PERMANENT, BILLING


async def test_auth_rotates_through_profiles_and_pins_the_session_to_the_working_one(
    router_factory, fast_openai, two_keys
):
    bad_key = Reply(
        status=401, body='{"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}}'
    )
    fast_openai.script("m", bad_key)
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/other"], profiles=two_keys))
    run = payload(session_id="11111111-1111-1111-1111-111111111111")
    out = await h.generate(run)
    again = await h.generate(payload(session_id=run.session_id))

    assert text_of(out) == text_of(again) == "Hello from m."
    assert keys_used(fast_openai, "m") == ["key-a", "key-b", "key-b"]  # pinned to b after a failed
    [event] = await h.events()
    assert (event.model.decision, event.model.reason) == ("rotate_auth_profile", reason("AUTH"))
    row = await h.row("fake", "a", "")
    assert (row["health"], row["last_reason"]) == ("cooling", "AUTH")


async def test_a_key_the_provider_quotes_back_is_never_logged_or_stored(
    router_factory, fast_openai, monkeypatch, caplog
):
    secret = "sk-live-0123456789abcdef"
    monkeypatch.setenv("RY_TEST_SECRET_KEY", secret)
    fast_openai.script(
        "m", Reply(status=401, body=f'{{"error": {{"message": "Incorrect API key provided: {secret}."}}}}')
    )
    h = await router_factory(
        setup(fast_openai, ["fake/m", "echo/echo"], profiles={"main": "RY_TEST_SECRET_KEY"})
    )
    out = await h.generate()
    assert keys_used(fast_openai, "m") == [secret]  # the key was sent ...
    [failover] = failovers(out)
    [event] = await h.events()
    row = await h.row("fake", "main", "")
    shown = [failover.message, event.model.message, row["last_message"], caplog.text]
    assert "Incorrect API key provided: [redacted]." in failover.message
    assert not [text for text in shown if secret in text]  # ... and appears nowhere after


async def test_auth_with_no_profile_left_moves_to_the_next_model(router_factory, fast_openai):
    fast_openai.script("m", Reply(status=403, body='{"error": {"message": "permission denied"}}'))
    h = await router_factory(setup(fast_openai, ["fake/m", "echo/echo"]))
    out = await h.generate()
    assert text_of(out) == "echo: hi"
    assert [(f.to_model, f.reason) for f in failovers(out)] == [("echo/echo", reason("AUTH"))]


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (402, '{"error": {"code": 402, "message": "Insufficient credits"}}', "BILLING"),
        (401, '{"error": {"message": "This API key has been revoked."}}', "AUTH_PERMANENT"),
    ],
)
async def test_billing_and_revoked_keys_disable_the_profile_for_hours(
    router_factory, fast_openai, two_keys, status, body, expected
):
    fast_openai.script("m", Reply(status=status, body=body))
    h = await router_factory(setup(fast_openai, ["fake/m"], profiles=two_keys))
    before = time.time()
    out = await h.generate()
    assert text_of(out) == "Hello from m." and keys_used(fast_openai, "m") == ["key-a", "key-b"]
    row = await h.row("fake", "a", "")
    assert (row["health"], row["last_reason"]) == ("disabled", expected)
    assert abs(row["until"].timestamp() - (before + 5 * 3600)) < 60
    [state] = [s for s in h.router.status() if (s.profile, s.model) == ("a", "m")]
    assert (state.health, state.last_reason) == ("disabled", expected)


# ---------------------------------------------------------------- MODEL_NOT_FOUND


async def test_model_not_found_cascades_in_milliseconds_and_cools_that_model_on_that_key(
    router_factory, fast_openai, two_keys
):
    fast_openai.default("gone", Reply(status=404, body=NOT_FOUND % "gone"))
    h = await router_factory(setup(fast_openai, ["fake/gone", "fake/next"], profiles=two_keys))
    started = time.perf_counter()
    out = await h.generate()
    elapsed = time.perf_counter() - started

    assert kinds(out)[:2] == ["model_select", "model_failover"]
    assert failovers(out)[0].reason == reason("MODEL_NOT_FOUND") and not failovers(out)[0].restart_output
    assert text_of(out) == "Hello from next."
    assert len(fast_openai.requests_for("gone")) == 1  # no retry, no rotation
    assert elapsed < 3.0  # no backoff; the cascade's own latency is measured by `runyard bench router`
    row = await h.row("fake", "a", "gone")  # that model on that key: another key may have access to it
    assert (row["health"], row["last_reason"]) == ("cooling", "MODEL_NOT_FOUND")
    assert await h.row("fake", "a", "") is None  # the key still serves "next"
    # The next request tries it once with the other key, then it is skipped without a call.
    await h.generate()
    out = await h.generate()
    assert keys_used(fast_openai, "gone") == ["key-a", "key-b"]
    assert out[0].model_select.model == "fake/next" and out[0].model_select.rule == "cooldown_skip"


# ---------------------------------------------------------------- aborts


@pytest.mark.parametrize("status", [404, 405, 200], ids=["404-page", "405", "200-web-page"])
async def test_endpoint_not_found_aborts_naming_the_url_and_cools_nothing(
    router_factory, fast_openai, status
):
    wrong = NotFoundServer(status)
    try:
        config = setup(fast_openai, ["fake/m", "echo/echo"])
        config["providers"]["fake"]["base_url"] = wrong.url
        h = await router_factory(config)
        started = time.perf_counter()
        with pytest.raises(FailedPrecondition) as error:
            await h.generate()
        elapsed = time.perf_counter() - started
    finally:
        wrong.stop()
    assert error.value.reason == "ENDPOINT_NOT_FOUND"
    assert f"{wrong.url}/chat/completions" in error.value.message
    assert f"HTTP {status}" in error.value.message
    assert "providers.fake.base_url" in error.value.message
    assert elapsed < 3.0  # no retries with backoff, no fallback to echo
    assert error.value.metadata["failover_reason"] == "ENDPOINT_NOT_FOUND"
    await h.store.flush()
    assert await h.pool.fetchval("SELECT count(*) FROM router.cooldowns") == 0
    assert [e.model.decision for e in await h.events()] == ["abort"]


async def test_format_error_aborts_naming_the_field(router_factory, fast_openai):
    fast_openai.script(
        "m",
        Reply(
            status=400,
            body='{"error": {"message": "Invalid value for \'temperature\'", '
            '"type": "invalid_request_error", "param": "temperature"}}',
        ),
    )
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/other"]))
    with pytest.raises(FailedPrecondition) as error:
        await h.generate()
    assert error.value.reason == "FORMAT"
    assert "temperature" in error.value.message and fast_openai.url in error.value.message
    assert error.value.metadata["provider_field"] == "temperature"
    assert fast_openai.requests_for("other") == []


# ---------------------------------------------------------------- CONTEXT_OVERFLOW, CONTENT_POLICY


CONTEXT = '{"error": {"message": "maximum context length is 8192 tokens", "code": "context_length_exceeded"}}'
CONTENT = '{"error": {"message": "rejected by our safety system", "code": "content_policy_violation"}}'


@pytest.mark.parametrize(
    ("body", "chain_field", "decision"),
    [
        (CONTEXT, "context_window_chain", "context_window_chain"),
        (CONTENT, "content_policy_chain", "content_policy_chain"),
    ],
)
async def test_special_chains_take_over_and_skip_the_ordinary_fallbacks(
    router_factory, fast_openai, body, chain_field, decision
):
    fast_openai.script("small", Reply(status=400, body=body))
    h = await router_factory(
        setup(fast_openai, ["fake/small", "fake/ordinary"], agent={chain_field: ["fake/special"]})
    )
    out = await h.generate()
    assert text_of(out) == "Hello from special."
    assert fast_openai.requests_for("ordinary") == []
    assert [e.model.decision for e in await h.events()] == [decision]


@pytest.mark.parametrize(("body", "expected"), [(CONTEXT, "CONTEXT_OVERFLOW"), (CONTENT, "CONTENT_POLICY")])
async def test_special_reasons_abort_without_a_chain(router_factory, fast_openai, body, expected):
    fast_openai.script("small", Reply(status=400, body=body))
    h = await router_factory(setup(fast_openai, ["fake/small", "fake/ordinary"]))
    with pytest.raises(FailedPrecondition) as error:
        await h.generate()
    assert error.value.reason == expected
    assert fast_openai.requests_for("ordinary") == []


async def test_unknown_errors_move_on_without_a_cooldown(router_factory, fast_openai):
    fast_openai.script("m", Reply(status=409, body='{"error": {"message": "conflict"}}'))
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/next"]))
    out = await h.generate()
    assert text_of(out) == "Hello from next."
    assert [f.reason for f in failovers(out)] == [reason("UNKNOWN")]
    assert len(fast_openai.requests_for("m")) == 1
    [event] = await h.events()
    assert (event.model.decision, event.model.cooldown_key) == ("next_model", "")
    assert await h.pool.fetchval("SELECT count(*) FROM router.cooldowns") == 0


# ---------------------------------------------------------------- after tokens, stalls


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(chunks=["par", "tial ", "answer"], cut_after=2), "NETWORK"),
        (Reply(chunks=["par", "tial ", "answer"], stall_after=2), "TIMEOUT"),
        (
            Reply(
                chunks=["par", "tial "],
                stream_error={"message": "The server had an error", "type": "server_error"},
            ),
            "SERVER_ERROR",
        ),
    ],
    ids=["cut", "idle-stall", "stream-error"],
)
async def test_failure_after_tokens_restarts_the_answer_on_the_next_model(
    router_factory, fast_openai, reply, expected
):
    fast_openai.script("m", reply)
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/next"], router={"idle_timeout_ms": 300}))
    out = await h.generate()
    assert kinds(out) == [
        "model_select",
        "text_delta",
        "text_delta",
        "model_failover",
        "text_delta",
        "text_delta",
        "text_delta",
        "usage",
        "final",
    ]
    [failover] = failovers(out)
    assert failover.restart_output and failover.reason == reason(expected)
    assert out[-1].final.message.content == "Hello from next."  # the partial text is not part of the answer
    assert len(fast_openai.requests_for("m")) == 1  # no same-model retry once tokens were streamed


async def test_stall_before_the_first_token_is_a_timeout(router_factory, fast_openai):
    fast_openai.script("m", Reply(stall_after=0))
    h = await router_factory(
        setup(fast_openai, ["fake/m", "fake/next"], router={"ttft_timeout_ms": 250, "max_retries": 0})
    )
    started = time.perf_counter()
    out = await h.generate()
    assert 0.25 <= time.perf_counter() - started < 3.0  # the stall is cut at 250 ms, not at a default timeout
    [failover] = failovers(out)
    assert failover.reason == reason("TIMEOUT") and not failover.restart_output


async def test_a_stalled_primary_leaves_the_fallback_its_share_of_a_short_budget(router_factory, fast_openai):
    fast_openai.default("m", Reply(stall_after=0))
    # Default stall timers (30 s): only the 2 s budget limits the wait.
    h = await router_factory(
        setup(
            fast_openai,
            ["fake/m", "fake/next"],
            router={"ttft_timeout_ms": 30_000, "idle_timeout_ms": 30_000},
        )
    )
    started = time.perf_counter()
    out = await h.generate(timeout_s=2.0)
    elapsed = time.perf_counter() - started

    assert text_of(out) == "Hello from next."
    [failover] = failovers(out)
    assert failover.reason == reason("TIMEOUT") and "share of the run's time budget" in failover.message
    assert len(fast_openai.requests_for("m")) == 1
    assert 1.0 <= elapsed < 2.0  # half the budget for m, the answer within the rest
    # Cut short by this run's budget, not by ttft_timeout_ms: m is not cooled for everyone else.
    assert await h.row("fake", "default", "m") is None
    [event] = await h.events()
    assert (event.model.decision, event.model.cooldown_key) == ("next_model", "")


async def test_with_default_timers_a_stall_reaches_the_fallback_after_one_first_token_timeout(
    router_factory, fast_openai
):
    fast_openai.default("m", Reply(stall_after=0))
    defaults = RouterConfig().model_dump(
        include={"max_retries", "retry_backoff_initial_ms", "retry_backoff_max_ms"}
    )
    h = await router_factory(
        setup(fast_openai, ["fake/m", "fake/next"], router={**defaults, "ttft_timeout_ms": 1_000})
    )
    started = time.perf_counter()
    out = await h.generate()
    elapsed = time.perf_counter() - started
    assert text_of(out) == "Hello from next."
    assert len(fast_openai.requests_for("m")) == 1  # not max_retries more stalls before the fallback
    assert 1.0 <= elapsed <= 1.0 + 5
    # A stall of the configured timer is the model's: it cools (briefly).
    assert (await h.row("fake", "default", "m"))["last_reason"] == "TIMEOUT"


async def test_keep_alives_do_not_hide_a_stall(router_factory, fast_openai):
    fast_openai.script("m", Reply(first_token_delay_s=5, keepalive_every_s=0.05))
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/next"], router={"ttft_timeout_ms": 400}))
    out = await h.generate()
    assert text_of(out) == "Hello from next."
    assert [f.reason for f in failovers(out)] == [reason("TIMEOUT")]


async def test_every_attempt_shares_one_deadline(router_factory, fast_openai):
    for model in ("a", "b", "c"):
        fast_openai.default(model, Reply(stall_after=0))
    h = await router_factory(
        setup(fast_openai, ["fake/a", "fake/b", "fake/c"], router={"ttft_timeout_ms": 800})
    )
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded) as error:
        await h.generate(timeout_s=1.0)
    elapsed = time.perf_counter() - started
    # Three models with three attempts each at 0.8 s would take 7.2 s.
    assert 0.95 <= elapsed < 4.0, elapsed
    assert error.value.reason == "ROUTER_DEADLINE"


async def test_config_deadline_applies_when_the_caller_sets_none(router_factory, fast_openai):
    fast_openai.default("a", Reply(stall_after=0))
    h = await router_factory(
        setup(fast_openai, ["fake/a"], router={"ttft_timeout_ms": 5_000, "request_timeout_ms": 600})
    )
    started = time.perf_counter()
    with pytest.raises(DeadlineExceeded):
        await h.generate()
    assert time.perf_counter() - started < 3.0  # 600 ms, not the 5 s first-token timeout


# ---------------------------------------------------------------- cooldowns: probe, extension, clearing


async def test_all_candidates_cooling_probes_the_soonest_then_clears_it(router_factory, fast_openai):
    fast_openai.script("a", Reply(status=429, body=RATE_LIMITED, headers={"retry-after": "90"}))
    fast_openai.script("b", Reply(status=429, body=RATE_LIMITED, headers={"retry-after": "60"}))
    h = await router_factory(setup(fast_openai, ["fake/a", "fake/b"]))
    with pytest.raises(Unavailable) as first:
        await h.generate()
    assert first.value.reason == "ALL_MODELS_FAILED"

    # Both are cooling now: b ends sooner, so b is probed (and works again).
    out = await h.generate()
    assert (out[0].model_select.model, out[0].model_select.rule) == ("fake/b", "cooldown_probe")
    assert text_of(out) == "Hello from b."
    row = await h.row("fake", "default", "b")
    assert (row["health"], row["failure_count"]) == ("ok", 0)
    assert (await h.row("fake", "default", "a"))["health"] == "cooling"


async def test_probes_are_throttled_and_spent_once_per_cooldown_per_request(router_factory, fast_openai):
    limited = Reply(status=429, body=RATE_LIMITED, headers={"retry-after": "90"})
    fast_openai.script("a", limited, limited)
    fast_openai.script("b", limited)
    h = await router_factory(setup(fast_openai, ["fake/a", "fake/b"], router={"probe_interval_ms": 60_000}))
    with pytest.raises(Unavailable):
        await h.generate()  # a and b both rate limited: each cools (its own model key) for 90 s
    calls = len(fast_openai.requests)

    # a ends first, so a is probed; it fails, and b's own cooldown is probed
    # next in the same request (a's failure says nothing about b): it works.
    out = await h.generate()
    assert [r["model"] for r in fast_openai.requests[calls:]] == ["a", "b"]
    assert (out[0].model_select.model, out[0].model_select.rule) == ("fake/a", "cooldown_probe")
    assert text_of(out) == "Hello from b."

    # Only a left (b excluded): probed within probe_interval_ms already, so
    # the request fails at once with a Retry-After.
    calls = len(fast_openai.requests)
    with pytest.raises(Unavailable) as throttled:
        await h.generate(payload(model="fake/a", exclude_models=["fake/b"]))
    assert len(fast_openai.requests) == calls
    assert throttled.value.reason == "ALL_MODELS_COOLING" and throttled.value.retry_after_s > 60


async def test_failed_probe_extends_the_cooldown_without_escalating_it(router_factory, fast_openai):
    limited = Reply(status=429, body=RATE_LIMITED)
    fast_openai.script("a", limited, limited, limited)
    h = await router_factory(setup(fast_openai, ["fake/a"], router={"probe_interval_ms": 0}))
    with pytest.raises(Unavailable):
        await h.generate()
    first = await h.row("fake", "default", "a")
    assert first["failure_count"] == 1
    for _ in range(2):
        with pytest.raises(Unavailable):
            await h.generate()  # the probe fails too
    probed = await h.row("fake", "default", "a")
    # Extended (30 s from the last probe), not escalated: steady traffic must
    # not push a cooldown to its cap within seconds.
    assert probed["failure_count"] == 1
    assert probed["until"] > first["until"]
    assert 29 <= (probed["until"] - probed["last_failure_at"]).total_seconds() <= 31
    out = await h.generate()  # the probe works: cleared
    assert text_of(out) == "Hello from a."
    assert (await h.row("fake", "default", "a"))["failure_count"] == 0


async def test_a_disabled_key_is_never_probed_and_every_later_message_says_billing(
    router_factory, fast_openai
):
    fast_openai.script("a", Reply(status=402, body='{"error": {"message": "Insufficient credits"}}'))
    h = await router_factory(setup(fast_openai, ["fake/a"], router={"probe_interval_ms": 0}))
    with pytest.raises(FailedPrecondition) as first:
        await h.generate()
    assert (first.value.reason, first.value.retryable) == ("ALL_MODELS_FAILED", False)
    assert first.value.message.startswith("every model of agent 'default' failed: fake/a: BILLING (HTTP 402")
    row = await h.row("fake", "default", "")  # billing disables the whole key
    assert row["health"] == "disabled"
    calls = len(fast_openai.requests)
    for _ in range(3):
        with pytest.raises(FailedPrecondition) as later:
            await h.generate()
        # Not a bare "cooling, retry in 5 h": why, that the key is disabled, until when; no retry helps.
        error = later.value
        assert (error.reason, error.retryable, error.retry_after_s) == ("ALL_MODELS_COOLING", False, None)
        assert (
            "fake/a: skipped, BILLING (HTTP 402: Insufficient credits), key disabled until " in error.message
        )
        assert "(in 5.0 h)" in error.message
        assert (error.metadata["models"], error.metadata["reasons"]) == ("fake/a", "BILLING")
        assert error.metadata["failover_reason"] == "BILLING" and error.metadata["until"].endswith("Z")
    assert len(fast_openai.requests) == calls  # no probe reached the provider
    again = await h.row("fake", "default", "")
    assert (again["failure_count"], again["until"]) == (row["failure_count"], row["until"])


async def test_a_key_that_failed_auth_is_not_probed_again_by_the_same_request(router_factory, fast_openai):
    bad_key = Reply(status=401, body='{"error": {"message": "Incorrect API key", "code": "invalid_api_key"}}')
    fast_openai.default("a", bad_key)
    fast_openai.default("b", bad_key)
    h = await router_factory(setup(fast_openai, ["fake/a", "fake/b"], router={"probe_interval_ms": 0}))
    with pytest.raises(FailedPrecondition) as error:
        await h.generate()  # the only key is bad: b (same provider, same key) is not tried with it
    assert [r["model"] for r in fast_openai.requests] == ["a"]
    assert error.value.retryable is False  # a bad key does not fix itself
    assert "fake/a: AUTH (HTTP 401: Incorrect API key), cooling until" in error.value.message
    assert "fake/b: skipped, AUTH" in error.value.message
    row = await h.row("fake", "default", "")
    assert row["failure_count"] == 1


async def test_every_model_failing_is_listed_with_its_reason_and_until_when(router_factory, fast_openai):
    fast_openai.default("a", Reply(status=500, body='{"error": {"message": "boom"}}'))
    fast_openai.default("b", Reply(status=404, body=NOT_FOUND % "b"))
    fast_openai.default("c", Reply(status=429, body=RATE_LIMITED, headers={"retry-after": "40"}))
    h = await router_factory(setup(fast_openai, ["fake/a", "fake/b", "fake/c"], router={"max_retries": 0}))
    with pytest.raises(Unavailable) as failed:
        await h.generate()
    error = failed.value
    assert error.reason == "ALL_MODELS_FAILED" and error.retryable  # a and c may recover
    parts = error.message.split(": ", 1)[1].split("; ")
    assert [p.split(" (")[0] for p in parts] == [
        "fake/a: SERVER_ERROR",
        "fake/b: MODEL_NOT_FOUND",
        "fake/c: RATE_LIMIT",
    ]
    assert all(", cooling until " in p for p in parts)
    assert error.metadata["reasons"] == "SERVER_ERROR,MODEL_NOT_FOUND,RATE_LIMIT"
    assert 4 <= error.retry_after_s <= 5  # a's 5 s cooldown ends first
    # The next request probes each cooldown once (they fail again); the one
    # after that may probe none (probe_interval_ms) and says why for each.
    with pytest.raises(Unavailable):
        await h.generate()
    calls = len(fast_openai.requests)
    with pytest.raises(Unavailable) as cooling:
        await h.generate()
    assert len(fast_openai.requests) == calls
    assert cooling.value.reason == "ALL_MODELS_COOLING"
    assert cooling.value.metadata["reasons"] == "SERVER_ERROR,MODEL_NOT_FOUND,RATE_LIMIT"
    assert cooling.value.message.count(": skipped, ") == 3


async def test_a_skipped_model_says_why(router_factory, fast_openai):
    fast_openai.script("a", Reply(status=429, body=RATE_LIMITED, headers={"retry-after": "90"}))
    h = await router_factory(setup(fast_openai, ["fake/a", "fake/b"]))
    await h.generate()
    out = await h.generate()
    select = out[0].model_select
    assert (select.model, select.rule) == ("fake/b", "cooldown_skip")
    [skip] = select.skipped
    assert (skip.model, skip.reason, skip.disabled, skip.auth_profile) == (
        "fake/a",
        reason("RATE_LIMIT"),
        False,
        "default",
    )
    assert 85 < skip.until.ToSeconds() - time.time() <= 90
    # A failover that passes over a cooling model says why too.
    fast_openai.script("gone", Reply(status=404, body=NOT_FOUND % "gone"))
    out = await h.generate(payload(model="fake/gone"))  # chain: gone, a (cooling), b
    [failover] = failovers(out)
    assert (failover.from_model, failover.to_model) == ("fake/gone", "fake/b")
    assert [(s.model, s.reason) for s in failover.skipped] == [("fake/a", reason("RATE_LIMIT"))]


async def test_primary_is_probed_just_before_its_cooldown_ends(router_factory, fast_openai):
    fast_openai.script("a", Reply(status=429, body=RATE_LIMITED, headers={"retry-after-ms": "2500"}))
    h = await router_factory(
        setup(
            fast_openai,
            ["fake/a", "fake/b"],
            router={
                "cooldown_initial_ms": 1_000,
                "cooldown_max_ms": 10_000,
                "primary_probe_margin_ms": 2_000,
                "probe_interval_ms": 0,
                "max_retry_after_ms": 0,
            },
        )
    )
    out = await h.generate()
    assert text_of(out) == "Hello from b."
    out = await h.generate()  # a cools for 2.5 s more than the margin: skipped
    assert out[0].model_select.rule == "cooldown_skip"
    await asyncio.sleep(0.7)
    out = await h.generate()  # within 2 s of the end: probed early, and it works
    assert (out[0].model_select.model, out[0].model_select.rule) == ("fake/a", "cooldown_probe")


# ---------------------------------------------------------------- replicas, task classes, Anthropic


async def test_replicas_share_cooldowns_through_postgres(router_factory, fast_openai):
    fast_openai.script("a", Reply(status=404, body=NOT_FOUND % "a"))
    config = setup(fast_openai, ["fake/a", "fake/b"])
    one = await router_factory(config, instance="router-1")
    two = await router_factory(config, instance="router-2")
    await one.generate()
    await one.store.flush()
    deadline = time.monotonic() + 3
    while two.store.blocking("fake", "default", "a", time.time()) is None:
        assert time.monotonic() < deadline, "replica two never heard of the cooldown"
        await asyncio.sleep(0.02)
    out = await two.generate()
    assert out[0].model_select.model == "fake/b"
    assert len(fast_openai.requests_for("a")) == 1
    # A replica started later loads the state at start-up.
    three = await router_factory(config, instance="router-3", listen=False)
    assert three.store.blocking("fake", "default", "a", time.time()) is not None


async def test_task_class_picks_the_model_and_is_reported(router_factory, fast_openai):
    h = await router_factory(
        setup(
            fast_openai,
            ["fake/general"],
            agent={"task_models": {"code": "fake/coder"}},
            classifier={"rules": [{"task_class": "code", "has_code": True}]},
        )
    )
    out = await h.generate(text="why does this fail?\n```\nx = 1/0\n```")
    select = out[0].model_select
    assert (select.model, select.task_class, select.rule) == ("fake/coder", "code", "task_class")
    assert text_of(out) == "Hello from coder."
    plain = await h.generate(text="hello")
    assert (plain[0].model_select.model, plain[0].model_select.task_class) == ("fake/general", "")


async def test_anthropic_provider_fails_over_and_streams_with_usage(router_factory, fast_openai):
    claude = FakeAnthropic().start()
    try:
        claude.script(
            "claude-x", AnthropicReply(status=529, body=anthropic_error("overloaded_error", "Overloaded"))
        )
        claude.script(
            "claude-gone",
            AnthropicReply(status=404, body=anthropic_error("not_found_error", "model: claude-gone")),
        )
        h = await router_factory(
            {
                "providers": {"claude": {"type": "anthropic", "base_url": claude.url}},
                "agents": {"default": {"model": "claude/claude-gone", "fallbacks": ["claude/claude-x"]}},
            }
        )
        out = await h.generate()
    finally:
        claude.stop()
    assert [f.reason for f in failovers(out)] == [reason("MODEL_NOT_FOUND")]
    assert text_of(out) == "Hello from claude-x."
    usage = [r.usage for r in out if r.HasField("usage")]
    assert [(u.input_tokens, u.output_tokens) for u in usage] == [(12, 6)]
    assert [e.model.decision for e in await h.events()] == ["next_model", "retry_same_model"]


async def test_a_tool_call_streaming_longer_than_the_stall_timers_is_not_a_stall(router_factory):
    # The tool_use input arrives in two parts 0.25 s apart: 0.5 s from the
    # block's start to its end, longer than either stall timer (0.4 s), while
    # the model never goes quiet for that long.
    claude = FakeAnthropic().start()
    try:
        claude.script(
            "claude-x",
            AnthropicReply(
                chunks=[],
                tool_uses=[
                    {"id": "toolu_1", "name": "write_file", "input": {"path": "a.txt", "body": "x" * 200}}
                ],
                stop_reason="tool_use",
                delay_between_s=0.25,
            ),
        )
        h = await router_factory(
            {
                "providers": {"claude": {"type": "anthropic", "base_url": claude.url}},
                "agents": {"default": {"model": "claude/claude-x", "fallbacks": ["echo/echo"]}},
                "router": {"ttft_timeout_ms": 400, "idle_timeout_ms": 400, "max_retries": 0},
            }
        )
        out = await h.generate()
    finally:
        claude.stop()
    assert failovers(out) == []
    [call] = [r.tool_call for r in out if r.HasField("tool_call")]
    assert (call.name, out[-1].final.model) == ("write_file", "claude/claude-x")


async def test_failover_metrics_count_switches_apart_from_retries_and_aborts(router_factory, fast_openai):
    from runyard.common import metrics

    def value(counter, *labels: str) -> float:
        return counter.labels(*labels)._value.get()

    counters = {
        "switch": (metrics.FAILOVERS_TOTAL, FailoverReason.SERVER_ERROR),
        "retry": (metrics.ROUTER_RETRIES_TOTAL, FailoverReason.SERVER_ERROR, "same_model"),
        "abort": (metrics.ROUTER_ABORTS_TOTAL, FailoverReason.FORMAT, "abort"),
        "404": (metrics.FAILOVERS_TOTAL, FailoverReason.MODEL_NOT_FOUND),
    }
    before = {name: value(*spec) for name, spec in counters.items()}
    fast_openai.script("broken", *[Reply(status=500, body='{"error": {"message": "boom"}}')] * 3)
    fast_openai.script("gone", Reply(status=404, body=NOT_FOUND % "gone"))
    bad = Reply(
        status=400, body='{"error": {"message": "bad", "type": "invalid_request_error", "param": "x"}}'
    )
    fast_openai.script("strict", bad)
    h = await router_factory(setup(fast_openai, ["fake/broken", "fake/gone", "fake/next"]))
    await h.generate()  # broken: try + 2 retries, then a switch; gone: a switch
    with pytest.raises(FailedPrecondition):
        await h.generate(payload(model="fake/strict"))  # an abort
    delta = {name: value(*spec) - before[name] for name, spec in counters.items()}
    assert delta == {"switch": 1, "retry": 2, "abort": 1, "404": 1}
    h.router.update_gauges()
    assert metrics.PROVIDER_STATE.labels("fake", "default", "gone", "cooling")._value.get() == 1
    assert metrics.PROVIDER_STATE.labels("fake", "default", "next", "ok")._value.get() == 1
    assert h.store.get(CooldownKey("fake", "default", "gone")) is not None


async def test_a_consumer_that_goes_away_closes_the_provider_call(router_factory, fast_openai):
    fast_openai.script("m", Reply(chunks=[f"w{i} " for i in range(50)], delay_between_s=0.02))
    h = await router_factory(setup(fast_openai, ["fake/m"]))
    answer = h.router.generate(payload(), [common_pb2.Message(role=common_pb2.ROLE_USER, content="hi")])
    seen = []
    async for response in answer:
        seen.append(response)
        if len(seen) == 3:
            break
    await answer.aclose()
    for _ in range(100):
        if fast_openai.client_gone.is_set():
            break
        await asyncio.sleep(0.01)
    assert fast_openai.client_gone.is_set()


async def test_cancelling_a_waiting_request_is_a_cancellation_not_a_stall(router_factory, fast_openai):
    fast_openai.script("m", Reply(stall_after=0))
    h = await router_factory(setup(fast_openai, ["fake/m", "fake/next"], router={"ttft_timeout_ms": 200}))

    async def consume() -> None:
        async for _ in h.router.generate(
            payload(), [common_pb2.Message(role=common_pb2.ROLE_USER, content="x")]
        ):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)  # waiting for the first token, inside the stall timer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)  # past the stall timer: nothing may fire into a finished task
    assert fast_openai.requests_for("next") == []
    assert await h.events() == []
