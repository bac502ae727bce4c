"""Caller authentication and per-key limits for the public API.

Callers present ``authorization: Bearer <api key>`` (see
:mod:`runyard.gateway.keys`). Without a key a call is accepted only when
``auth.anonymous`` is true (the local default), as the org
``auth.default_org`` with every scope. Every query is then scoped by the
caller's org.

Per key (per gateway replica): a token bucket of ``gateway.rate_limit_rps``
requests per second (burst ``gateway.rate_limit_burst``) and at most
``gateway.max_streams_per_key`` open streams; beyond either the call fails
with RESOURCE_EXHAUSTED and a RetryInfo.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from runyard.common.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from runyard.gateway.keys import ApiKeyStore

__all__ = ["ALL_SCOPES", "Authenticator", "Principal", "bearer_token"]

#: Scopes an API key may carry.
ALL_SCOPES = frozenset({"chat", "sessions:read", "sessions:admin", "events", "admin"})
_CACHE_TTL_S = 30.0


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the org every query is scoped by, and the key's scopes."""

    org_id: str
    scopes: frozenset[str]
    #: API key id, or "" for anonymous callers.
    key_id: str = ""

    @property
    def limit_key(self) -> str:
        return self.key_id or f"anonymous:{self.org_id}"

    def require(self, scope: str) -> None:
        """Raise PERMISSION_DENIED unless the caller has ``scope`` (``admin`` implies all)."""
        if scope not in self.scopes and "admin" not in self.scopes:
            raise PermissionDenied(
                f"the API key lacks the {scope!r} scope", reason="SCOPE_REQUIRED", metadata={"scope": scope}
            )


def bearer_token(context: grpc.aio.ServicerContext) -> str:
    """The bearer token of the call ("" if none).

    Raises:
        Unauthenticated: an ``authorization`` entry that is not ``Bearer <token>``.
    """
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("authorization must be 'Bearer <api key>'", reason="INVALID_AUTHORIZATION")
    return ""


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float):
        self.tokens = tokens
        self.updated = time.monotonic()


class Authenticator:
    """Resolves callers to a :class:`Principal` and enforces per-key limits.

    Args:
        keys: the API key store (None: only anonymous access is possible).
        anonymous: accept calls without a key.
        default_org: org of anonymous callers.
        rate_limit_rps: requests per second per key (0 = unlimited).
        rate_limit_burst: bucket size.
        max_streams_per_key: open streams per key.
    """

    def __init__(
        self,
        keys: ApiKeyStore | None,
        *,
        anonymous: bool,
        default_org: str,
        rate_limit_rps: float = 0.0,
        rate_limit_burst: int = 100,
        max_streams_per_key: int = 64,
    ):
        self.keys = keys
        self.anonymous = anonymous
        self.default_org = default_org
        self.rate_limit_rps = rate_limit_rps
        self.rate_limit_burst = rate_limit_burst
        self.max_streams_per_key = max_streams_per_key
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._streams: dict[str, int] = {}

    def forget(self, key_id: str | None = None) -> None:
        """Drop cached keys (all, or one id): NOTIFY ``runyard_api_keys`` calls this."""
        if key_id is None:
            self._cache.clear()
            return
        for token in [t for t, (_, p) in self._cache.items() if p.key_id == key_id]:
            del self._cache[token]

    def on_notify(self, channel: str, payload: str) -> None:
        self.forget(payload or None)

    async def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller, after the rate limit.

        Raises:
            Unauthenticated: no key while anonymous access is off, an invalid
                or revoked key (API_KEY_REQUIRED / API_KEY_INVALID / API_KEY_REVOKED).
            ResourceExhausted: over the key's request rate (RATE_LIMITED).
        """
        token = bearer_token(context)
        if not token:
            if not self.anonymous:
                raise Unauthenticated(
                    "an API key is required: send 'authorization: Bearer <key>'", reason="API_KEY_REQUIRED"
                )
            principal = Principal(self.default_org, ALL_SCOPES)
        else:
            principal = await self._lookup(token)
        self._take(principal)
        return principal

    async def _lookup(self, token: str) -> Principal:
        now = time.monotonic()
        cached = self._cache.get(token)
        if cached is not None and cached[0] > now:
            return cached[1]
        if self.keys is None:
            raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
        key = await self.keys.verify(token)
        principal = Principal(key.org_id, key.scopes, key.key_id)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token] = (now + _CACHE_TTL_S, principal)
        return principal

    def _take(self, principal: Principal) -> None:
        if not self.rate_limit_rps:
            return
        bucket = self._buckets.get(principal.limit_key)
        now = time.monotonic()
        if bucket is None:
            bucket = self._buckets[principal.limit_key] = _Bucket(float(self.rate_limit_burst))
        bucket.tokens = min(float(self.rate_limit_burst), bucket.tokens + (now - bucket.updated) * self.rate_limit_rps)
        bucket.updated = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / self.rate_limit_rps
            raise ResourceExhausted(
                f"more than {self.rate_limit_rps:g} requests per second for this API key "
                "(gateway.rate_limit_rps)",
                reason="RATE_LIMITED",
                retry_after_s=round(wait, 3),
            )
        bucket.tokens -= 1.0

    @contextlib.contextmanager
    def stream_slot(self, principal: Principal) -> Iterator[None]:
        """Hold one of the key's stream slots for the duration of a stream.

        Raises:
            ResourceExhausted: the key already has ``max_streams_per_key`` open
                streams on this replica (TOO_MANY_STREAMS).
        """
        key = principal.limit_key
        if self._streams.get(key, 0) >= self.max_streams_per_key:
            raise ResourceExhausted(
                f"this API key already has {self.max_streams_per_key} open streams "
                "(gateway.max_streams_per_key)",
                reason="TOO_MANY_STREAMS",
                retry_after_s=1.0,
            )
        self._streams[key] = self._streams.get(key, 0) + 1
        try:
            yield
        finally:
            left = self._streams[key] - 1
            if left:
                self._streams[key] = left
            else:
                del self._streams[key]
