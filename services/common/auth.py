"""Run tokens and service-to-service credentials.

A run token is a JWT (RFC 7519) signed with Ed25519 (``EdDSA``, RFC 8037,
via PyJWT and ``cryptography``). Only the gateway holds the private key
(``auth.run_token_private_key``) and signs, when it claims a run for a worker
and again each time a heartbeat renews that run's lease; every other service
holds only the public key (``auth.run_token_public_key``) and verifies. A
token is scoped to one (org, agent, session, run, epoch), carries the
audience ``runyard.internal`` and lives ``auth.run_token_ttl_s`` seconds, so
it stops working soon after its run stops being renewed (see
docs/security.md for the exact guarantee).

Internal calls carry the shared internal secret (``auth.internal_secret``)
in the ``x-runyard-internal`` metadata entry. Nothing here keeps it: a
service's composition root passes it explicitly, to the channels it opens
(:func:`runyard.common.clients.internal_channel` adds it to each call through
:func:`credential_interceptors`) and to its server, whose internal listeners
require it (:mod:`runyard.common.server`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from runyard.common import tracing
from runyard.common.errors import PermissionDenied, Unauthenticated
from runyard.common.grpctypes import ServicerContext

__all__ = [
    "INTERNAL_METADATA_KEY",
    "MIN_INTERNAL_SECRET_BYTES",
    "RunClaims",
    "RunTokenSigner",
    "RunTokenVerifier",
    "check_internal",
    "credential_interceptors",
    "generate_run_token_keys",
    "has_internal_credential",
    "internal_metadata",
    "load_private_key",
    "load_public_key",
    "public_key_text",
    "run_token_env",
    "run_token_verifier",
]

INTERNAL_METADATA_KEY = "x-runyard-internal"
RUN_TOKEN_AUDIENCE = "runyard.internal"
RUN_TOKEN_ISSUER = "runyard.gateway"
#: JWS algorithm of run tokens (RFC 8037): the only one accepted.
_ALGORITHM = "EdDSA"
#: Shortest internal secret a service starts with (256 bits, like an HS256 key, RFC 7518 section 3.2).
MIN_INTERNAL_SECRET_BYTES = 32
#: Clock difference between hosts tolerated on ``exp``/``iat`` (seconds).
CLOCK_LEEWAY_S = 5


def _decode_raw(text: str) -> bytes | None:
    """Standard or URL-safe base64, padding optional."""
    cleaned = "".join(text.split()).rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def load_private_key(text: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8, ``openssl genpkey -algorithm ed25519``)
    or the base64 of its 64-byte secret key (32-byte seed then the 32-byte
    public key, libsodium's layout; what ``runyard keys run-token`` prints). A
    32-byte value is refused: it is what a public key looks like, and any 32
    bytes would pass as a seed.

    Raises:
        ValueError: neither form, not an Ed25519 key, or halves that do not
            match (the message never repeats the key).
    """
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode(), password=None)
        except (ValueError, TypeError):
            raise ValueError("not a readable PEM private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the PEM key is not an Ed25519 key")
        return key
    raw = _decode_raw(text)
    if raw is not None and len(raw) == 32:
        raise ValueError("this looks like a public key (32 bytes); the private key is 64 bytes or PEM")
    if raw is None or len(raw) != 64:
        raise ValueError("expected an Ed25519 private key: PEM, or base64 of the 64-byte secret key")
    key = Ed25519PrivateKey.from_private_bytes(raw[:32])
    if public_key_text(key.public_key()) != base64.b64encode(raw[32:]).decode():
        raise ValueError("the private key's two halves do not match")
    return key


def load_public_key(text: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (``openssl pkey -pubout``) or the base64 of its 32 bytes.

    Raises:
        ValueError: neither form, or not an Ed25519 key.
    """
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except (ValueError, TypeError):
            raise ValueError("not a readable PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the PEM key is not an Ed25519 key")
        return key
    raw = _decode_raw(text)
    if raw is None or len(raw) != 32:
        raise ValueError("expected an Ed25519 public key: PEM, or base64 of its 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_text(key: Ed25519PublicKey) -> str:
    """The base64 form of a public key (what ``auth.run_token_public_key`` takes)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def generate_run_token_keys() -> tuple[str, str]:
    """A new key pair as ``(private, public)`` base64 strings (64 and 32 bytes)."""
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed + public).decode(), base64.b64encode(public).decode()


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
    #: Issue time, seconds since the epoch (0 if the token has none).
    issued_at: int = 0

    def require_session(self, session_id: str) -> None:
        """Raise PERMISSION_DENIED unless the token is scoped to ``session_id``."""
        if session_id != self.session_id:
            raise PermissionDenied(
                "run token is not scoped to this session", reason="TOKEN_SCOPE_MISMATCH", field="session_id"
            )


class RunTokenVerifier:
    """Verifies run tokens with the gateway's public key (every service but the gateway).

    Args:
        public_key: ``auth.run_token_public_key`` (PEM or base64) or a key object.

    Raises:
        ValueError: the key is missing or not an Ed25519 public key.
    """

    def __init__(self, public_key: str | Ed25519PublicKey):
        if isinstance(public_key, str):
            if not public_key.strip():
                raise ValueError("auth.run_token_public_key must be set (the gateway's Ed25519 public key)")
            public_key = load_public_key(public_key)
        self._public = public_key

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._public

    def verify(self, token: str) -> RunClaims:
        """The claims of a valid token.

        Only ``EdDSA`` signatures by the gateway's key are accepted (never
        ``none`` or an HMAC keyed with something public, RFC 8725 section 3.1).

        Raises:
            Unauthenticated: missing, malformed, forged or expired token
                (reasons RUN_TOKEN_MISSING, RUN_TOKEN_EXPIRED, RUN_TOKEN_INVALID).
        """
        if not token:
            raise Unauthenticated("run token is required", reason="RUN_TOKEN_MISSING", field="run_token")
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=[_ALGORITHM],
                audience=RUN_TOKEN_AUDIENCE,
                issuer=RUN_TOKEN_ISSUER,
                leeway=CLOCK_LEEWAY_S,
                options={"require": ["exp", "iat", "aud", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                "run token has expired", reason="RUN_TOKEN_EXPIRED", field="run_token"
            ) from None
        except jwt.PyJWTError as exc:
            # PyJWT's messages name the failed check, never the token.
            raise Unauthenticated(
                f"run token is invalid: {str(exc)[:200]}", reason="RUN_TOKEN_INVALID", field="run_token"
            ) from None
        try:
            verified = RunClaims(
                org_id=str(claims["org"]),
                agent_id=str(claims["agt"]),
                session_id=str(claims["ses"]),
                run_id=str(claims["sub"]),
                epoch=int(claims["epo"]),
                expires_at=int(claims["exp"]),
                issued_at=int(claims.get("iat", 0)),
            )
        except (KeyError, TypeError, ValueError):
            raise Unauthenticated(
                "run token lacks its scope claims", reason="RUN_TOKEN_INVALID", field="run_token"
            ) from None
        # Whatever call carries a run token works for that run: say so on its span.
        tracing.set_attributes(run_id=verified.run_id, session_id=verified.session_id)
        return verified


class RunTokenSigner(RunTokenVerifier):
    """Signs (and verifies) run tokens: the gateway only.

    Args:
        private_key: ``auth.run_token_private_key`` (PEM or base64 seed) or a key object.
        ttl_s: lifetime of a new token in seconds (``auth.run_token_ttl_s``).

    Raises:
        ValueError: the key is missing or not an Ed25519 private key.
    """

    def __init__(self, private_key: str | Ed25519PrivateKey, ttl_s: int = 30):
        if isinstance(private_key, str):
            if not private_key.strip():
                raise ValueError("auth.run_token_private_key must be set on the gateway (an Ed25519 key)")
            private_key = load_private_key(private_key)
        super().__init__(private_key.public_key())
        self._private = private_key
        self.ttl_s = ttl_s

    def sign(self, *, org_id: str, agent_id: str, session_id: str, run_id: str, epoch: int) -> str:
        """A token for one claim of a run, valid ``ttl_s`` seconds from now."""
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
        return jwt.encode(claims, self._private, algorithm=_ALGORITHM)


def run_token_verifier(config: Any) -> RunTokenVerifier:
    """The verifier of a service: ``auth.run_token_public_key`` (or the public
    half of ``auth.run_token_private_key`` when only that is set, as on the gateway).

    Raises:
        ValueError: neither key is set.
    """
    if config.auth.run_token_public_key:
        return RunTokenVerifier(config.auth.run_token_public_key)
    if config.auth.run_token_private_key:
        return RunTokenVerifier(load_private_key(config.auth.run_token_private_key).public_key())
    raise ValueError("auth.run_token_public_key must be set (the gateway's Ed25519 public key)")


def run_token_env(service: str, private_key: str) -> dict[str, str]:
    """The environment that gives ``service`` its half of the run-token key
    pair: the private key to the gateway, the public key to every other service."""
    if service == "gateway":
        return {"RUNYARD_RUN_TOKEN_PRIVATE_KEY": private_key}
    return {"RUNYARD_RUN_TOKEN_PUBLIC_KEY": public_key_text(load_private_key(private_key).public_key())}


def internal_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates an internal call."""
    return ((INTERNAL_METADATA_KEY, secret),) if secret else ()


def check_internal(context: ServicerContext, secret: str) -> None:
    """Require the internal secret on this call (no-op when none is configured).

    Raises:
        Unauthenticated: the secret is missing or wrong.
    """
    if not secret or has_internal_credential(context.invocation_metadata(), secret):
        return
    raise Unauthenticated("internal call without a valid service credential", reason="INTERNAL_AUTH_REQUIRED")


def _with_credential(metadata: Any, secret: str) -> Any:
    entries = list(metadata or ())
    if any(key == INTERNAL_METADATA_KEY for key, _ in entries):
        return metadata
    entries.append((INTERNAL_METADATA_KEY, secret))
    return grpc.aio.Metadata(*entries)


def _details(details: Any, secret: str) -> Any:
    return details._replace(metadata=_with_credential(details.metadata, secret))


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, secret: str):
        self.secret = secret

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_details(client_call_details, self.secret), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, secret: str):
        self.secret = secret

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_details(client_call_details, self.secret), request)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, secret: str):
        self.secret = secret

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_details(client_call_details, self.secret), request_iterator)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, secret: str):
        self.secret = secret

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_details(client_call_details, self.secret), request_iterator)


def credential_interceptors(secret: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors adding the internal ``secret`` to every call that
    does not carry one already; none when ``secret`` is ""."""
    if not secret:
        return []
    return [_UnaryUnary(secret), _UnaryStream(secret), _StreamUnary(secret), _StreamStream(secret)]


def has_internal_credential(metadata: Iterable[tuple[str, Any]] | None, secret: str) -> bool:
    """Whether call ``metadata`` carries ``secret`` (constant-time comparison)."""
    expected = secret.encode()
    for key, value in metadata or ():
        if key == INTERNAL_METADATA_KEY:
            given = value if isinstance(value, bytes) else str(value).encode()
            if hmac.compare_digest(given, expected):
                return True
    return False
