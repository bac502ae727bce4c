"""Run tokens and service-to-service credentials.

A run token is a JWT (RFC 7519, HS256 via PyJWT) that the gateway signs when
it dispatches a run. It is scoped to one (org, agent, session, run, epoch)
and carries the audience ``runyard.internal``; sessions and the router accept
only calls whose token scope matches what they are asked to read or write.

Internal calls without a run token (gateway -> sessions) carry the shared
internal secret in the ``x-runyard-internal`` metadata entry.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

import grpc
import jwt

from runyard.common import tracing
from runyard.common.errors import PermissionDenied, Unauthenticated

__all__ = ["INTERNAL_METADATA_KEY", "RunClaims", "RunTokenSigner", "check_internal", "internal_metadata"]

INTERNAL_METADATA_KEY = "x-runyard-internal"
RUN_TOKEN_AUDIENCE = "runyard.internal"
RUN_TOKEN_ISSUER = "runyard.gateway"
_ALGORITHM = "HS256"


@dataclass(frozen=True, slots=True)
class RunClaims:
    """The scope of a run token."""

    org_id: str
    agent_id: str
    session_id: str
    run_id: str
    epoch: int
    #: Expiry, seconds since the epoch.
    expires_at: int

    def require_session(self, session_id: str) -> None:
        """Raise PERMISSION_DENIED unless the token is scoped to ``session_id``."""
        if session_id != self.session_id:
            raise PermissionDenied(
                "run token is not scoped to this session", reason="TOKEN_SCOPE_MISMATCH", field="session_id"
            )


class RunTokenSigner:
    """Signs and verifies run tokens.

    Args:
        secret: HS256 key (``auth.run_token_secret``); at least 32 bytes.
        ttl_s: lifetime of a new token in seconds.

    Raises:
        ValueError: the secret is missing or too short.
    """

    def __init__(self, secret: str, ttl_s: int = 3600):
        if len(secret.encode()) < 32:
            raise ValueError("auth.run_token_secret must be set (at least 32 bytes, RFC 7518 section 3.2)")
        self._secret = secret
        self.ttl_s = ttl_s

    def sign(self, *, org_id: str, agent_id: str, session_id: str, run_id: str, epoch: int) -> str:
        """A token for one claim of a run."""
        now = int(time.time())
        claims = {
            "iss": RUN_TOKEN_ISSUER,
            "aud": RUN_TOKEN_AUDIENCE,
            "sub": run_id,
            "iat": now,
            "exp": now + self.ttl_s,
            "org": org_id,
            "agt": agent_id,
            "ses": session_id,
            "epo": epoch,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> RunClaims:
        """The claims of a valid token.

        Raises:
            Unauthenticated: missing, malformed, forged or expired token
                (reasons RUN_TOKEN_MISSING, RUN_TOKEN_EXPIRED, RUN_TOKEN_INVALID).
        """
        if not token:
            raise Unauthenticated("run token is required", reason="RUN_TOKEN_MISSING", field="run_token")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                audience=RUN_TOKEN_AUDIENCE,
                issuer=RUN_TOKEN_ISSUER,
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("run token has expired", reason="RUN_TOKEN_EXPIRED", field="run_token") from None
        except jwt.PyJWTError as exc:
            raise Unauthenticated(
                f"run token is invalid: {exc}", reason="RUN_TOKEN_INVALID", field="run_token"
            ) from None
        try:
            verified = RunClaims(
                org_id=str(claims["org"]),
                agent_id=str(claims["agt"]),
                session_id=str(claims["ses"]),
                run_id=str(claims["sub"]),
                epoch=int(claims["epo"]),
                expires_at=int(claims["exp"]),
            )
        except (KeyError, TypeError, ValueError):
            raise Unauthenticated(
                "run token lacks its scope claims", reason="RUN_TOKEN_INVALID", field="run_token"
            ) from None
        # Whatever call carries a run token works for that run: say so on its span.
        tracing.set_attributes(run_id=verified.run_id, session_id=verified.session_id)
        return verified


def internal_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates an internal call."""
    return ((INTERNAL_METADATA_KEY, secret),) if secret else ()


def check_internal(context: grpc.aio.ServicerContext, secret: str) -> None:
    """Require the internal secret on this call (no-op when none is configured).

    Raises:
        Unauthenticated: the secret is missing or wrong.
    """
    if not secret:
        return
    for key, value in context.invocation_metadata() or ():
        if key == INTERNAL_METADATA_KEY and hmac.compare_digest(str(value).encode(), secret.encode()):
            return
    raise Unauthenticated("internal call without a valid service credential", reason="INTERNAL_AUTH_REQUIRED")
