"""What the router does about each failover reason: one decision table.

Each row: what happens to the same model, the auth profile (the key) and the
chain, which cooldown the failure sets (scope; schedule in ``[router]``) and
whether a later retry of the same request can help (``retryable``).

* RATE_LIMIT: same model again only if Retry-After is short
  (``max_retry_after_ms``); rotate the auth profile once; then the next model.
  Cools that model on that key (``cooldown_*``), or the whole key when the
  provider says the limit is the key's (:attr:`Classification.key_wide`).
* OVERLOADED, SERVER_ERROR, NETWORK: up to ``max_retries`` same-model
  retries with jittered exponential backoff; no rotation; then the next
  model. Cools that model on that key briefly (``transient_*``): a sibling
  model on the same key stays usable.
* TIMEOUT: the next model at once (a stall already spent its share of the
  run's budget); retried with backoff only when it is the last model left.
  Cools that model on that key briefly (``transient_*``), unless the stall
  was cut short by the run's budget rather than by ``ttft_timeout_ms`` /
  ``idle_timeout_ms`` (that says nothing about the model).
* AUTH: no retry; rotate through the profiles; the next model once none is
  left. Cools the key (``cooldown_*``).
* AUTH_PERMANENT, BILLING: no retry; rotate; then the next model. Disables
  the key for hours (``disable_*``).
* MODEL_NOT_FOUND: the next model at once. Cools that model on that key
  (``cooldown_*``): another key may have access to it.
* ENDPOINT_NOT_FOUND, FORMAT: abort, naming the URL / the rejected field.
  No cooldown.
* CONTEXT_OVERFLOW: the agent's ``context_window_chain`` (larger models),
  else the worker compacts the session and retries once (when compaction is
  enabled), else abort. No cooldown.
* CONTENT_POLICY: the agent's ``content_policy_chain``, else abort. No
  cooldown.
* UNKNOWN: the next model. No cooldown.

Once tokens of an answer were streamed, no same-model retry or rotation
happens: the answer restarts on the next model (``restart_output``).

Escalation: one request raises a key's failure count at most once, however
many of its retries failed on that key (see :class:`~runyard.router.cooldowns.Failure`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from runyard.router.failures import FailoverReason

__all__ = ["DISABLE_REASONS", "POLICIES", "RETRIES", "SWITCHES", "Decision", "Policy", "policy_for"]

RetrySame = Literal["no", "backoff", "backoff_if_last", "retry_after"]
Rotate = Literal["no", "once", "all"]
NextModel = Literal["yes", "context_window_chain", "content_policy_chain", "abort"]
#: ``model``: (provider, profile, model); ``profile``: (provider, profile, *),
#: the key as a whole; ``model_or_profile``: ``profile`` when the
#: classification says the failure is the key's (key-wide rate limit), else
#: ``model``.
Scope = Literal["none", "model", "profile", "model_or_profile"]
Schedule = Literal["none", "standard", "transient", "disable"]


class Decision(enum.StrEnum):
    """What the router does after a failed attempt (``ModelLifecycleData.decision``,
    the ``decision`` metric label). Members are their lower-case string values."""

    RETRY_SAME_MODEL = "retry_same_model"
    ROTATE_AUTH_PROFILE = "rotate_auth_profile"
    NEXT_MODEL = "next_model"
    CONTEXT_WINDOW_CHAIN = "context_window_chain"
    CONTENT_POLICY_CHAIN = "content_policy_chain"
    ABORT = "abort"
    #: Nothing left to try (or everything left is cooling and not probeable).
    EXHAUSTED = "exhausted"
    #: CONTEXT_OVERFLOW with no larger model: the worker compacts the session
    #: and asks once more.
    COMPACT_SESSION = "compact_session"
    #: The run's time budget ran out.
    DEADLINE = "deadline"


#: Decisions that move the answer to another model (``runyard_failovers_total``).
SWITCHES = frozenset({Decision.NEXT_MODEL, Decision.CONTEXT_WINDOW_CHAIN, Decision.CONTENT_POLICY_CHAIN})
#: Decisions that try the same model again (``runyard_router_retries_total``).
RETRIES = frozenset({Decision.RETRY_SAME_MODEL, Decision.ROTATE_AUTH_PROFILE})


@dataclass(frozen=True, slots=True)
class Policy:
    """The row of the decision table for one reason."""

    reason: FailoverReason
    retry_same: RetrySame
    rotate: Rotate
    next_model: NextModel
    scope: Scope
    schedule: Schedule
    #: Whether the same request may succeed later (RunError.retryable; an
    #: error made only of non-retryable failures is FAILED_PRECONDITION).
    retryable: bool


_TRANSIENT = ("backoff", "no", "yes", "model", "transient", True)

POLICIES: dict[str, Policy] = {
    FailoverReason.RATE_LIMIT: Policy(
        FailoverReason.RATE_LIMIT, "retry_after", "once", "yes", "model_or_profile", "standard", True
    ),
    FailoverReason.OVERLOADED: Policy(FailoverReason.OVERLOADED, *_TRANSIENT),  # type: ignore[arg-type]
    FailoverReason.SERVER_ERROR: Policy(FailoverReason.SERVER_ERROR, *_TRANSIENT),  # type: ignore[arg-type]
    FailoverReason.TIMEOUT: Policy(
        FailoverReason.TIMEOUT, "backoff_if_last", "no", "yes", "model", "transient", True
    ),
    FailoverReason.NETWORK: Policy(FailoverReason.NETWORK, *_TRANSIENT),  # type: ignore[arg-type]
    FailoverReason.AUTH: Policy(FailoverReason.AUTH, "no", "all", "yes", "profile", "standard", False),
    FailoverReason.AUTH_PERMANENT: Policy(
        FailoverReason.AUTH_PERMANENT, "no", "all", "yes", "profile", "disable", False
    ),
    FailoverReason.BILLING: Policy(FailoverReason.BILLING, "no", "all", "yes", "profile", "disable", False),
    FailoverReason.MODEL_NOT_FOUND: Policy(
        FailoverReason.MODEL_NOT_FOUND, "no", "no", "yes", "model", "standard", False
    ),
    FailoverReason.ENDPOINT_NOT_FOUND: Policy(
        FailoverReason.ENDPOINT_NOT_FOUND, "no", "no", "abort", "none", "none", False
    ),
    FailoverReason.FORMAT: Policy(FailoverReason.FORMAT, "no", "no", "abort", "none", "none", False),
    FailoverReason.CONTEXT_OVERFLOW: Policy(
        FailoverReason.CONTEXT_OVERFLOW, "no", "no", "context_window_chain", "none", "none", False
    ),
    FailoverReason.CONTENT_POLICY: Policy(
        FailoverReason.CONTENT_POLICY, "no", "no", "content_policy_chain", "none", "none", False
    ),
    FailoverReason.UNKNOWN: Policy(FailoverReason.UNKNOWN, "no", "no", "yes", "none", "none", True),
}

#: Reasons that disable a profile for hours (health DISABLED).
DISABLE_REASONS = frozenset({FailoverReason.BILLING, FailoverReason.AUTH_PERMANENT})


def policy_for(reason: str) -> Policy:
    """The table row for ``reason`` (UNKNOWN's for a name not in the table)."""
    return POLICIES.get(reason) or POLICIES[FailoverReason.UNKNOWN]
