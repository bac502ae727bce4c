"""The classification table: one case (or more) per rule, in the providers'
own error shapes, and a check that no rule goes untested."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from runyard.router.failures import RULES, FailoverReason, classify_failure, parse_retry_after
from runyard.router.providers import ProviderError


def err(
    status: int | None = None, body: object = "", headers: dict[str, str] | None = None, **kw: object
) -> ProviderError:
    text = body if isinstance(body, str) else json.dumps(body)
    return ProviderError(
        "call failed", status=status, body=text, headers=headers or {}, url="http://p/v1/x", **kw
    )


def openai(
    message: str,
    type_: str | None = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def anthropic(type_: str, message: str) -> dict:
    return {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_1"}


def openrouter(code: int, message: str, **metadata: object) -> dict:
    return {"error": {"code": code, "message": message, "metadata": metadata}}


# (id, error, reason, rule)
CASES = [
    ("stall-ttft", err(stalled="ttft"), FailoverReason.TIMEOUT, "stall_first_token"),
    ("stall-idle", err(stalled="idle"), FailoverReason.TIMEOUT, "stall_idle"),
    ("read-timeout", err(cause=httpx.ReadTimeout("read")), FailoverReason.TIMEOUT, "transport_timeout"),
    ("asyncio-timeout", err(cause=TimeoutError()), FailoverReason.TIMEOUT, "transport_timeout"),
    (
        "connect-refused",
        err(cause=httpx.ConnectError("[Errno 111] Connection refused")),
        FailoverReason.NETWORK,
        "transport_network",
    ),
    (
        "connect-timeout",
        err(cause=httpx.ConnectTimeout("connect")),
        FailoverReason.NETWORK,
        "transport_network",
    ),
    (
        "reset",
        err(cause=ConnectionResetError(104, "Connection reset by peer")),
        FailoverReason.NETWORK,
        "transport_network",
    ),
    (
        "dns",
        err(cause=socket.gaierror(-2, "Name or service not known")),
        FailoverReason.NETWORK,
        "transport_network",
    ),
    (
        "protocol",
        err(cause=httpx.RemoteProtocolError("incomplete chunked read")),
        FailoverReason.NETWORK,
        "transport_network",
    ),
    ("408", err(408, openrouter(408, "Request timed out")), FailoverReason.TIMEOUT, "http_408"),
    (
        "503-openrouter",
        err(503, openrouter(503, "No available model provider that meets your routing requirements")),
        FailoverReason.OVERLOADED,
        "overloaded",
    ),
    (
        "529-anthropic",
        err(529, anthropic("overloaded_error", "Overloaded")),
        FailoverReason.OVERLOADED,
        "overloaded",
    ),
    (
        "500-overloaded-text",
        err(500, openai("The engine is currently overloaded, please try again later", "server_error")),
        FailoverReason.OVERLOADED,
        "overloaded",
    ),
    (
        "429-openai-insufficient-quota",
        err(
            429,
            openai(
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            ),
        ),
        FailoverReason.BILLING,
        "billing_code",
    ),
    (
        "429-anthropic-spend-limit",
        err(
            429,
            {
                "type": "error",
                "error": {
                    "type": "rate_limit_error",
                    "message": "You have reached your specified API usage limits.",
                    "details": {"error_code": "enforced_spend_limit_reached"},
                },
            },
        ),
        FailoverReason.BILLING,
        "billing_code",
    ),
    (
        "400-anthropic-credit-balance",
        err(
            400,
            anthropic(
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API. "
                "Please go to Plans & Billing to upgrade or purchase credits.",
            ),
        ),
        FailoverReason.BILLING,
        "billing_code",
    ),
    (
        "429-gemini-daily-quota",
        err(
            429,
            [
                {
                    "error": {
                        "code": 429,
                        "message": "You exceeded your current quota, please check your plan and billing "
                        "details. Quota exceeded for metric: generate_content_free_tier_requests, limit: 50. "
                        "Please retry in 41.2s.",
                        "status": "RESOURCE_EXHAUSTED",
                    }
                }
            ],
        ),
        FailoverReason.RATE_LIMIT,
        "rate_limit_resets",
    ),
    (
        "429-quota-resets-monthly",
        err(429, openai("Monthly quota exceeded; your quota resets on the 1st", "requests")),
        FailoverReason.RATE_LIMIT,
        "rate_limit_resets",
    ),
    (
        "429-openai-rpm",
        err(
            429,
            openai(
                "Rate limit reached for gpt-4o on requests per min (RPM): Limit 3, Used 3.",
                "requests",
                "rate_limit_exceeded",
            ),
        ),
        FailoverReason.RATE_LIMIT,
        "rate_limit_resets",
    ),
    (
        "429-retry-after-header",
        err(429, openai("Slow down, please add a payment method", "requests"), {"retry-after": "3"}),
        FailoverReason.RATE_LIMIT,
        "rate_limit_resets",
    ),
    (
        "429-billing-text",
        err(429, openai("Please add a payment method to keep using this model", "requests")),
        FailoverReason.BILLING,
        "billing_text",
    ),
    (
        "429-anthropic-rate-limit",
        err(429, anthropic("rate_limit_error", "Number of concurrent connections exceeded")),
        FailoverReason.RATE_LIMIT,
        "rate_limit",
    ),
    ("429-bare", err(429, "Too Many Requests"), FailoverReason.RATE_LIMIT, "rate_limit"),
    (
        "402-openrouter",
        err(402, openrouter(402, "Insufficient credits. Add more using https://openrouter.ai/credits")),
        FailoverReason.BILLING,
        "http_402",
    ),
    (
        "402-anthropic",
        err(402, anthropic("billing_error", "There is an issue with your payment method")),
        FailoverReason.BILLING,
        "http_402",
    ),
    (
        "401-revoked",
        err(401, openai("This API key has been revoked.", None, "invalid_api_key")),
        FailoverReason.AUTH_PERMANENT,
        "auth_permanent",
    ),
    (
        "403-deactivated",
        err(
            403,
            openai("Your account has been deactivated, please contact support.", None, "account_deactivated"),
        ),
        FailoverReason.AUTH_PERMANENT,
        "auth_permanent",
    ),
    (
        # Access to one model switched off is not a dead key: the profile must not be disabled for hours.
        "403-model-access-disabled",
        err(403, openai("Your organization has disabled access to model gpt-4-32k", None, "model_access")),
        FailoverReason.AUTH,
        "auth",
    ),
    (
        "401-openrouter-disabled",
        err(401, openrouter(401, "API key is disabled")),
        FailoverReason.AUTH_PERMANENT,
        "auth_permanent",
    ),
    (
        "403-openrouter-moderation",
        err(
            403,
            openrouter(
                403,
                'deepseek/deepseek-r1 requires moderation on OpenAI. Your input was flagged for "violence"',
                reasons=["violence"],
                provider_name="OpenAI",
            ),
        ),
        FailoverReason.CONTENT_POLICY,
        "content_policy_403",
    ),
    (
        "401-openai-invalid-key",
        err(
            401,
            openai(
                "Incorrect API key provided: sk-abc***. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            ),
        ),
        FailoverReason.AUTH,
        "auth",
    ),
    (
        "401-anthropic",
        err(401, anthropic("authentication_error", "invalid x-api-key")),
        FailoverReason.AUTH,
        "auth",
    ),
    (
        "403-anthropic",
        err(
            403,
            anthropic(
                "permission_error", "Your API key does not have permission to use the specified resource."
            ),
        ),
        FailoverReason.AUTH,
        "auth",
    ),
    (
        "404-openai-model",
        err(
            404,
            openai(
                "The model `gpt-5-nano-x` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            ),
        ),
        FailoverReason.MODEL_NOT_FOUND,
        "model_not_found",
    ),
    (
        "404-anthropic-model",
        err(404, anthropic("not_found_error", "model: claude-3-opus-20990101")),
        FailoverReason.MODEL_NOT_FOUND,
        "model_not_found",
    ),
    (
        "404-vllm",
        err(
            404,
            {
                "object": "error",
                "message": "The model `Qwen1.5-14B` does not exist.",
                "type": "NotFoundError",
                "param": None,
                "code": 404,
            },
        ),
        FailoverReason.MODEL_NOT_FOUND,
        "model_not_found",
    ),
    (
        "404-ollama",
        err(404, openai('model "llama9" not found, try pulling it first', "api_error")),
        FailoverReason.MODEL_NOT_FOUND,
        "model_not_found",
    ),
    (
        "404-double-encoded",
        err(
            404, {"error": {"message": json.dumps({"error": {"code": "model_not_found", "message": "gone"}})}}
        ),
        FailoverReason.MODEL_NOT_FOUND,
        "model_not_found",
    ),
    (
        "404-html",
        err(404, "<html><body><h1>404 Not Found</h1></body></html>"),
        FailoverReason.ENDPOINT_NOT_FOUND,
        "endpoint_not_found",
    ),
    (
        # A wrong base URL that reaches a model hub's web site: its 404 page
        # mentions "model" and "not found", but an HTML page is never a model error.
        "404-html-page-mentioning-a-model",
        err(
            404,
            "<!DOCTYPE html><html><head><title>Model hub</title></head>"
            "<body><h1>Model page not found</h1></body></html>",
        ),
        FailoverReason.ENDPOINT_NOT_FOUND,
        "endpoint_not_found",
    ),
    (
        "404-text-html-content-type",
        err(404, "Model llama not found on this site", {"content-type": "text/html; charset=utf-8"}),
        FailoverReason.ENDPOINT_NOT_FOUND,
        "endpoint_not_found",
    ),
    ("404-empty", err(404, ""), FailoverReason.ENDPOINT_NOT_FOUND, "endpoint_not_found"),
    (
        "405-wrong-route",
        err(405, '{"detail": "Method Not Allowed"}'),
        FailoverReason.ENDPOINT_NOT_FOUND,
        "wrong_endpoint",
    ),
    (
        "200-web-page",
        err(
            200, "<!doctype html><html><body>Welcome to our site</body></html>", {"content-type": "text/html"}
        ),
        FailoverReason.ENDPOINT_NOT_FOUND,
        "wrong_endpoint",
    ),
    (
        "404-openai-unknown-route",
        err(404, openai("Invalid URL (POST /v2/chat/completions)")),
        FailoverReason.ENDPOINT_NOT_FOUND,
        "endpoint_not_found",
    ),
    (
        "404-llamacpp-route",
        err(404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}),
        FailoverReason.ENDPOINT_NOT_FOUND,
        "endpoint_not_found",
    ),
    (
        "404-anthropic-route",
        err(404, anthropic("not_found_error", "Not Found")),
        FailoverReason.ENDPOINT_NOT_FOUND,
        "endpoint_not_found",
    ),
    (
        "400-openai-context",
        err(
            400,
            openai(
                "This model's maximum context length is 128000 tokens. However, your messages "
                "resulted in 130000 tokens.",
                "invalid_request_error",
                "context_length_exceeded",
                "messages",
            ),
        ),
        FailoverReason.CONTEXT_OVERFLOW,
        "context_overflow",
    ),
    (
        "400-anthropic-context",
        err(400, anthropic("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum")),
        FailoverReason.CONTEXT_OVERFLOW,
        "context_overflow",
    ),
    (
        "413-anthropic",
        err(413, anthropic("request_too_large", "Request exceeds the maximum allowed number of bytes.")),
        FailoverReason.CONTEXT_OVERFLOW,
        "context_overflow",
    ),
    (
        "400-azure-content-filter",
        err(
            400,
            {
                "error": {
                    "message": "The response was filtered due to the prompt triggering Azure OpenAI's "
                    "content management policy.",
                    "type": None,
                    "param": "prompt",
                    "code": "content_filter",
                    "status": 400,
                }
            },
        ),
        FailoverReason.CONTENT_POLICY,
        "content_policy",
    ),
    (
        "400-openai-content-policy",
        err(
            400,
            openai(
                "Your request was rejected as a result of our safety system.",
                "invalid_request_error",
                "content_policy_violation",
            ),
        ),
        FailoverReason.CONTENT_POLICY,
        "content_policy",
    ),
    (
        "400-openrouter-invalid-model",
        err(400, openrouter(400, "foo/bar-9000 is not a valid model ID")),
        FailoverReason.MODEL_NOT_FOUND,
        "invalid_model",
    ),
    (
        "400-openai-param",
        err(
            400,
            openai(
                "Invalid type for 'messages[1].content': expected a string.",
                "invalid_request_error",
                "invalid_type",
                "messages[1].content",
            ),
        ),
        FailoverReason.FORMAT,
        "format",
    ),
    (
        "422-validation",
        err(
            422,
            {
                "detail": [
                    {
                        "loc": ["body", "temperature"],
                        "msg": "Input should be less than or equal to 2",
                        "type": "less_than_equal",
                    }
                ]
            },
        ),
        FailoverReason.FORMAT,
        "format",
    ),
    (
        "500-anthropic",
        err(500, anthropic("api_error", "Internal server error")),
        FailoverReason.SERVER_ERROR,
        "server_error",
    ),
    (
        "502-html",
        err(502, "<html><body>Bad Gateway</body></html>"),
        FailoverReason.SERVER_ERROR,
        "server_error",
    ),
    ("504", err(504, "Gateway Timeout"), FailoverReason.SERVER_ERROR, "server_error"),
    (
        "stream-openrouter-502",
        err(None, openrouter(502, "Provider returned error")),
        FailoverReason.SERVER_ERROR,
        "server_error",
    ),
    (
        "stream-vllm-404",
        err(
            None,
            {
                "object": "error",
                "message": "The model `x` does not exist.",
                "type": "NotFoundError",
                "code": 404,
            },
        ),
        FailoverReason.MODEL_NOT_FOUND,
        "model_not_found",
    ),
    (
        "stream-anthropic-overloaded",
        err(None, anthropic("overloaded_error", "Overloaded")),
        FailoverReason.OVERLOADED,
        "overloaded",
    ),
    (
        "stream-anthropic-rate-limit",
        err(None, anthropic("rate_limit_error", "Too many tokens")),
        FailoverReason.RATE_LIMIT,
        "stream_rate_limit",
    ),
    (
        "stream-context",
        err(None, openai("maximum context length exceeded", "invalid_request_error")),
        FailoverReason.CONTEXT_OVERFLOW,
        "stream_context_overflow",
    ),
    (
        "stream-content",
        err(None, openai("Output blocked by content filtering policy", "invalid_request_error")),
        FailoverReason.CONTENT_POLICY,
        "stream_content_policy",
    ),
    (
        "stream-anthropic-timeout",
        err(None, anthropic("timeout_error", "Request timeout")),
        FailoverReason.TIMEOUT,
        "stream_timeout",
    ),
    (
        "stream-openai-server-error",
        err(None, openai("The server had an error while processing your request.", "server_error")),
        FailoverReason.SERVER_ERROR,
        "stream_server_error",
    ),
    ("409-conflict", err(409, anthropic("conflict_error", "conflict")), FailoverReason.UNKNOWN, "unknown"),
    ("stream-garbage", err(None, "data: not json"), FailoverReason.UNKNOWN, "unknown"),
]


@pytest.mark.parametrize(("error", "reason", "rule"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_classification_row(error: ProviderError, reason: str, rule: str):
    verdict = classify_failure(error)
    assert (verdict.reason, verdict.rule) == (reason, rule), verdict


def test_every_rule_has_a_case():
    covered = {case[3] for case in CASES}
    assert covered == {rule.name for rule in RULES}


def test_rule_names_are_unique_and_documented():
    import runyard.router.failures as module

    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names))
    for name in names:
        assert name in (module.__doc__ or ""), f"rule {name} missing from the module table"
        assert next(r for r in RULES if r.name == name).source


def test_error_nested_in_a_cause_chain_is_read():
    inner = err(404, openai("The model `m` does not exist", code="model_not_found"))
    try:
        try:
            raise inner
        except ProviderError as exc:
            raise RuntimeError("wrapper") from exc
    except RuntimeError as outer:
        assert classify_failure(outer).reason == FailoverReason.MODEL_NOT_FOUND


def test_transport_errors_outside_provider_errors():
    assert classify_failure(httpx.ConnectError("refused")).reason == FailoverReason.NETWORK
    assert classify_failure(TimeoutError()).reason == FailoverReason.TIMEOUT
    assert classify_failure(ValueError("odd")).reason == FailoverReason.UNKNOWN


def test_transport_errors_outside_provider_errors_name_their_rule():
    # No provider error was read, so no row of RULES matched: the verdict
    # still names the rule a provider error would have hit.
    assert classify_failure(TimeoutError()).rule == "transport_timeout"
    assert classify_failure(httpx.ConnectError("refused")).rule == "transport_network"
    assert classify_failure(ValueError("odd")).rule == "unknown"


def test_format_reports_the_blamed_field_and_detail_names_the_message():
    verdict = classify_failure(
        err(400, openai("Invalid value for 'temperature'.", code="invalid_value", param="temperature"))
    )
    assert verdict.param == "temperature"
    assert verdict.detail == "HTTP 400: Invalid value for 'temperature'."


def test_html_bodies_are_not_quoted_in_the_detail():
    assert classify_failure(err(404, "<html>" + "x" * 5000 + "</html>")).detail == "HTTP 404: HTML page"


@pytest.mark.parametrize(
    ("headers", "body", "expected"),
    [
        ({"retry-after": "7"}, "", 7.0),
        ({"retry-after-ms": "1500"}, "", 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, "", 0.25),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, "", 0.0),
        ({}, "Rate limit reached. Please try again in 20s.", 20.0),
        ({}, "Please retry after 350ms", 0.35),
        ({"retry-after": "soon"}, "", None),
        ({}, "", None),
    ],
)
def test_retry_after(headers, body, expected):
    assert parse_retry_after(headers, body) == expected


def test_retry_after_reaches_the_verdict():
    verdict = classify_failure(err(429, anthropic("rate_limit_error", "slow down"), {"retry-after": "2"}))
    assert verdict.retry_after_s == 2.0


@pytest.mark.parametrize(
    ("body", "key_wide"),
    [
        # The model's own limits (named, or nothing said about the key).
        (openai("Rate limit reached for gpt-4o in organization org-1 on requests per min (RPM)."), False),
        (openai("Rate limit reached", "requests", "rate_limit_exceeded"), False),
        (
            anthropic("rate_limit_error", "This request would exceed the rate limit for your organization"),
            False,
        ),
        ({"error": {"message": "You have reached the rate limit specific to this model gpt-4o"}}, False),
        (openrouter(429, "Rate limit exceeded: limit_rpm/google/gemini-flash/abc"), False),
        # The key's or the account's.
        (openrouter(429, "Rate limit exceeded: free-models-per-day. Add 10 credits to unlock more"), True),
        (openai("Max parallel request limit reached for this API key."), True),
        ({"error": {"message": "LiteLLM Rate Limit Handler for rate limit type = key. Crossed TPM"}}, True),
        (openai("API key rate limit exceeded, slow down"), True),
    ],
)
def test_a_rate_limit_is_the_models_unless_the_provider_says_it_is_the_keys(body, key_wide):
    verdict = classify_failure(err(429, body, {"retry-after": "3"}), model="gpt-4o")
    assert (verdict.reason, verdict.key_wide) == (FailoverReason.RATE_LIMIT, key_wide)


def test_a_key_wide_rate_limit_that_names_the_model_is_the_models():
    body = openai("Rate limit for this API key exceeded on model gpt-4o")
    assert classify_failure(err(429, body), model="gpt-4o").key_wide is False
    assert classify_failure(err(429, body), model="other").key_wide is True
    assert classify_failure(err(429, body), model="gpt-4").key_wide is True  # "gpt-4o" does not name "gpt-4"
    assert classify_failure(err(429, openai("API key rate limit reached")), model="a").key_wide is True
    assert classify_failure(err(401, openai("Incorrect API key; limit your retries"))).key_wide is False
