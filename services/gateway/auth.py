"""Caller authentication and per-key limits for the public API.

Callers present ``authorization: Bearer <api key>`` (see
:mod:`runyard.gateway.keys`). Without a key a call is accepted only when
``auth.anonymous`` is true (the local default), as the org
``auth.default_org`` with every scope. Every query is then scoped by the
caller's org.

Per key (per gateway replica): a token bucket of ``gateway.rate_limit_rps``
requests per second (burst ``gateway.rate_limit_burst``) and at most
``gateway.max_streams_per_key`` open streams; beyond either the call fails
with RESOURCE_EXHAUSTED and a RetryInfo. A request is a unary call, a
server-streaming call, or one message on a ``Chat`` stream
(:meth:`Authenticator.charge`), so a stream cannot multiply the rate.

Failed authentications (a malformed, unknown, wrong or revoked key) are
limited per source address and per key id with another token bucket
(``gateway.auth_failure_rate_per_s``, burst ``gateway.auth_failure_burst``):
once either is empty the call is refused with RESOURCE_EXHAUSTED
``AUTH_RATE_LIMITED`` before the key is looked up, so guessing costs the
database nothing. The buckets are bounded in number (least recently used
evicted first), so memory stays flat under a flood of sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from runyard.common.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from runyard.common.grpctypes import ServicerContext
from runyard.gateway.keys import ApiKeyStore, parse_key

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


def bearer_token(context: ServicerContext) -> str:
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


#: Failure buckets kept at most (per source and per key id, together).
_MAX_FAILURE_BUCKETS = 50_000


def peer_host(context: ServicerContext) -> str:
    """The caller's address without its port (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``)."""
    peer = context.peer() or ""
    if peer.startswith("ipv6:"):
        host, sep, _ = peer.rpartition(":")  # ipv6:[::1]:5678
        return host if sep and host.endswith("]") else peer
    if peer.startswith("ipv4:"):
        return peer.rsplit(":", 1)[0]
    return peer  # unix:... and others: the whole peer


class FailureLimiter:
    """Token buckets of failed authentications, per key (a source address or a key id).

    Args:
        rate_per_s: refill rate (0 = unlimited).
        burst: bucket size: failures allowed in a row.
        max_buckets: buckets kept (least recently used dropped first).
    """

    def __init__(self, rate_per_s: float, burst: int, max_buckets: int = _MAX_FAILURE_BUCKETS):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def _level(self, key: str, now: float) -> _Bucket | None:
        bucket = self._buckets.get(key)
        if bucket is None:
            return None
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s)
        bucket.updated = now
        self._buckets.move_to_end(key)
        return bucket

    def check(self, *keys: str) -> None:
        """Refuse before any lookup when a key's failures are exhausted.

        Raises:
            ResourceExhausted: AUTH_RATE_LIMITED, with RetryInfo.
        """
        if not self.rate_per_s:
            return
        now = time.monotonic()
        for key in keys:
            bucket = self._level(key, now)
            if bucket is not None and bucket.tokens < 1.0:
                wait = (1.0 - bucket.tokens) / self.rate_per_s
                raise ResourceExhausted(
                    "too many failed authentications from this address or for this key id "
                    "(gateway.auth_failure_rate_per_s); wait before trying again",
                    reason="AUTH_RATE_LIMITED",
                    retry_after_s=round(wait, 3),
                )

    def record(self, *keys: str) -> None:
        """Count one failure against each key."""
        if not self.rate_per_s:
            return
        now = time.monotonic()
        for key in keys:
            bucket = self._level(key, now)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(self.burst))
                while len(self._buckets) > self.max_buckets:
                    self._buckets.popitem(last=False)
            bucket.tokens -= 1.0

    def __len__(self) -> int:
        return len(self._buckets)


class Authenticator:
    """Resolves callers to a :class:`Principal` and enforces per-key limits.

    Args:
        keys: the API key store (None: only anonymous access is possible).
        anonymous: accept calls without a key.
        default_org: org of anonymous callers.
        rate_limit_rps: requests per second per key (0 = unlimited).
        rate_limit_burst: bucket size.
        max_streams_per_key: open streams per key.
        auth_failure_rate_per_s, auth_failure_burst: failed authentications
            allowed per source address and per key id (see :class:`FailureLimiter`).
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
        auth_failure_rate_per_s: float = 0.0,
        auth_failure_burst: int = 10,
    ):
        self.keys = keys
        self.failures = FailureLimiter(auth_failure_rate_per_s, auth_failure_burst)
        #: key id -> SHA-256 of the full key last verified (never trusted alone: only lets a lookup through).
        self._verified: OrderedDict[str, bytes] = OrderedDict()
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

    async def authenticate(self, context: ServicerContext, *, charge: bool = True) -> Principal:
        """The caller, after the rate limit (``charge=False``: the caller charges
        each message itself, see :meth:`charge`).

        Raises:
            Unauthenticated: no key while anonymous access is off, an invalid
                or revoked key (API_KEY_REQUIRED / API_KEY_INVALID / API_KEY_REVOKED).
            ResourceExhausted: over the key's request rate (RATE_LIMITED), or
                too many failed authentications from this address or for this
                key id (AUTH_RATE_LIMITED).
        """
        source = f"src:{peer_host(context)}"
        try:
            token = bearer_token(context)
        except Unauthenticated:
            self.failures.check(source)
            self.failures.record(source)
            raise
        if not token:
            if not self.anonymous:
                raise Unauthenticated(
                    "an API key is required: send 'authorization: Bearer <key>'", reason="API_KEY_REQUIRED"
                )
            principal = Principal(self.default_org, ALL_SCOPES)
        else:
            principal = await self._lookup_limited(token, source)
        if charge:
            self._take(principal)
        return principal

    def charge(self, principal: Principal) -> None:
        """Take one request from the key's rate (one message on a Chat stream).

        Raises:
            ResourceExhausted: RATE_LIMITED, with RetryInfo.
        """
        self._take(principal)

    async def _lookup_limited(self, token: str, source: str) -> Principal:
        cached = self._cache.get(token)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            key_id = f"key:{parse_key(token)[0]}"
        except Unauthenticated:
            key_id = ""
        keys = (source, key_id) if key_id else (source,)
        digest = hashlib.sha256(token.encode()).digest()
        known = bool(key_id) and hmac.compare_digest(self._verified.get(key_id, b""), digest)
        if not known:
            # A key this gateway verified before is no guess: it is looked up
            # whatever the address or key id has failed (NAT, a key under attack).
            self.failures.check(*keys)
        try:
            if not key_id:
                raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
            principal = await self._lookup(token)
        except Unauthenticated:
            self.failures.record(*keys)
            raise
        self._verified[key_id] = digest
        self._verified.move_to_end(key_id)
        while len(self._verified) > _MAX_FAILURE_BUCKETS:
            self._verified.popitem(last=False)
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
        bucket.tokens = min(
            float(self.rate_limit_burst), bucket.tokens + (now - bucket.updated) * self.rate_limit_rps
        )
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
