"""runyard bench's WAL attribution (runyard.bench.procstat.WalInspector)
against real PostgreSQL: it opens wherever the server's insert position is,
including the last bytes of a WAL page, where no record can start."""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg
import pytest

from runyard.bench.procstat import WalInspector, wal_insert_lsn

pytestmark = pytest.mark.timeout(60)

_PAGE_BYTES = 8192  # XLOG_BLCKSZ, PostgreSQL's default WAL page size
_ALIGN = 8  # MAXALIGN: records start on 8-byte boundaries


async def _emit(conn: asyncpg.Connection, payload_bytes: int) -> None:
    await conn.execute("SELECT pg_logical_emit_message(false, 'pad', repeat('x', $1::int))", payload_bytes)


async def _insert_at_page_end(conn: asyncpg.Connection) -> int:
    """Write logical messages until the insert position is in the last
    aligned slot of a WAL page; returns that position."""
    overhead = 0  # a message record's bytes beyond its payload (0 until measured)
    for _ in range(200):
        position = await wal_insert_lsn(conn)
        left = _PAGE_BYTES - position % _PAGE_BYTES
        if left == _ALIGN and overhead:
            return position
        if not overhead:
            payload = 1
        else:
            # The payload whose record ends in the page's last slot; else
            # close in, or move on to the next page.
            payload = left - _ALIGN - overhead
            if payload < 1:
                payload = 1000
            payload = min(payload, 4000)
        await _emit(conn, payload)
        after = await wal_insert_lsn(conn)
        if after // _PAGE_BYTES == position // _PAGE_BYTES:  # no page header in between
            # Records are MAXALIGNed: this over-estimates by at most 7 bytes,
            # which the next record's alignment takes back.
            overhead = after - position - payload
    pytest.fail("the insert position never reached a WAL page's last slot")


async def test_opens_with_the_insert_position_in_a_pages_last_bytes(database_url: str) -> None:
    """The bench's probe read back WAL from the insert position up to the
    flush position; where the insert position was a page's last bytes and
    the flush position the next page's start, PostgreSQL 15 found no record
    there and the bench reported WAL per database as unavailable.

    Everything happens in this test's own database (the extension too); the
    WAL is the server's, so the padding is what puts the position there."""
    conn = await asyncpg.connect(database_url)
    try:
        available = "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_walinspect'"
        if not await conn.fetchval(available):
            pytest.skip("this PostgreSQL has no pg_walinspect (contrib)")
        await conn.execute("CREATE EXTENSION pg_walinspect")
        database = urlsplit(database_url).path.lstrip("/")
        for _ in range(3):
            await _insert_at_page_end(conn)
            inspector = await WalInspector.open(database_url, database)
            try:
                assert inspector.available, inspector.reason
            finally:
                await inspector.close()
    finally:
        await conn.close()
