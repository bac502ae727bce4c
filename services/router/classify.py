"""Provider error classification: one table from error to failover reason.

:func:`classify` turns any failure of a model call (HTTP status, error
code/type and message in the body, response headers, transport exception,
stall timer) into a :class:`Classification`. The table is :data:`RULES`:
the first rule that matches decides, and its ``name`` is reported in the
verdict so logs and tests can say *which* rule fired. Bodies are read as
JSON when they parse (every ``code``/``type``/``message``/``status`` string
at any depth, including ``error``/``cause``/``metadata.raw`` nesting and
double-encoded messages), else as plain text. Exceptions are read along
their ``__cause__``/``__context__`` chain.

The error formats the rules read, by provider:

* OpenAI: ``{"error": {"message", "type", "param", "code"}}``; codes
  ``model_not_found``, ``insufficient_quota``, ``context_length_exceeded``,
  ``rate_limit_exceeded``, ``invalid_api_key``, ``content_policy_violation``
  (https://platform.openai.com/docs/guides/error-codes).
* Anthropic: ``{"type": "error", "error": {"type", "message"}}`` with types
  ``invalid_request_error`` 400, ``authentication_error`` 401,
  ``billing_error`` 402, ``permission_error`` 403, ``not_found_error`` 404,
  ``request_too_large`` 413, ``rate_limit_error`` 429, ``api_error`` 500,
  ``overloaded_error`` 529; the same object arrives as an ``error`` event
  mid-stream; a spend limit is a 400 ("credit balance is too low") or a 429
  with ``enforced_spend_limit_reached`` (https://docs.claude.com/en/api/errors).
* OpenRouter: ``{"error": {"code": <HTTP status>, "message", "metadata"}}``,
  402 = insufficient credits, 403 = moderation flag, errors after the stream
  started arrive with HTTP 200 as an SSE ``error`` data event
  (https://openrouter.ai/docs/api-reference/errors).
* vLLM: ``{"object": "error", "message": "The model `x` does not exist.",
  "type": "NotFoundError", "code": 404}``.
* Ollama (OpenAI-compatible API): 404 ``model "x" not found, try pulling it
  first``.
* Gemini's OpenAI-compatible endpoint and others: 429 quota messages that
  mention billing but reset per minute/day ("Quota exceeded for metric ...
  per day", "Please retry in 41s") are rate limits, not billing.

=======================  ==================  =============================================================
rule                     reason              condition (and source)
=======================  ==================  =============================================================
stall_first_token        TIMEOUT             no first token within ``ttft_timeout_ms`` (router timer)
stall_idle               TIMEOUT             no token within ``idle_timeout_ms`` (router timer)
transport_timeout        TIMEOUT             httpx read/write/pool timeout, ``TimeoutError``
transport_network        NETWORK             connection refused/reset, DNS failure, connect timeout,
                                             protocol error (httpx ``ConnectError``/``ReadError``/...)
http_408                 TIMEOUT             HTTP 408 (RFC 9110 §15.5.9; OpenRouter "request timed out")
overloaded               OVERLOADED          HTTP 503/529, type ``overloaded_error``, or "overloaded" in
                                             a 5xx/stream error (Anthropic 529; OpenRouter 503)
billing_code             BILLING             ``insufficient_quota``, ``billing_error``,
                                             ``enforced_spend_limit_reached``, "credit balance is too
                                             low", "insufficient credits" on 400/403/429 (OpenAI,
                                             Anthropic, OpenRouter)
rate_limit_resets        RATE_LIMIT          HTTP 429 whose quota resets (per minute/day, "daily",
                                             "monthly", "resets", a retry hint): stays a rate limit
billing_text             BILLING             HTTP 429 about billing/credits/payment otherwise
rate_limit               RATE_LIMIT          HTTP 429 (OpenAI ``rate_limit_exceeded``, Anthropic
                                             ``rate_limit_error``)
http_402                 BILLING             HTTP 402 (RFC 9110 §15.5.3; OpenRouter, Anthropic)
auth_permanent           AUTH_PERMANENT      HTTP 401/403 saying the key, account or organization is
                                             revoked, deactivated, disabled, suspended or deleted
                                             (not "... has disabled access to model x": that is AUTH)
content_policy_403       CONTENT_POLICY      HTTP 403 moderation flag (OpenRouter)
auth                     AUTH                HTTP 401/403 otherwise (OpenAI ``invalid_api_key``,
                                             Anthropic ``authentication_error``/``permission_error``)
model_not_found          MODEL_NOT_FOUND     HTTP 404 whose JSON or plain-text body names the model
                                             (OpenAI ``model_not_found``, "The model `x` does not
                                             exist"; Anthropic ``not_found_error`` "model: x"; vLLM;
                                             Ollama). Never an HTML page: no provider reports a
                                             missing model in HTML, a web server's 404 page does
endpoint_not_found       ENDPOINT_NOT_FOUND  HTTP 404 otherwise: HTML page, unknown route, wrong
                                             base URL ("Invalid URL (POST /v2/...)")
wrong_endpoint           ENDPOINT_NOT_FOUND  HTTP 405, or a 2xx HTML page instead of an event stream
                                             (the base URL points at a web site)
context_overflow         CONTEXT_OVERFLOW    HTTP 400/413/422 saying the prompt/context is too long
                                             (OpenAI ``context_length_exceeded``, Anthropic "prompt is
                                             too long", ``request_too_large`` 413)
content_policy           CONTENT_POLICY      HTTP 400/422 content filter (OpenAI/Azure
                                             ``content_filter``, ``content_policy_violation``)
invalid_model            MODEL_NOT_FOUND     HTTP 400/422 naming an invalid model (OpenRouter "is not
                                             a valid model ID")
format                   FORMAT              other HTTP 400/422: the request is malformed
server_error             SERVER_ERROR        HTTP 500/502/504 and other 5xx (Anthropic ``api_error``)
stream_rate_limit        RATE_LIMIT          error event in a 200 stream about rate limits
stream_context_overflow  CONTEXT_OVERFLOW    error event in a 200 stream about context length
stream_content_policy    CONTENT_POLICY      error event in a 200 stream about content policy
stream_timeout           TIMEOUT             error event in a 200 stream: ``timeout_error`` (Anthropic)
stream_server_error      SERVER_ERROR        error event in a 200 stream: ``server_error``/``api_error``
unknown                  UNKNOWN             anything else
=======================  ==================  =============================================================

An error event inside a 200 stream whose body carries a numeric HTTP
``code`` (OpenRouter, vLLM) is classified as if it had that status.

A RATE_LIMIT is the model's (OpenAI/Groq "Rate limit reached for <model> in
organization ...", Together "specific to this model", Azure deployments)
unless the provider says the limit is the key's or the account's and does
not name the model: "... limit ... for this API key", LiteLLM's "rate limit
type = key", OpenRouter's ``free-models-per-day``; then
:attr:`Classification.key_wide` is set and the whole key cools down.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import json
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from runyard.router.providers import ProviderError

__all__ = ["RULES", "Classification", "Reason", "Rule", "classify", "parse_retry_after"]


class Reason:
    """Failover reason names (the ``FailoverReason`` enum without its prefix)."""

    RATE_LIMIT = "RATE_LIMIT"
    OVERLOADED = "OVERLOADED"
    SERVER_ERROR = "SERVER_ERROR"
    TIMEOUT = "TIMEOUT"
    AUTH = "AUTH"
    AUTH_PERMANENT = "AUTH_PERMANENT"
    BILLING = "BILLING"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    ENDPOINT_NOT_FOUND = "ENDPOINT_NOT_FOUND"
    CONTEXT_OVERFLOW = "CONTEXT_OVERFLOW"
    CONTENT_POLICY = "CONTENT_POLICY"
    FORMAT = "FORMAT"
    NETWORK = "NETWORK"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one provider error.

    ``reason``: a :class:`Reason` name. ``retry_after_s``: the provider's
    Retry-After hint in seconds, if any. ``detail``: a short human-readable
    explanation (never a credential). ``rule``: the :data:`RULES` entry that
    matched. ``param``: the request field the provider blamed (OpenAI
    ``param``), if any. ``key_wide``: a RATE_LIMIT that the provider says
    applies to the whole key or account, not to the model called.
    """

    reason: str
    retry_after_s: float | None = None
    detail: str = ""
    rule: str = ""
    param: str = ""
    key_wide: bool = False


@dataclass(slots=True)
class Facts:
    """What the rules look at, extracted once per error."""

    status: int | None
    text: str
    codes: frozenset[str]
    retry_after_s: float | None
    stalled: str = ""
    transport: str | None = None
    message: str = ""
    param: str = ""
    stream_error: bool = False
    #: The body's own ``message`` (first one found), if any.
    body_message: str = ""
    #: The body is an HTML page (``text/html`` or markup), i.e. a web server's
    #: answer, not a model API's.
    html: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: ``name``, ``reason``, ``source`` (where the
    error format comes from) and ``match(facts) -> bool``."""

    name: str
    reason: str
    source: str
    match: Callable[[Facts], bool]


_BILLING_CODE = re.compile(
    r"insufficient[_ ]quota|billing[_ ]error|billing_hard_limit|enforced_spend_limit_reached"
    r"|payment[_ ]required"
    r"|credit balance is too low|insufficient (credits|balance|funds)|out of credits|spend(ing)? limit",
    re.IGNORECASE,
)
_BILLING_TEXT = re.compile(
    r"billing|credit|payment|balance|funds|purchase|exceeded your current quota|plan and billing|\bpaid\b",
    re.IGNORECASE,
)
_QUOTA_RESETS = re.compile(
    r"\bresets?\b|per[ _-]?(second|minute|hour|day|month)|perday|perminute|daily|monthly|hourly"
    r"|tokens per min|requests per min|\b(rpm|tpm|rpd)\b|(try again|retry) (in|after)",
    re.IGNORECASE,
)
_AUTH_PERMANENT = re.compile(
    r"\b(key|account|organi[sz]ation|user|project|credentials?)\b[^.]{0,40}?"
    r"\b(is|was|has been|have been|been)\s+(permanently\s+)?"
    r"(revoked|deactivated|disabled|suspended|banned|deleted|terminated)"
    r"|\b(revoked|deactivated|disabled|suspended|deleted)\s+(api\s+)?key"
    r"|key[^.]{0,40}no longer (valid|active)",
    re.IGNORECASE,
)
_MODEL_NAMED = re.compile(
    r"model[_ ]not[_ ]found|the model .{0,160}(does not exist|not found|do not have access)"
    r"|model[`'\" :].{0,160}not found|no such model|unknown model|model .{0,80} is not (available|supported)"
    r"|not a valid model|invalid model|\bmodel:\s*\S+|no endpoints found for",
    re.IGNORECASE,
)
_INVALID_MODEL = re.compile(
    r"not a valid model|invalid model|unknown model|no such model|model[_ ]not[_ ]found"
    r"|the model .{0,160}does not exist",
    re.IGNORECASE,
)
_CONTEXT = re.compile(
    r"context[_ ]length[_ ]exceeded|maximum context length|context window|prompt is too long|too many tokens"
    r"|reduce the length|input is too long|exceeds? the (model'?s? )?(context|maximum)"
    r"|string_above_max_length"
    r"|request[_ ]too[_ ]large|token limit|context_window_exceeded|input length .{0,40}exceed",
    re.IGNORECASE,
)
_CONTENT = re.compile(
    r"content[_ ]filter|content[_ ]policy|content management policy|safety (system|policy)|flagged|moderation"
    r"|responsible ai|policy[_ ]violation",
    re.IGNORECASE,
)
_KEY_WIDE = re.compile(
    r"\bkey\b[^.]{0,40}\b(rate[ _-]?limit|limit|quota)"
    r"|\b(rate[ _-]?limit|limit|quota)\b[^.]{0,40}\b(for|of|on|per) (this |your |the )?(api[ _-]?)?key\b"
    r"|rate[ _-]?limit type\s*=\s*key|free-models-per-(day|min)|account[ _-]wide|across all models",
    re.IGNORECASE,
)
_OVERLOADED = re.compile(r"overloaded", re.IGNORECASE)
_RATE_LIMIT_TEXT = re.compile(r"rate[_ ]limit|too many requests", re.IGNORECASE)
_SERVER_TEXT = re.compile(r"server[_ ]error|api_error|internal", re.IGNORECASE)
_TIMEOUT_TEXT = re.compile(r"timeout_error|timed out", re.IGNORECASE)
_RETRY_IN = re.compile(
    r"(?:try again|retry) (?:in|after) (\d+(?:\.\d+)?)\s*(ms|s|sec|seconds?)\b", re.IGNORECASE
)
_STRING_KEYS = (
    "code",
    "type",
    "message",
    "status",
    "error",
    "detail",
    "reason",
    "error_code",
    "raw",
    "param",
)


def _walk(value: Any) -> Iterator[tuple[str, str]]:
    """Every (key, string) of a JSON error at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                yield from _walk(item)
            elif isinstance(item, str) and key in _STRING_KEYS:
                yield key, item
            elif isinstance(item, (int, float)) and not isinstance(item, bool) and key in ("code", "status"):
                yield key, str(int(item))
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)
    elif isinstance(value, str):
        yield "", value


def _parse_body(body: str) -> tuple[str, frozenset[str], int | None, str, str]:
    """``(text, codes, embedded_status, param, message)`` of an error body."""
    if not body:
        return "", frozenset(), None, "", ""
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, ValueError):
        return body, frozenset(), None, "", ""
    parts: list[str] = []
    codes: set[str] = set()
    embedded: int | None = None
    param = ""
    message = ""
    pending = list(_walk(parsed))
    depth = 0
    while pending and depth < 1000:
        depth += 1
        key, value = pending.pop(0)
        parts.append(value)
        if key in ("code", "type", "error_code", "status") and len(value) < 80:
            codes.add(value.lower())
            if (
                key in ("code", "status")
                and value.isdigit()
                and 400 <= int(value) <= 599
                and embedded is None
            ):
                embedded = int(value)
        if key == "param" and not param:
            param = value
        if key == "message" and not message and not value.lstrip().startswith("{"):
            message = value
        # Some gateways double-encode: {"error": {"message": "{\"error\": ...}"}}
        if value.lstrip().startswith("{"):
            try:
                pending.extend(_walk(json.loads(value)))
            except (json.JSONDecodeError, ValueError):
                pass
    return " | ".join(parts), frozenset(codes), embedded, param, message


def _exception_chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def parse_retry_after(headers: dict[str, str], body_text: str = "") -> float | None:
    """Seconds to wait, from ``retry-after-ms`` (OpenAI/Azure), ``retry-after``
    (seconds or HTTP-date, RFC 9110 §10.2.3) or a "try again in Ns" message.

    Returns None when the provider gave no hint; never a negative number.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(float(raw_ms) / 1000, 0.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw:
        try:
            return max(float(raw), 0.0)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                when = None
            if when is not None:
                if when.tzinfo is None:
                    when = when.replace(tzinfo=dt.UTC)
                return max((when - dt.datetime.now(dt.UTC)).total_seconds(), 0.0)
    match = _RETRY_IN.search(body_text)
    if match:
        value = float(match.group(1))
        return value / 1000 if match.group(2).lower() == "ms" else value
    return None


def _transport(exc: BaseException | None) -> str | None:
    """TIMEOUT or NETWORK for a transport exception anywhere in the chain."""
    for item in _exception_chain(exc):
        if isinstance(item, httpx.ConnectTimeout):
            return Reason.NETWORK
        if isinstance(item, (httpx.TimeoutException, asyncio.TimeoutError, TimeoutError)):
            return Reason.TIMEOUT
        if isinstance(
            item,
            (
                httpx.ConnectError,
                httpx.ReadError,
                httpx.WriteError,
                httpx.RemoteProtocolError,
                httpx.NetworkError,
            ),
        ):
            return Reason.NETWORK
        if isinstance(item, (ConnectionError, socket.gaierror)):
            return Reason.NETWORK
    return None


def _status(f: Facts, *codes: int) -> bool:
    return f.status in codes


def _has(pattern: re.Pattern[str], f: Facts) -> bool:
    return bool(f.text) and pattern.search(f.text) is not None


def _code(f: Facts, *names: str) -> bool:
    return any(name in f.codes for name in names)


def _stream(f: Facts) -> bool:
    return f.status is None and f.transport is None and not f.stalled and bool(f.text)


RULES: tuple[Rule, ...] = (
    Rule("stall_first_token", Reason.TIMEOUT, "router ttft_timeout_ms timer", lambda f: f.stalled == "ttft"),
    Rule("stall_idle", Reason.TIMEOUT, "router idle_timeout_ms timer", lambda f: f.stalled == "idle"),
    Rule(
        "transport_timeout",
        Reason.TIMEOUT,
        "httpx ReadTimeout/WriteTimeout/PoolTimeout",
        lambda f: f.status is None and f.transport == Reason.TIMEOUT,
    ),
    Rule(
        "transport_network",
        Reason.NETWORK,
        "httpx ConnectError/ReadError/RemoteProtocolError, DNS",
        lambda f: f.status is None and f.transport == Reason.NETWORK,
    ),
    Rule("http_408", Reason.TIMEOUT, "RFC 9110 §15.5.9; OpenRouter 408", lambda f: _status(f, 408)),
    Rule(
        "overloaded",
        Reason.OVERLOADED,
        "Anthropic 529 overloaded_error; OpenRouter 503",
        lambda f: (
            _status(f, 503, 529)
            or _code(f, "overloaded_error")
            or ((f.status is None or f.status >= 500) and _has(_OVERLOADED, f))
        ),
    ),
    Rule(
        "billing_code",
        Reason.BILLING,
        "OpenAI insufficient_quota; Anthropic billing_error, enforced_spend_limit_reached, "
        "'credit balance is too low'; OpenRouter 'insufficient credits'",
        lambda f: (f.status in (400, 403, 429) or f.status is None) and _has(_BILLING_CODE, f),
    ),
    Rule(
        "rate_limit_resets",
        Reason.RATE_LIMIT,
        "429 quota that resets (Gemini per-day quota, 'try again in')",
        lambda f: _status(f, 429) and (_has(_QUOTA_RESETS, f) or f.retry_after_s is not None),
    ),
    Rule(
        "billing_text",
        Reason.BILLING,
        "429 about billing or credits",
        lambda f: _status(f, 429) and _has(_BILLING_TEXT, f),
    ),
    Rule("rate_limit", Reason.RATE_LIMIT, "OpenAI/Anthropic 429 rate_limit_error", lambda f: _status(f, 429)),
    Rule("http_402", Reason.BILLING, "RFC 9110 §15.5.3; OpenRouter/Anthropic 402", lambda f: _status(f, 402)),
    Rule(
        "auth_permanent",
        Reason.AUTH_PERMANENT,
        "401/403 revoked or deactivated key (OpenAI, OpenRouter)",
        lambda f: _status(f, 401, 403) and _has(_AUTH_PERMANENT, f),
    ),
    Rule(
        "content_policy_403",
        Reason.CONTENT_POLICY,
        "OpenRouter 403 moderation flag",
        lambda f: _status(f, 403) and _has(_CONTENT, f),
    ),
    Rule(
        "auth",
        Reason.AUTH,
        "OpenAI invalid_api_key; Anthropic authentication_error/permission_error",
        lambda f: _status(f, 401, 403),
    ),
    Rule(
        "model_not_found",
        Reason.MODEL_NOT_FOUND,
        "OpenAI model_not_found; Anthropic not_found_error 'model: x'; vLLM; Ollama",
        lambda f: _status(f, 404) and not f.html and _has(_MODEL_NAMED, f),
    ),
    Rule(
        "endpoint_not_found",
        Reason.ENDPOINT_NOT_FOUND,
        "404 without a model error",
        lambda f: _status(f, 404),
    ),
    Rule(
        "wrong_endpoint",
        Reason.ENDPOINT_NOT_FOUND,
        "HTTP 405 (the route exists but takes no POST), or a 2xx HTML page where an event stream "
        "was expected: the base URL points at a web site, not an API (RFC 9110 §15.5.6)",
        # A 2xx answer has no status in the facts (only errors do): an HTML
        # body with no error status and no transport failure is a web page.
        lambda f: _status(f, 405) or (f.status is None and f.html and f.transport is None and not f.stalled),
    ),
    Rule(
        "context_overflow",
        Reason.CONTEXT_OVERFLOW,
        "OpenAI context_length_exceeded; Anthropic 'prompt is too long', request_too_large 413",
        lambda f: _status(f, 413) or (_status(f, 400, 422) and _has(_CONTEXT, f)),
    ),
    Rule(
        "content_policy",
        Reason.CONTENT_POLICY,
        "OpenAI/Azure content_filter, content_policy_violation",
        lambda f: _status(f, 400, 422) and _has(_CONTENT, f),
    ),
    Rule(
        "invalid_model",
        Reason.MODEL_NOT_FOUND,
        "OpenRouter 400 'is not a valid model ID'",
        lambda f: _status(f, 400, 422) and _has(_INVALID_MODEL, f),
    ),
    Rule("format", Reason.FORMAT, "400/422 invalid_request_error", lambda f: _status(f, 400, 422)),
    Rule(
        "server_error",
        Reason.SERVER_ERROR,
        "HTTP 500/502/504; Anthropic api_error",
        lambda f: f.status is not None and f.status >= 500,
    ),
    Rule(
        "stream_rate_limit",
        Reason.RATE_LIMIT,
        "error event mid-stream (OpenRouter, Anthropic rate_limit_error)",
        lambda f: (
            _stream(f) and (_code(f, "rate_limit_error", "rate_limit_exceeded") or _has(_RATE_LIMIT_TEXT, f))
        ),
    ),
    Rule(
        "stream_context_overflow",
        Reason.CONTEXT_OVERFLOW,
        "error event mid-stream about context length",
        lambda f: _stream(f) and _has(_CONTEXT, f),
    ),
    Rule(
        "stream_content_policy",
        Reason.CONTENT_POLICY,
        "error event mid-stream about content policy",
        lambda f: _stream(f) and _has(_CONTENT, f),
    ),
    Rule(
        "stream_timeout",
        Reason.TIMEOUT,
        "Anthropic timeout_error event mid-stream",
        lambda f: _stream(f) and (_code(f, "timeout_error") or _has(_TIMEOUT_TEXT, f)),
    ),
    Rule(
        "stream_server_error",
        Reason.SERVER_ERROR,
        "OpenAI server_error / Anthropic api_error event mid-stream",
        lambda f: _stream(f) and _has(_SERVER_TEXT, f),
    ),
    Rule("unknown", Reason.UNKNOWN, "anything else", lambda f: True),
)


def facts_of(error: ProviderError) -> Facts:
    """The :class:`Facts` the rules read from one provider error."""
    text, codes, embedded, param, body_message = _parse_body(error.body)
    status = error.status
    stream_error = False
    if (status is None or status < 400) and embedded is not None:
        status, stream_error = embedded, True
    elif status is not None and status < 400:
        status = None
    html = "html" in error.headers.get("content-type", "").lower() or error.body.lstrip()[:1] == "<"
    return Facts(
        status=status,
        text=text,
        codes=codes,
        retry_after_s=parse_retry_after(error.headers, text),
        stalled=error.stalled,
        transport=_transport(error.cause) if error.cause is not None else None,
        message=error.message,
        param=param,
        stream_error=stream_error,
        body_message=body_message,
        html=html,
    )


def _find_provider_error(error: BaseException) -> ProviderError | None:
    for item in _exception_chain(error):
        if isinstance(item, ProviderError):
            return item
    return None


def classify(error: BaseException, model: str = "") -> Classification:
    """Classify any failure of a model call (see the module table).

    A :class:`ProviderError` anywhere in ``error``'s cause chain is read;
    other exceptions are classified by their transport type (TIMEOUT,
    NETWORK) or as UNKNOWN. ``model`` is the model called: a rate limit
    that names it is the model's, never key-wide. Never raises.
    """
    provider_error = _find_provider_error(error)
    if provider_error is None:
        reason = _transport(error)
        rule_name = {Reason.TIMEOUT: "transport_timeout", Reason.NETWORK: "transport_network"}.get(
            reason or "", "unknown"
        )
        return Classification(reason or Reason.UNKNOWN, None, f"{type(error).__name__}: {error}", rule_name)
    facts = facts_of(provider_error)
    for rule in RULES:
        if rule.match(facts):
            key_wide = (
                rule.reason == Reason.RATE_LIMIT and _has(_KEY_WIDE, facts) and not _names(facts, model)
            )
            return Classification(
                rule.reason, facts.retry_after_s, _detail(facts), rule.name, facts.param, key_wide
            )
    raise AssertionError("the last rule always matches")  # pragma: no cover


def _names(facts: Facts, model: str) -> bool:
    """Whether the error text names ``model`` (as a whole word: "gpt-4o" is
    not named by "gpt-4o-mini")."""
    if not model:
        return False
    return re.search(rf"(?<![\w.-]){re.escape(model)}(?![\w.-])", facts.text, re.IGNORECASE) is not None


def _detail(facts: Facts) -> str:
    """A short explanation: the status and the provider's own message."""
    where = f"HTTP {facts.status}" if facts.status is not None and not facts.stream_error else "stream error"
    if facts.stalled:
        return facts.message
    if facts.transport is not None and facts.status is None:
        return facts.message
    snippet = (facts.body_message or facts.text).strip().replace("\n", " ")
    if snippet.startswith("<"):
        snippet = "HTML page"
    if len(snippet) > 200:
        snippet = snippet[:197] + "..."
    return f"{where}: {snippet}" if snippet else where
