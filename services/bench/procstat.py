"""Counters for the benchmarks: process CPU time and PostgreSQL's work.

* :func:`cpu_seconds`: user + system CPU time of a process from
  ``/proc/<pid>/stat`` (Linux; ``utime`` and ``stime``, fields 14 and 15, in
  clock ticks, see proc(5)). It covers every thread of the process.
* :func:`run_queue_wait_seconds`: how long a process's threads were
  runnable but waiting for a CPU, from ``/proc/<pid>/task/*/schedstat``
  (the second field, ``run_delay`` in ns; proc(5) and the kernel's
  Documentation/scheduler/sched-stats.rst). Where CPU time says what the
  work costs, this says how long it queued for the CPUs.
* :class:`PgProcesses`: the PostgreSQL server's processes on this machine.
  The postmaster is the parent of the process serving ``SELECT
  pg_backend_pid()``; its children are found by scanning ``/proc`` and
  grouped with ``pg_stat_activity``: backends of the benchmark's database,
  server background processes (no database: checkpointer, WAL writer, ...)
  and backends of other databases (left out of the figures).
* :func:`db_counters`: ``pg_stat_database`` of one database (commits, row
  writes). PostgreSQL 15+ backends publish these counters at most once a
  second while busy and otherwise after 10 s idle (``PGSTAT_IDLE_INTERVAL``),
  so a reader must wait :data:`STATS_SETTLE_S` after the load before the
  totals are complete.
* :func:`wal_insert_lsn` and :class:`WalInspector`: WAL written between two
  positions, for the whole server (LSN difference) and, with the
  ``pg_walinspect`` extension (PostgreSQL 15+, superuser), attributed to one
  database: records touching its relations plus every record of the
  transactions that did (their commit records included).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from runyard.common import db

__all__ = [
    "STATS_SETTLE_S",
    "PgCpu",
    "PgProcesses",
    "WalInspector",
    "cpu_model",
    "cpu_seconds",
    "db_counters",
    "memory_gib",
    "other_commits",
    "run_queue_wait_seconds",
    "wal_insert_lsn",
]

#: Seconds after the last activity until every backend has published its
#: ``pg_stat_database`` counters (PostgreSQL 15's 10 s idle flush, plus 1 s).
STATS_SETTLE_S = 11.0

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (so index 0 is
    field 3, ``state``), or None if the process is gone or unreadable."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) used so far by ``pid``; None
    if it cannot be read (gone, or not on this machine)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def run_queue_wait_seconds(pid: int) -> float | None:
    """Seconds the threads of ``pid`` (alive now) have spent runnable but
    waiting for a CPU, summed; None if it cannot be read (gone, not on this
    machine, or a kernel without schedstats)."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for task in tasks:
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total / 1e9


def _identity(pid: int) -> tuple[int, int, float] | None:
    """``(ppid, start time in ticks, cpu seconds)`` of ``pid``, or None."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class PgCpu:
    """CPU seconds of the PostgreSQL server's processes at one moment.

    ``processes`` maps ``(pid, start ticks)`` to ``(group, cpu seconds)``;
    group is ``"db"`` (a backend of the benchmark's database), ``"background"``
    (no database: checkpointer, WAL writer, autovacuum launcher, ...) or
    ``"other"`` (a backend of another database).
    """

    processes: dict[tuple[int, int], tuple[str, float]] = field(default_factory=dict)
    #: Run-queue wait seconds of the same processes (:func:`run_queue_wait_seconds`).
    waits: dict[tuple[int, int], float] = field(default_factory=dict)

    def wait_delta(self, later: PgCpu) -> dict[str, float]:
        """Run-queue wait seconds per group from this sample to ``later``."""
        out = {"db": 0.0, "background": 0.0, "other": 0.0}
        for key, (group, _) in later.processes.items():
            out[group] += later.waits.get(key, 0.0) - self.waits.get(key, 0.0)
        return out

    def delta(self, later: PgCpu) -> dict[str, float]:
        """CPU seconds per group from this sample to ``later``, plus
        ``exited``: processes of the database or the server's background
        present here and gone later (their CPU after this sample is lost;
        pool connections rarely close, so this is normally 0)."""
        out = {"db": 0.0, "background": 0.0, "other": 0.0, "exited": 0.0}
        for key, (group, cpu) in later.processes.items():
            before = self.processes.get(key)
            out[group] += cpu - (before[1] if before is not None else 0.0)
        out["exited"] = float(
            sum(
                1
                for key, (group, _) in self.processes.items()
                if group != "other" and key not in later.processes
            )
        )
        return out


class PgProcesses:
    """The PostgreSQL server's processes on this machine (see module doc).

    Build with :meth:`locate`; ``available`` is False (and ``reason`` says
    why) when the server's processes cannot be read here: a server on
    another machine or in another PID namespace, or ``/proc`` hidden.
    """

    def __init__(self, postmaster: int | None, reason: str = ""):
        self.postmaster = postmaster
        self.reason = reason

    @property
    def available(self) -> bool:
        return self.postmaster is not None

    @classmethod
    async def locate(cls, conn: db.Connection) -> PgProcesses:
        """Find the postmaster through ``conn``'s backend process."""
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        identity = _identity(backend)
        if identity is None or _comm(backend) not in ("postgres", "postmaster"):
            return cls(
                None,
                f"backend pid {backend} is not a postgres process on this machine "
                "(server elsewhere or in another PID namespace)",
            )
        postmaster = identity[0]
        if _comm(postmaster) not in ("postgres", "postmaster") or cpu_seconds(postmaster) is None:
            return cls(
                None, f"the parent of backend {backend} (pid {postmaster}) is not a readable postmaster"
            )
        return cls(postmaster)

    def _children(self) -> dict[int, tuple[int, float]]:
        out: dict[int, tuple[int, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            identity = _identity(int(entry.name))
            if identity is not None and identity[0] == self.postmaster:
                out[int(entry.name)] = (identity[1], identity[2])
        return out

    async def sample(self, conn: db.Connection, database: str) -> PgCpu:
        """CPU of every child of the postmaster, grouped (see :class:`PgCpu`).

        ``conn`` reads ``pg_stat_activity`` (any database of the server; its
        own backend counts as ``other`` unless it is connected to
        ``database``)."""
        if self.postmaster is None:
            return PgCpu()
        rows = await conn.fetch("SELECT pid, datname FROM pg_stat_activity")
        databases = {int(r["pid"]): r["datname"] for r in rows}
        children = await asyncio.to_thread(self._children)
        sample = PgCpu()
        for pid, (start, cpu) in children.items():
            datname = databases.get(pid)
            group = "background" if datname is None else ("db" if datname == database else "other")
            sample.processes[(pid, start)] = (group, cpu)
            if group != "other":
                sample.waits[(pid, start)] = run_queue_wait_seconds(pid) or 0.0
        return sample


_DB_FIELDS = (
    "xact_commit",
    "xact_rollback",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "blks_read",
    "blks_hit",
)


async def db_counters(conn: db.Connection, database: str) -> dict[str, Any]:
    """``pg_stat_database`` counters of ``database`` as published so far
    (see :data:`STATS_SETTLE_S`), plus ``others``: commits of every other
    database by name (activity of others on a shared server; see
    :func:`other_commits`)."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(
        f"SELECT datname, {', '.join(_DB_FIELDS)} FROM pg_stat_database WHERE datname IS NOT NULL"
    )
    out: dict[str, Any] = dict.fromkeys(_DB_FIELDS, 0)
    out["others"] = {}
    for row in rows:
        if row["datname"] == database:
            out.update({name: int(row[name] or 0) for name in _DB_FIELDS})
        else:
            out["others"][row["datname"]] = int(row["xact_commit"] or 0)
    return out


def other_commits(before: dict[str, Any], after: dict[str, Any]) -> int:
    """Commits in other databases between two :func:`db_counters` readings
    (databases created in between count from zero; dropped ones are lost)."""
    return sum(max(0, count - before["others"].get(name, 0)) for name, count in after["others"].items())


async def wal_insert_lsn(conn: db.Connection) -> int:
    """The server's current WAL insert position, in bytes from 0/0."""
    return int(await conn.fetchval("SELECT pg_current_wal_insert_lsn()"))


_WAL_QUERY = """
WITH r AS (
  SELECT xid::text AS xid, record_length, fpi_length, resource_manager, record_type,
         substring(block_ref FROM 'rel [0-9]+/([0-9]+)/') AS db
  FROM pg_get_wal_records_info($1, $2)
), ours AS (
  SELECT DISTINCT xid FROM r WHERE db = $3 AND xid <> '0'
), tagged AS (
  SELECT r.*, (coalesce(r.db = $3, false) OR (r.xid <> '0' AND r.xid IN (SELECT xid FROM ours))) AS mine
  FROM r
)
SELECT coalesce(sum(record_length) FILTER (WHERE mine), 0)::bigint AS bytes,
       coalesce(sum(fpi_length) FILTER (WHERE mine), 0)::bigint AS fpi_bytes,
       count(*) FILTER (WHERE mine) AS records,
       count(*) FILTER (WHERE mine AND resource_manager = 'Transaction' AND record_type LIKE 'COMMIT%')
         AS write_commits,
       coalesce(sum(record_length), 0)::bigint AS all_bytes
FROM tagged
"""


async def _flushed_past(conn: db.Connection, position: int, timeout_s: float = 5.0) -> int:
    """Wait until the WAL is flushed beyond ``position``; returns the flush position.

    pg_walinspect reads only WAL below the flush position (strictly, in
    PostgreSQL 15). On a quiet server nothing may follow ``position``: a
    transaction that only takes an xid adds a commit record (it writes no
    row, so it is attributed to no database), which the WAL writer flushes
    within ``wal_writer_delay`` (an xid-only commit is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    nudged = False
    flushed = 0
    while time.monotonic() < deadline:
        flushed = int(await conn.fetchval("SELECT pg_current_wal_flush_lsn()"))
        if flushed > position:
            break
        if not nudged:
            await conn.fetchval("SELECT txid_current()")
            nudged = True
        await asyncio.sleep(0.02)
    return flushed


class WalInspector:
    """WAL attributed to one database, with ``pg_walinspect``.

    A record belongs to the database when one of its block references names
    a relation of it, or when its transaction wrote such a record (so commit
    records count; a commit whose transaction wrote only in subtransactions
    is missed, a few dozen bytes). Records of other databases, shared
    catalogs and server-wide records (checkpoints, running-xacts) do not.
    ``bytes`` sums record lengths (full-page images included); the LSN
    difference also counts page headers and alignment.

    WAL segments are recycled after every checkpoint, and a server where
    other databases are created and dropped (each DROP DATABASE forces a
    checkpoint) recycles them within seconds. So the inspector holds a
    temporary physical replication slot (its own connection; PostgreSQL
    drops it when that connection ends, so nothing is left behind) and
    :meth:`hold` moves it forward to the start of each range to be read.

    Build with :meth:`open`; ``reason`` says why it is unavailable.
    """

    def __init__(self, conn: db.Connection | None, database_oid: int, reason: str = ""):
        self.conn = conn
        self.database_oid = database_oid
        self.reason = reason
        self.slot_conn: db.Connection | None = None
        self.slot = ""
        self.held = 0
        #: Why WAL is not retained by a slot ("" when it is).
        self.slot_note = "not opened"

    @property
    def available(self) -> bool:
        return self.conn is not None

    @classmethod
    async def open(cls, url: str, database: str) -> WalInspector:
        """Connect to ``url`` and enable ``pg_walinspect`` there (needs
        PostgreSQL 15+ with contrib, as a superuser), to attribute WAL to
        ``database``. ``url`` should name another database than ``database``
        so that this connection's own transactions are not counted in
        ``database``'s statistics."""
        conn = await asyncpg.connect(url)
        try:
            oid = await conn.fetchval("SELECT oid FROM pg_database WHERE datname = $1", database)
            if oid is None:
                raise ValueError(f"no database {database!r}")
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
            # Reading back a record written after ``start`` proves access
            # (asyncpg passes pg_lsn values as integers: bytes from 0/0). The
            # read ends where that record ends, not at the flush position: with
            # the insert position in a WAL page's last bytes and the flush
            # position at the next page's start, the record that follows is
            # not complete below the flush position, and PostgreSQL 15 finds
            # none ("could not find a valid record after ...").
            start = await wal_insert_lsn(conn)
            await conn.fetchval("SELECT txid_current()")  # a commit record after ``start``
            end = await wal_insert_lsn(conn)
            await _flushed_past(conn, end)
            await conn.fetchval("SELECT count(*) FROM pg_get_wal_records_info($1, $2)", start, end)
        except (asyncpg.PostgresError, ValueError) as exc:
            await conn.close()
            return cls(
                None, 0, f"pg_walinspect unavailable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
            )
        inspector = cls(conn, int(oid))
        slot_conn = await asyncpg.connect(url)
        name = f"runyard_bench_{os.getpid()}_{int(time.time() * 1000) % 1_000_000}"
        try:
            row = await slot_conn.fetchrow(
                "SELECT lsn FROM pg_create_physical_replication_slot($1, true, true)", name
            )
        except asyncpg.PostgresError as exc:
            await slot_conn.close()
            inspector.slot_note = (
                f"no replication slot ({str(exc).splitlines()[0]}): WAL may be recycled before it is read"
            )
        else:
            lsn = db.returned(row)["lsn"]
            inspector.slot_conn, inspector.slot, inspector.held = slot_conn, name, int(lsn or 0)
            inspector.slot_note = ""
        return inspector

    async def hold(self, position: int) -> None:
        """Keep the WAL from ``position`` on (release what is before it).
        Only moves forward: an error on the slot's connection would drop it."""
        if self.slot_conn is None or position <= self.held:
            return
        try:
            flushed = await _flushed_past(self.slot_conn, position)
            self.held = int(
                await self.slot_conn.fetchval(
                    "SELECT end_lsn FROM pg_replication_slot_advance($1, $2)",
                    self.slot,
                    min(position, flushed),
                )
            )
        except asyncpg.PostgresError as exc:
            await self.slot_conn.close()
            self.slot_conn = None
            self.slot_note = f"replication slot lost ({str(exc).splitlines()[0]}): WAL may be recycled"

    async def attribute(self, start: int, end: int) -> dict[str, int] | None:
        """WAL of the database between two insert positions (bytes from 0/0):
        ``bytes``, ``fpi_bytes``, ``records``, ``write_commits`` (commit
        records) and ``all_bytes`` (every record in the range). None if the
        range cannot be read (its segments are recycled after a checkpoint:
        call this soon after the range was written)."""
        if self.conn is None or end <= start:
            return None
        await _flushed_past(self.conn, end)
        try:
            row = await self.conn.fetchrow(_WAL_QUERY, start, end, str(self.database_oid))
        except asyncpg.PostgresError as exc:
            self.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            return None
        row = db.returned(row)  # an aggregate: always one row
        return {key: int(row[key]) for key in ("bytes", "fpi_bytes", "records", "write_commits", "all_bytes")}

    async def close(self) -> None:
        for conn in (self.slot_conn, self.conn):
            if conn is not None:
                await conn.close()
        self.conn = self.slot_conn = None


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (empty if unknown)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if re.match(r"model name\s*:", line):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def memory_gib() -> float:
    """Total memory in GiB from ``/proc/meminfo`` (0.0 if unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError):
        pass
    return 0.0
