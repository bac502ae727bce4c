"""API keys: created, listed and revoked by operators, stored hashed.

A key reads ``ryk_<key id>_<secret>``. Only the SHA-256 of the secret is
stored (the secret is 256 random bits, so a fast hash is enough; compare
GitHub and Stripe tokens); the key id finds the row. Each key belongs to one
org and carries scopes (``chat``, ``sessions:read``, ``sessions:admin``,
``events``, ``admin``). Revocation is immediate on every gateway replica:
``revoke`` sends NOTIFY ``runyard_api_keys`` and gateways drop their cache.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import asyncpg

from runyard.common import db
from runyard.common.errors import InvalidArgument, NotFound, Unauthenticated

__all__ = ["KEYS_CHANNEL", "ApiKey", "ApiKeyStore", "parse_key"]

KEYS_CHANNEL = "runyard_api_keys"
_KEY = re.compile(r"^ryk_([a-z0-9]{12})_([A-Za-z0-9_-]{43})$")
VALID_SCOPES = frozenset({"chat", "sessions:read", "sessions:admin", "events", "admin"})


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key (never the secret)."""

    key_id: str
    org_id: str
    name: str
    scopes: frozenset[str]
    created_at: dt.datetime
    revoked_at: dt.datetime | None


def parse_key(token: str) -> tuple[str, str]:
    """``(key id, secret)`` of a presented key.

    Raises:
        Unauthenticated: not a runyard API key (reason API_KEY_INVALID).
    """
    match = _KEY.match(token)
    if match is None:
        raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
    return match.group(1), match.group(2)


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _row_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        key_id=row["id"],
        org_id=row["org_id"],
        name=row["name"],
        scopes=frozenset(row["scopes"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


class ApiKeyStore:
    """``gateway.api_keys``."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def create(self, org_id: str, name: str, scopes: Iterable[str]) -> tuple[ApiKey, str]:
        """A new key; returns it with the full key text (shown once, never stored).

        Raises:
            InvalidArgument: empty org or an unknown scope.
        """
        wanted = frozenset(scopes)
        unknown = wanted - VALID_SCOPES
        if unknown or not wanted:
            raise InvalidArgument(
                f"scopes must be among {sorted(VALID_SCOPES)}, got {sorted(wanted)}",
                reason="INVALID_SCOPE",
                field="scopes",
            )
        if not org_id:
            raise InvalidArgument("org is required", reason="MISSING_FIELD", field="org_id")
        key_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))
        secret = secrets.token_urlsafe(32)
        row = await self.pool.fetchrow(
            """
            INSERT INTO gateway.api_keys (id, org_id, name, scopes, secret_sha256)
            VALUES ($1, $2, $3, $4, $5) RETURNING *
            """,
            key_id,
            org_id,
            name,
            sorted(wanted),
            _digest(secret),
        )
        return _row_key(db.returned(row)), f"ryk_{key_id}_{secret}"

    async def list(self, org_id: str | None = None) -> list[ApiKey]:
        rows = await self.pool.fetch(
            "SELECT * FROM gateway.api_keys WHERE $1::text IS NULL OR org_id = $1 ORDER BY created_at, id",
            org_id,
        )
        return [_row_key(r) for r in rows]

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key everywhere at once. Raises NotFound."""
        row = await self.pool.fetchrow(
            """
            WITH r AS (
                UPDATE gateway.api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1 RETURNING *
            )
            SELECT r.*, pg_notify($2, r.id) FROM r
            """,
            key_id,
            KEYS_CHANNEL,
        )
        if row is None:
            raise NotFound(f"API key {key_id!r} not found", reason="API_KEY_NOT_FOUND", field="key_id")
        return _row_key(row)

    async def verify(self, token: str) -> ApiKey:
        """The key for a presented token.

        Raises:
            Unauthenticated: malformed, unknown or wrong secret (API_KEY_INVALID),
                or revoked (API_KEY_REVOKED).
        """
        key_id, secret = parse_key(token)
        row = await self.pool.fetchrow("SELECT * FROM gateway.api_keys WHERE id = $1", key_id)
        if row is None or not hmac.compare_digest(bytes(row["secret_sha256"]), _digest(secret)):
            raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")
        key = _row_key(row)
        if key.revoked_at is not None:
            raise Unauthenticated("the API key has been revoked", reason="API_KEY_REVOKED")
        return key
