"""Helpers shared by test modules (one copy each): the repository root,
run events and router responses, database counts.

:mod:`tests.support.router` holds the router tests' harness and fixtures;
:mod:`tests.stack` (the service processes) and :mod:`tests.fakes` (fake
providers) stay where they were.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

__all__ = ["ROOT", "assert_gap_free", "collect", "count", "kinds", "text_of"]

T = TypeVar("T")

#: The repository's root directory.
ROOT = Path(__file__).parents[2]


async def collect(stream: AsyncIterable[T]) -> list[T]:
    """Everything ``stream`` yields (run events, router responses...)."""
    return [item async for item in stream]


def kinds(events: Sequence[Any]) -> list[str]:
    """The name of each event's ``event`` oneof (``RunEvent`` or ``GenerateResponse``)."""
    return [e.WhichOneof("event") for e in events]


def text_of(events: Sequence[Any]) -> str:
    """The text of every ``text_delta``, joined."""
    return "".join(e.text_delta.text for e in events if e.HasField("text_delta"))


def assert_gap_free(events: Sequence[Any], start: int = 1) -> None:
    """The events' ``seq`` run ``start, start + 1, ...`` with no gap and no repeat."""
    assert [e.seq for e in events] == list(range(start, start + len(events)))


async def count(url: str, sql: str) -> int:
    """``sql`` (a count) on the database at ``url``."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()
