"""What the router does about each failover reason: one decision table.

Each row: what happens to the same model, the auth profile and the chain,
and which cooldown the failure sets (scope; schedule in ``[router]``).

* RATE_LIMIT: same model again only if Retry-After is short
  (``max_retry_after_ms``); rotate the auth profile once; then the next model.
  Cools that model on that profile (``cooldown_*``).
* OVERLOADED, SERVER_ERROR, TIMEOUT, NETWORK: up to ``max_retries``
  same-model retries with jittered exponential backoff; no rotation; then the
  next model. Cools the profile briefly (``transient_*``).
* AUTH: no retry; rotate through the profiles; the next model once none is
  left. Cools the profile (``cooldown_*``).
* AUTH_PERMANENT, BILLING: no retry; rotate; then the next model. Disables
  the profile for hours (``disable_*``).
* MODEL_NOT_FOUND: the next model at once. Cools that model on every profile
  of the provider (``cooldown_*``).
* ENDPOINT_NOT_FOUND, FORMAT: abort, naming the URL / the rejected field.
  No cooldown.
* CONTEXT_OVERFLOW: the agent's ``context_window_chain`` (larger models),
  else abort. No cooldown.
* CONTENT_POLICY: the agent's ``content_policy_chain``, else abort. No
  cooldown.
* UNKNOWN: the next model. No cooldown.

Once tokens of an answer were streamed, no same-model retry or rotation
happens: the answer restarts on the next model (``restart_output``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from runyard.router.classify import Reason

__all__ = ["DISABLE_REASONS", "POLICIES", "Decision", "Policy", "policy_for"]

RetrySame = Literal["no", "backoff", "retry_after"]
Rotate = Literal["no", "once", "all"]
NextModel = Literal["yes", "context_window_chain", "content_policy_chain", "abort"]
#: ``model``: (provider, profile, model); ``profile``: (provider, profile, *);
#: ``provider_model``: (provider, *, model).
Scope = Literal["none", "model", "profile", "provider_model"]
Schedule = Literal["none", "standard", "transient", "disable"]


class Decision:
    """Names of router decisions (``ModelLifecycleData.decision``, metric label)."""

    RETRY_SAME_MODEL = "retry_same_model"
    ROTATE_AUTH_PROFILE = "rotate_auth_profile"
    NEXT_MODEL = "next_model"
    CONTEXT_WINDOW_CHAIN = "context_window_chain"
    CONTENT_POLICY_CHAIN = "content_policy_chain"
    ABORT = "abort"
    #: Nothing left to try (or everything left is cooling and not probeable).
    EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class Policy:
    """The row of the decision table for one reason."""

    reason: str
    retry_same: RetrySame
    rotate: Rotate
    next_model: NextModel
    scope: Scope
    schedule: Schedule


_TRANSIENT = ("backoff", "no", "yes", "profile", "transient")

POLICIES: dict[str, Policy] = {
    Reason.RATE_LIMIT: Policy(Reason.RATE_LIMIT, "retry_after", "once", "yes", "model", "standard"),
    Reason.OVERLOADED: Policy(Reason.OVERLOADED, *_TRANSIENT),  # type: ignore[arg-type]
    Reason.SERVER_ERROR: Policy(Reason.SERVER_ERROR, *_TRANSIENT),  # type: ignore[arg-type]
    Reason.TIMEOUT: Policy(Reason.TIMEOUT, *_TRANSIENT),  # type: ignore[arg-type]
    Reason.NETWORK: Policy(Reason.NETWORK, *_TRANSIENT),  # type: ignore[arg-type]
    Reason.AUTH: Policy(Reason.AUTH, "no", "all", "yes", "profile", "standard"),
    Reason.AUTH_PERMANENT: Policy(Reason.AUTH_PERMANENT, "no", "all", "yes", "profile", "disable"),
    Reason.BILLING: Policy(Reason.BILLING, "no", "all", "yes", "profile", "disable"),
    Reason.MODEL_NOT_FOUND: Policy(Reason.MODEL_NOT_FOUND, "no", "no", "yes", "provider_model", "standard"),
    Reason.ENDPOINT_NOT_FOUND: Policy(Reason.ENDPOINT_NOT_FOUND, "no", "no", "abort", "none", "none"),
    Reason.FORMAT: Policy(Reason.FORMAT, "no", "no", "abort", "none", "none"),
    Reason.CONTEXT_OVERFLOW: Policy(
        Reason.CONTEXT_OVERFLOW, "no", "no", "context_window_chain", "none", "none"
    ),
    Reason.CONTENT_POLICY: Policy(Reason.CONTENT_POLICY, "no", "no", "content_policy_chain", "none", "none"),
    Reason.UNKNOWN: Policy(Reason.UNKNOWN, "no", "no", "yes", "none", "none"),
}

#: Reasons that disable a profile for hours (health DISABLED).
DISABLE_REASONS = frozenset({Reason.BILLING, Reason.AUTH_PERMANENT})


def policy_for(reason: str) -> Policy:
    """The table row for ``reason`` (UNKNOWN's for a name not in the table)."""
    return POLICIES.get(reason) or POLICIES[Reason.UNKNOWN]
