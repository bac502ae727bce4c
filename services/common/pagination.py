"""Opaque page tokens for keyset pagination (https://google.aip.dev/158).

A token is URL-safe base64 of a small JSON object naming the list it belongs
to (``k``) and the cursor (``c``). A token that does not decode, or that
belongs to another list, is an INVALID_ARGUMENT naming ``page_token``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any

from runyard.common.errors import InvalidArgument

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "decode_page_token",
    "decode_time_cursor",
    "encode_page_token",
    "invalid_page_token",
    "page_size",
    "time_cursor_page",
]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def encode_page_token(kind: str, cursor: list[Any]) -> str:
    """Token for the page after ``cursor`` in list ``kind``."""
    raw = json.dumps({"k": kind, "c": cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(kind: str, token: str) -> list[Any] | None:
    """The cursor in ``token`` (None for an empty token = first page).

    Raises:
        InvalidArgument: malformed token or one from another list (reason INVALID_PAGE_TOKEN).
    """
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("k") != kind or not isinstance(data.get("c"), list):
        raise invalid_page_token()
    cursor: list[Any] = data["c"]
    return cursor


def invalid_page_token() -> InvalidArgument:
    """The error for a page token that does not decode to a usable cursor."""
    return InvalidArgument(
        "page_token is malformed or belongs to another listing; pass back next_page_token unchanged",
        reason="INVALID_PAGE_TOKEN",
        field="page_token",
    )


def page_size(value: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    """Effective page size: 0 means ``default``; larger than ``maximum`` is capped.

    Raises:
        InvalidArgument: negative size (reason INVALID_PAGE_SIZE).
    """
    if value < 0:
        raise InvalidArgument(
            f"page_size must not be negative, got {value}", reason="INVALID_PAGE_SIZE", field="page_size"
        )
    return min(value or default, maximum)


def decode_time_cursor(kind: str, token: str) -> tuple[dt.datetime, uuid.UUID] | None:
    """The ``(created_at, id)`` keyset cursor of a ``kind`` listing ordered
    by ``created_at, id`` (None for the first page).

    Raises:
        InvalidArgument: a malformed token (INVALID_PAGE_TOKEN).
    """
    cursor = decode_page_token(kind, token)
    if cursor is None:
        return None
    try:
        return dt.datetime.fromisoformat(cursor[0]), uuid.UUID(cursor[1])
    except (IndexError, TypeError, ValueError):
        raise invalid_page_token() from None


def time_cursor_page(kind: str, rows: Sequence[Any], limit: int) -> tuple[Sequence[Any], str]:
    """Cut ``rows`` (fetched with ``LIMIT limit + 1``) to one page and the
    token of the next (``""`` on the last page); rows have ``created_at`` and ``id``."""
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, encode_page_token(kind, [rows[-1]["created_at"].isoformat(), str(rows[-1]["id"])])
