"""``runyard bench sessions``: shutdown drain time and memory vs stored sessions.

Two measurements, each against real service processes (``python -m runyard
serve ...``) and PostgreSQL (``RUNYARD_DATABASE_URL``, else an embedded
``pgserver`` in a temporary directory; each measurement uses a fresh
database that is dropped afterwards):

1. **Drain**: a sessions service with ``--active`` (10 000) sessions opened
   through ``ResolveSession`` (the real path: one activation and one
   ``session.start`` each) and an in-process hook handler on ``session.end``,
   then SIGTERM. Reported: the durable write of every ``session.end``
   (from the service's log), the hook delivery, the time from SIGTERM to
   process exit, and a check that exactly one ``SHUTDOWN`` event per session
   is in the outbox.
2. **Memory**: for each of ``--stored`` (1 000 and 100 000) sessions,
   inserted with set-based SQL, a sessions service and a gateway start and a
   client pages through every session with ``ListSessions`` (through the
   gateway), then runs a maintenance dry run over all of them
   (``PruneSessions``, every session a candidate). The resident set size
   (``VmRSS`` from ``/proc``, Linux) of both processes is sampled every
   ``--sample-ms`` during the walk; the peak for the largest count should be
   within 10 % of the smallest's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc

from runyard._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, sessions_pb2, sessions_pb2_grpc
from runyard.common import db
from runyard.common.auth import generate_run_token_keys, internal_metadata, run_token_env
from runyard.common.config import GatewayConfig
from runyard.common.processes import Processes, free_port

__all__ = ["add_arguments", "main", "noop_handler"]


async def noop_handler(event: object) -> None:
    """The hook handler the drain measurement installs (does nothing)."""


def _rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class _Database:
    """A PostgreSQL server: ``RUNYARD_DATABASE_URL`` or an embedded one."""

    def __init__(self) -> None:
        self.url = os.environ.get("RUNYARD_DATABASE_URL", "")
        self._server: Any = None
        self._dir: str | None = None

    def __enter__(self) -> Self:
        if not self.url:
            import warnings

            self._dir = tempfile.mkdtemp(prefix="runyard-bench-pg-")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
                import pgserver

                self._server = pgserver.get_server(self._dir, cleanup_mode="stop")
            self.url = self._server.get_uri()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.cleanup()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def fresh(self) -> Any:
        """A new, migrated database (dropped afterwards); yields its URL."""
        name = f"runyard_bench_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(self.url)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        url = urlunsplit(urlsplit(self.url)._replace(path=f"/{name}"))
        try:
            await db.migrate_all(url)
            yield url
        finally:
            admin = await asyncpg.connect(self.url)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()


class _Services:
    """Service processes on free ports, configured through ``RUNYARD_*``."""

    def __init__(self, url: str, workdir: Path, extra_env: dict[str, str] | None = None):
        self.ports = {
            "gateway": free_port(),
            "router": free_port(),
            "sessions": free_port(),
            "gateway_internal": free_port(),
        }
        self.run_token_key, _ = generate_run_token_keys()
        self.secret = secrets.token_urlsafe(24)
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
        self.env.update(
            {
                "RUNYARD_DATABASE_URL": url,
                "RUNYARD_INTERNAL_SECRET": self.secret,
                "RUNYARD_LOG_LEVEL": "INFO",
                "RUNYARD_ENDPOINTS__GATEWAY": f"127.0.0.1:{self.ports['gateway']}",
                "RUNYARD_ENDPOINTS__ROUTER": f"127.0.0.1:{self.ports['router']}",
                "RUNYARD_ENDPOINTS__SESSIONS": f"127.0.0.1:{self.ports['sessions']}",
                "RUNYARD_GATEWAY__LISTEN": f"127.0.0.1:{self.ports['gateway']}",
                "RUNYARD_GATEWAY__INTERNAL_LISTEN": f"127.0.0.1:{self.ports['gateway_internal']}",
                "RUNYARD_ENDPOINTS__GATEWAY_INTERNAL": f"127.0.0.1:{self.ports['gateway_internal']}",
                "RUNYARD_SESSIONS__LISTEN": f"127.0.0.1:{self.ports['sessions']}",
                "RUNYARD_GATEWAY__METRICS_PORT": "0",
                "RUNYARD_SESSIONS__METRICS_PORT": "0",
                "RUNYARD_MAINTENANCE__ENABLED": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if "rate_limit_rps" in GatewayConfig.model_fields:
            self.env["RUNYARD_GATEWAY__RATE_LIMIT_RPS"] = "0"  # the client pages as fast as it can
        self.env.update(extra_env or {})
        self.processes = Processes(workdir)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def log(self, name: str) -> str:
        return self.processes.log(name)

    async def start(self, name: str) -> asyncio.subprocess.Process:
        """Start ``runyard serve <name>`` and wait until it is SERVING."""
        env = {**self.env, **run_token_env(name, self.run_token_key)}
        proc = await self.processes.spawn(name, [sys.executable, "-m", "runyard", "serve", name], env)
        await self.processes.wait_healthy(name, self.address(name))
        return proc

    async def stop_all(self) -> None:
        await self.processes.stop(list(self.processes.procs), timeout_s=30)


# ---------------------------------------------------------------- drain


@dataclass
class DrainResult:
    """Figures of the drain measurement (milliseconds)."""

    active_sessions: int
    open_s: float
    durable_write_ms: float
    hooks_ms: float
    exit_ms: float
    shutdown_events: int
    #: session.end events with another reason than SHUTDOWN (must be 0).
    other_end_events: int
    distinct_sessions: int
    drain_timeout_ms: int


async def _open_sessions(services: _Services, count: int, concurrency: int) -> float:
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(services.address("sessions")) as channel:
        stub = sessions_pb2_grpc.SessionServiceStub(channel)
        metadata = internal_metadata(services.secret)
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                index = next_index
                next_index += 1
                await stub.ResolveSession(
                    sessions_pb2.ResolveSessionRequest(
                        org_id="bench", session_key=f"bench:{index}", agent_id="default"
                    ),
                    metadata=metadata,
                    timeout=60,
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def measure_drain(
    database: _Database, workdir: Path, active: int, drain_timeout_ms: int
) -> DrainResult:
    """Open ``active`` sessions, SIGTERM the sessions service, time the drain."""
    async with database.fresh() as url:
        services = _Services(
            url,
            workdir,
            {
                "RUNYARD_SESSIONS__DRAIN_TIMEOUT_MS": str(drain_timeout_ms),
                "RUNYARD_HOOKS__ENTRY_POINTS": "false",
                "RUNYARD_HOOKS__HANDLERS": json.dumps(
                    [
                        {
                            "path": "runyard.bench.sessions:noop_handler",
                            "events": ["session.end"],
                            "name": "bench-noop",
                        },
                    ]
                ),
            },
        )
        try:
            proc = await services.start("sessions")
            open_s = await _open_sessions(services, active, concurrency=32)
            started = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 120)
            exit_ms = (time.perf_counter() - started) * 1000
        finally:
            await services.stop_all()
        log = services.log("sessions")
        durable = re.search(
            r"drain: (\d+) activation\(s\) ended with SHUTDOWN, recorded durably in (\d+) ms", log
        )
        hooks = re.search(r"drain: hook handlers finished in (\d+) ms", log)
        if durable is None:
            raise RuntimeError(f"the sessions service did not report its drain:\n{log[-3000:]}")
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT session_id, data FROM sessions.outbox WHERE type = 'session.end'")
        finally:
            await conn.close()
        shutdown = [
            row["session_id"]
            for row in rows
            if common_pb2.LifecycleEvent.FromString(row["data"]).session_end.reason
            == common_pb2.SESSION_END_REASON_SHUTDOWN
        ]
        return DrainResult(
            active_sessions=active,
            open_s=round(open_s, 2),
            durable_write_ms=float(durable.group(2)),
            hooks_ms=float(hooks.group(1)) if hooks else float("nan"),
            exit_ms=round(exit_ms, 1),
            shutdown_events=len(shutdown),
            other_end_events=len(rows) - len(shutdown),
            distinct_sessions=len(set(shutdown)),
            drain_timeout_ms=drain_timeout_ms,
        )


# ---------------------------------------------------------------- memory


@dataclass
class MemoryResult:
    """RSS (KiB) of the gateway and sessions processes for one stored count."""

    stored_sessions: int
    listed: int
    pruned_dry_run: int
    pages: int
    walk_s: float
    gateway_idle_kib: int
    sessions_idle_kib: int
    gateway_peak_kib: int
    sessions_peak_kib: int
    samples: int = 0
    series: dict[str, list[int]] = field(default_factory=dict)


async def _insert_sessions(url: str, count: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            """
            INSERT INTO sessions.sessions (id, org_id, key, agent_id, created_at, last_active_at,
                message_count)
            SELECT gen_random_uuid(), 'default', 'bench:' || g, 'default',
                   now() - make_interval(secs => $1 - g),
                   now() - interval '1 hour' - make_interval(secs => $1 - g),
                   g % 50
            FROM generate_series(1, $1) AS g
            """,
            count,
        )
        await conn.execute("ANALYZE sessions.sessions")
    finally:
        await conn.close()


async def measure_memory(
    database: _Database, workdir: Path, stored: int, page_size: int, sample_ms: int
) -> MemoryResult:
    """Store ``stored`` sessions, page through all of them via the gateway and
    run a maintenance dry run over all of them, sampling both processes' RSS."""
    async with database.fresh() as url:
        await _insert_sessions(url, stored)
        services = _Services(
            url,
            workdir,
            {
                # Every stored session is a prune candidate, so the dry run streams all of them.
                "RUNYARD_MAINTENANCE__PRUNE_AFTER_S": "60",
                "RUNYARD_MAINTENANCE__EVENT_RETENTION_S": "0",
            },
        )
        try:
            sessions = await services.start("sessions")
            gateway = await services.start("gateway")
            await asyncio.sleep(1.0)  # let both settle (relay, sweeps)
            pids = {"gateway": gateway.pid, "sessions": sessions.pid}
            idle = {name: _rss_kib(pid) for name, pid in pids.items()}
            series: dict[str, list[int]] = {name: [] for name in pids}
            done = asyncio.Event()

            async def sample() -> None:
                while not done.is_set():
                    for name, pid in pids.items():
                        series[name].append(_rss_kib(pid))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(done.wait(), sample_ms / 1000)

            sampler = asyncio.create_task(sample())
            started = time.perf_counter()
            listed = pages = 0
            async with grpc.aio.insecure_channel(services.address("gateway")) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                token = ""
                while True:
                    page = await stub.ListSessions(
                        gateway_pb2.ListSessionsRequest(page_size=page_size, page_token=token), timeout=60
                    )
                    listed += len(page.sessions)
                    pages += 1
                    token = page.next_page_token
                    if not token:
                        break
            pruned = 0
            async with grpc.aio.insecure_channel(services.address("sessions")) as channel:
                stub_s = sessions_pb2_grpc.SessionServiceStub(channel)
                async for batch in stub_s.PruneSessions(
                    sessions_pb2.PruneSessionsRequest(dry_run=True),
                    metadata=internal_metadata(services.secret),
                ):
                    pruned += len(batch.sessions)
            walk_s = time.perf_counter() - started
            done.set()
            await sampler
        finally:
            await services.stop_all()
        return MemoryResult(
            stored_sessions=stored,
            listed=listed,
            pruned_dry_run=pruned,
            pages=pages,
            walk_s=round(walk_s, 2),
            gateway_idle_kib=idle["gateway"],
            sessions_idle_kib=idle["sessions"],
            gateway_peak_kib=max(series["gateway"] or [0]),
            sessions_peak_kib=max(series["sessions"] or [0]),
            samples=len(series["gateway"]),
            series=series,
        )


# ---------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``runyard bench sessions``."""
    parser.add_argument("--active", type=int, default=10_000, help="active sessions to drain (default 10000)")
    parser.add_argument("--drain-timeout-ms", type=int, default=2_000, help="sessions.drain_timeout_ms")
    parser.add_argument(
        "--stored",
        type=int,
        nargs="+",
        default=[1_000, 100_000],
        help="stored session counts to compare (default 1000 100000)",
    )
    parser.add_argument("--page-size", type=int, default=100, help="ListSessions page size (default 100)")
    parser.add_argument("--sample-ms", type=int, default=50, help="RSS sampling period (default 50)")
    parser.add_argument("--skip-drain", action="store_true", help="only the memory measurement")
    parser.add_argument("--skip-memory", action="store_true", help="only the drain measurement")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


async def _run(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {}
    code = 0
    workdir = Path(tempfile.mkdtemp(prefix="runyard-bench-sessions-"))
    with _Database() as database:
        print(
            f"PostgreSQL: {'RUNYARD_DATABASE_URL' if os.environ.get('RUNYARD_DATABASE_URL') else 'embedded'}",
            flush=True,
        )
        if not args.skip_drain:
            print(
                f"\ndrain: opening {args.active} sessions through ResolveSession, then SIGTERM ...",
                flush=True,
            )
            drain = await measure_drain(database, workdir, args.active, args.drain_timeout_ms)
            results["drain"] = asdict(drain)
            ok = (
                drain.shutdown_events == drain.distinct_sessions == args.active and not drain.other_end_events
            )
            code |= 0 if ok else 1
            print(f"  opened in {drain.open_s:.1f} s ({args.active / max(drain.open_s, 1e-9):.0f}/s)")
            print(
                f"  session.end SHUTDOWN events durable in {drain.durable_write_ms:.0f} ms "
                f"({drain.shutdown_events} events, {drain.distinct_sessions} sessions: "
                f"{'exactly one each' if ok else 'MISMATCH'})"
            )
            print(f"  hook handler delivery: {drain.hooks_ms:.0f} ms (bound {drain.drain_timeout_ms} ms)")
            print(f"  SIGTERM to process exit: {drain.exit_ms:.0f} ms")
        if not args.skip_memory:
            memory: list[MemoryResult] = []
            for stored in args.stored:
                print(
                    f"\nmemory: {stored} stored sessions, paging (page_size {args.page_size}) and a "
                    "maintenance dry run ...",
                    flush=True,
                )
                result = await measure_memory(database, workdir, stored, args.page_size, args.sample_ms)
                memory.append(result)
                print(
                    f"  listed {result.listed} in {result.pages} pages, dry run streamed "
                    f"{result.pruned_dry_run}, "
                    f"{result.walk_s:.1f} s"
                )
                print(
                    f"  gateway  RSS idle {_mib(result.gateway_idle_kib)}, peak "
                    f"{_mib(result.gateway_peak_kib)}"
                )
                print(
                    f"  sessions RSS idle {_mib(result.sessions_idle_kib)}, peak "
                    f"{_mib(result.sessions_peak_kib)}"
                )
                if result.listed != stored or result.pruned_dry_run != stored:
                    code |= 1
            results["memory"] = [{k: v for k, v in asdict(m).items() if k != "series"} for m in memory]
            if len(memory) >= 2:
                low, high = memory[0], memory[-1]
                ratios = {
                    "gateway": high.gateway_peak_kib / max(low.gateway_peak_kib, 1),
                    "sessions": high.sessions_peak_kib / max(low.sessions_peak_kib, 1),
                }
                results["peak_rss_ratio"] = ratios
                print(
                    f"\npeak RSS, {high.stored_sessions} vs {low.stored_sessions} stored sessions: "
                    f"gateway x{ratios['gateway']:.3f}, sessions x{ratios['sessions']:.3f} "
                    "(target: within 10%)"
                )
                if max(ratios.values()) > 1.10:
                    code |= 1
    if args.json:
        # Once, after every measurement: blocking the loop here costs nothing.
        Path(args.json).write_text(json.dumps(results, indent=2))  # noqa: ASYNC240
    if code == 0:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        print(f"a check failed; service logs kept in {workdir}")
    return code


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; exit code 1 if a check or the 10 % target failed."""
    return asyncio.run(_run(args))
