"""``runyard bench stack``: what one conversation turn costs through the whole stack.

The benchmark starts, as separate processes on loopback:

* PostgreSQL: a scratch database created on ``--database-url`` (else
  ``RUNYARD_DATABASE_URL``) and dropped afterwards, else an embedded server
  (``pgserver``) in a temporary directory;
* one loopback OpenAI-compatible provider per ``--deltas`` value
  (``python -m runyard.bench.loopback --chunks D``: D text deltas per
  answer, no delay);
* the four services (``python -m runyard serve gateway|router|sessions|worker``,
  ``--workers`` workers of ``--worker-capacity`` runs each), configured by
  ``RUNYARD_*`` variables: one agent per delta count whose model is that
  provider, anonymous access, metrics off, no rate limit, defaults otherwise.

For each delta count and each ``--sessions`` value N (a "point") it drives N
sessions in parallel through the public gateway (``SendMessage``, one gRPC
channel): each session sends its messages back to back, each message a new
run; a session moves to a fresh session key every ``--turns-per-key``
messages so that transcript length, and with it per-run cost, is the same
at every N. Each message carries ``--message-bytes`` of random text (real
transcripts do not compress away in PostgreSQL's TOAST the way identical
messages would). The same load is also sent **directly** to the provider (same
concurrency, the router's own OpenAI adapter: httpx streaming + SSE
parsing), and, with ``--litellm``, through a LiteLLM proxy in front of the
same provider.

Per point, after a warm-up:

* completed runs/s (completions within the window / window; with ``--runs``,
  runs / time to the last completion), direct requests/s and their ratio;
* time to first token (first ``text_delta``) and to the end of the run
  (``completed``), p50/p99, through the stack and directly; the stack-added
  first-token latency is stack TTFT minus direct TTFT at the same
  percentile;
* CPU ms per run of each process (``/proc/<pid>/stat``, window plus a 0.5 s
  tail) and of PostgreSQL: the backends of the scratch database plus the
  server's background processes (see :mod:`runyard.bench.procstat`);
* run-queue wait ms per run of the same processes (the scratch database's
  backends for PostgreSQL): how long their threads were runnable but
  waiting for a CPU (``/proc/<pid>/task/*/schedstat``). It tells queueing
  for the 2 CPUs apart from slow code when latency grows with N;
* PostgreSQL commits (``xact_commit``: every transaction, read-only ones
  included), rows written (``tup_inserted + tup_updated + tup_deleted``) and
  WAL bytes per run. ``pg_stat_database`` is read after
  :data:`~runyard.bench.procstat.STATS_SETTLE_S` of quiet before and after
  the window, and the idle stack's own background commits and rows during
  the settling after it (measured over one more settling period) are taken
  out. WAL is the insert-LSN difference (whole server: other databases'
  writes included) and, with ``pg_walinspect``, the part attributable to the
  scratch database (read right after the window, from a sibling database
  ``<scratch>_wal`` so that the inspection's own transactions are not
  counted).

Then one session sends ``--turns`` (200) messages in a row and the WAL
written per turn is reported at turns 1, 100 and 200 (median of 5
consecutive turns each); the ratio turn 200 / turn 1 leaves out full-page
images (they follow checkpoints, not turns) when ``pg_walinspect`` can tell
them apart.

Targets (issue 10), PASS/MISS, exit code 1 on a miss or on any failed run:
at N = 32 with 8-delta answers at least 150 completed runs/s and a ratio of
at least 0.6; at N = 32 with 200-delta answers at least 60 runs/s; per
8-delta run (N = 32) at most 6 commits and at most 15 ms of CPU over all
services and PostgreSQL; stack-added first-token latency p50 at most 10 ms
at N = 1 and p99 at most 30 ms at N = 8; bytes per turn at turn 200 within
1.5x of turn 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc

from runyard._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from runyard.bench import percentile, procstat
from runyard.common import db
from runyard.common.auth import generate_run_token_keys, run_token_env
from runyard.common.config import ProviderConfig
from runyard.common.processes import Processes, free_port
from runyard.router.providers import OpenAIProvider, Request

__all__ = ["TARGETS", "add_arguments", "main"]

#: (key, description, comparison, limit); see :func:`_evaluate`.
TARGETS: list[tuple[str, str, str, float]] = [
    ("runs_per_s_n32_d8", "completed runs/s at N=32, 8 deltas", ">=", 150.0),
    ("ratio_n32_d8", "runs/s as a fraction of direct at N=32, 8 deltas", ">=", 0.6),
    ("runs_per_s_n32_d200", "completed runs/s at N=32, 200 deltas", ">=", 60.0),
    ("commits_per_run_d8", "PostgreSQL commits per 8-delta run (N=32)", "<=", 6.0),
    ("cpu_ms_per_run_d8", "CPU ms per 8-delta run, services + PostgreSQL (N=32)", "<=", 15.0),
    ("added_ttft_p50_n1", "stack-added first-token latency p50 at N=1, ms", "<=", 10.0),
    ("added_ttft_p99_n8", "stack-added first-token latency p99 at N=8, ms", "<=", 30.0),
    ("turn_bytes_ratio", "bytes written per turn, turn 200 / turn 1", "<=", 1.5),
]

SERVICES = ("gateway", "router", "sessions", "worker")
#: pg_stat_database counters reported per run.
_COUNTED = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted")
#: Extra time after a window's last run for work the run left behind
#: (outbox relays, WAL writer) to be counted with it.
TAIL_S = 0.5


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``runyard bench stack``."""
    parser.add_argument(
        "--database-url",
        help="PostgreSQL server for a scratch database, created and dropped by the bench "
        "(default: RUNYARD_DATABASE_URL, else an embedded pgserver)",
    )
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--duration-s", type=float, help="measured seconds per point (default 10)")
    amount.add_argument("--runs", type=int, help="measured runs per point instead of a duration")
    parser.add_argument("--warmup-s", type=float, help="warm-up seconds per point and mode (default 2)")
    parser.add_argument(
        "--sessions", type=_int_list, help="concurrent sessions N, comma-separated (default 1,8,32,64)"
    )
    parser.add_argument(
        "--deltas", type=_int_list, help="text deltas per answer, comma-separated (default 8,200)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument(
        "--worker-capacity", type=int, help="concurrent runs per worker (default: the largest N)"
    )
    parser.add_argument(
        "--turns-per-key",
        type=int,
        default=20,
        help="messages per session key before a session moves to a new key; 0 = never (default 20)",
    )
    parser.add_argument(
        "--turns", type=int, help="messages of the one-session growth measurement (default 200)"
    )
    parser.add_argument(
        "--message-bytes",
        type=int,
        default=200,
        help="random text per message, so transcripts grow as real ones do "
        "(identical messages would compress away in PostgreSQL's TOAST); default 200",
    )
    parser.add_argument(
        "--settle-s",
        type=float,
        help=f"quiet seconds before reading pg_stat_database (default {procstat.STATS_SETTLE_S:g}: "
        "PostgreSQL 15 publishes idle backends' counters after 10 s; less gives approximate counts)",
    )
    parser.add_argument("--litellm", action="store_true", help="also measure a LiteLLM proxy, if installed")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short smoke run: 1.5 s per point, N=1,8, 20 turns, 2 s settle (approximate counters)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The effective settings (``--quick`` changes only what was not given)."""
    quick = bool(args.quick)
    runs = args.runs
    duration = (
        args.duration_s if args.duration_s is not None else (None if runs else (1.5 if quick else 10.0))
    )
    sessions = args.sessions or ([1, 8] if quick else [1, 8, 32, 64])
    return {
        "duration_s": duration,
        "runs": runs,
        "warmup_s": args.warmup_s if args.warmup_s is not None else (0.5 if quick else 2.0),
        "sessions": sessions,
        "deltas": args.deltas or [8, 200],
        "workers": args.workers,
        "worker_capacity": args.worker_capacity or max(sessions),
        "turns_per_key": args.turns_per_key,
        "turns": args.turns if args.turns is not None else (20 if quick else 200),
        "message_bytes": args.message_bytes,
        "settle_s": args.settle_s
        if args.settle_s is not None
        else (2.0 if quick else procstat.STATS_SETTLE_S),
        "litellm": bool(args.litellm),
        "quick": quick,
    }


# --------------------------------------------------------------------------- processes


class _Processes(Processes):
    """Every process and resource the bench starts; :meth:`close` undoes all."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="runyard-bench-stack-")
        self.dir = Path(self.tmp.name)
        super().__init__(self.dir, die_with_parent=True)
        self.pg: Any = None
        self.server_url = ""
        self.databases: list[str] = []  # scratch databases to drop

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    async def close(self) -> None:
        # Workers hand back their runs first, then the gateway, then the rest.
        workers = [n for n in self.procs if n.startswith("worker")]
        for group in (workers, ["gateway"], [n for n in self.procs if n not in workers and n != "gateway"]):
            await self.stop(group)
        if self.databases:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                conn = await asyncpg.connect(self.server_url)
                try:
                    for name in self.databases:
                        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await conn.close()
        if self.pg is not None:
            await asyncio.to_thread(self.pg.cleanup)
        self.tmp.cleanup()


async def _database(database_url: str | None, procs: _Processes) -> tuple[str, str, str]:
    """``(server url, scratch database url, scratch database name)``.

    Also creates ``<name>_wal``, where the WAL inspector connects (so its own
    transactions stay out of the scratch database's counters). Both are
    dropped by ``procs.close``."""
    server_url = database_url or os.environ.get("RUNYARD_DATABASE_URL", "")
    if not server_url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            import pgserver

            procs.pg = await asyncio.to_thread(pgserver.get_server, procs.dir / "pg", cleanup_mode="stop")
        server_url = str(procs.pg.get_uri())
    name = f"runyard_bench_{uuid.uuid4().hex[:10]}"
    procs.server_url = server_url
    conn = await asyncpg.connect(server_url)
    try:
        for database in (name, f"{name}_wal"):
            await conn.execute(f'CREATE DATABASE "{database}"')
            procs.databases.append(database)
    finally:
        await conn.close()
    return server_url, _with_database(server_url, name), name


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _start_provider(name: str, deltas: int, procs: _Processes) -> int:
    """A loopback provider streaming ``deltas`` deltas; returns its port."""
    await procs.spawn(
        name, [sys.executable, "-m", "runyard.bench.loopback", "--port", "0", "--chunks", str(deltas)]
    )
    line = await procs.wait_log(name, "listening on ")
    return int(line.split()[-1])


def _agent(deltas: int) -> str:
    return f"bench_d{deltas}"


def _expected(deltas: int) -> str:
    """What the loopback provider answers (see :mod:`runyard.bench.loopback`)."""
    return "".join(f"tok{i} " for i in range(deltas))


async def _start_stack(
    settings: dict[str, Any], database_url: str, provider_ports: dict[int, int], procs: _Processes
) -> tuple[str, list[str]]:
    """The four services; returns the gateway address and the worker names."""
    ports = {"gateway": free_port(), "router": free_port(), "sessions": free_port()}
    gateway_internal = f"127.0.0.1:{free_port()}"
    private_key, _public_key = generate_run_token_keys()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "RUNYARD_DATABASE_URL": database_url,
            "RUNYARD_INTERNAL_SECRET": secrets.token_urlsafe(48),
            "RUNYARD_GATEWAY__INTERNAL_LISTEN": gateway_internal,
            "RUNYARD_ENDPOINTS__GATEWAY_INTERNAL": gateway_internal,
            "RUNYARD_AUTH__ANONYMOUS": "true",
            "RUNYARD_GATEWAY__RATE_LIMIT_RPS": "0",
            "RUNYARD_GATEWAY__MAX_STREAMS_PER_KEY": str(max(1000, 4 * max(settings["sessions"]))),
        }
    )
    for service, port in ports.items():
        env[f"RUNYARD_ENDPOINTS__{service.upper()}"] = f"127.0.0.1:{port}"
        env[f"RUNYARD_{service.upper()}__LISTEN"] = f"127.0.0.1:{port}"
        env[f"RUNYARD_{service.upper()}__METRICS_PORT"] = "0"
    for deltas, port in provider_ports.items():
        env[f"RUNYARD_PROVIDERS__LOOP_D{deltas}__TYPE"] = "openai"
        env[f"RUNYARD_PROVIDERS__LOOP_D{deltas}__BASE_URL"] = f"http://127.0.0.1:{port}/v1"
        env[f"RUNYARD_AGENTS__{_agent(deltas).upper()}__MODEL"] = f"loop_d{deltas}/bench"
    serve = [sys.executable, "-m", "runyard", "serve"]
    for service in ("sessions", "router", "gateway"):
        await procs.spawn(service, [*serve, service], {**env, **run_token_env(service, private_key)})
    await asyncio.gather(
        *(procs.wait_healthy(s, f"127.0.0.1:{ports[s]}") for s in ("sessions", "router", "gateway"))
    )
    workers = []
    for index in range(1, settings["workers"] + 1):
        name = f"worker-{index}"
        port = free_port()
        worker_env = {**env, **run_token_env("worker", private_key)}
        worker_env.update(
            {
                "RUNYARD_WORKER__LISTEN": f"127.0.0.1:{port}",
                "RUNYARD_WORKER__METRICS_PORT": "0",
                "RUNYARD_WORKER__WORKER_ID": name,
                "RUNYARD_WORKER__CAPACITY": str(settings["worker_capacity"]),
            }
        )
        await procs.spawn(name, [*serve, "worker"], worker_env)
        workers.append(name)
    for name in workers:
        await procs.wait_log(name, "connected to gateway")
    return f"127.0.0.1:{ports['gateway']}", workers


# --------------------------------------------------------------------------- load


class _RunError(Exception):
    pass


@dataclass
class Load:
    """One closed-loop load: latencies in seconds."""

    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)
    completed: int = 0
    in_window: int = 0
    elapsed_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0

    @property
    def per_s(self) -> float:
        return self.in_window / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def figures(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "per_s": self.per_s,
            "elapsed_s": self.elapsed_s,
            "ttft_p50_ms": percentile(self.ttft, 50) * 1000,
            "ttft_p99_ms": percentile(self.ttft, 99) * 1000,
            "total_p50_ms": percentile(self.total, 50) * 1000,
            "total_p99_ms": percentile(self.total, 99) * 1000,
            "errors": self.error_count,
            "first_errors": self.errors[:5],
        }


Call = Callable[[int, int], Awaitable[tuple[float, float]]]


async def _drive(n: int, call: Call, *, duration_s: float | None, runs: int | None) -> Load:
    """N loops calling ``call(session, turn)`` back to back.

    With ``duration_s``: no new call after the deadline; throughput counts
    the calls that ended within it. With ``runs``: that many calls in all;
    throughput is runs / time to the last end. Calls in flight are awaited
    either way (their latencies are kept)."""
    load = Load()
    remaining = runs if runs is not None else -1
    started = time.perf_counter()
    deadline = started + duration_s if duration_s is not None else float("inf")
    last_end = started

    async def loop(session: int) -> None:
        nonlocal remaining, last_end
        turn = 0
        while True:
            if runs is not None:
                if remaining <= 0:
                    return
                remaining -= 1
            elif time.perf_counter() >= deadline:
                return
            try:
                ttft, total = await call(session, turn)
            except _RunError as exc:
                load.error_count += 1
                if len(load.errors) < 20:
                    load.errors.append(str(exc))
                await asyncio.sleep(0.05)
                continue
            finally:
                turn += 1
            end = time.perf_counter()
            last_end = max(last_end, end)
            load.ttft.append(ttft)
            load.total.append(total)
            load.completed += 1
            if end <= deadline:
                load.in_window += 1

    await asyncio.gather(*(loop(i) for i in range(n)))
    load.elapsed_s = duration_s if duration_s is not None else last_end - started
    return load


def _filler(size: int) -> str:
    """``size`` characters of random URL-safe text (does not compress)."""
    return secrets.token_urlsafe(size)[:size] if size > 0 else ""


class _StackCaller:
    """``SendMessage`` through the gateway, timed; checks the final answer."""

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayServiceStub,
        deltas: int,
        prefix: str,
        turns_per_key: int,
        message_bytes: int,
    ):
        self.stub = stub
        self.message_bytes = message_bytes
        self.agent = _agent(deltas)
        self.expected = _expected(deltas)
        self.prefix = prefix
        self.turns_per_key = turns_per_key

    def key(self, session: int, turn: int) -> str:
        rotation = turn // self.turns_per_key if self.turns_per_key else 0
        return f"{self.prefix}:{session}:{rotation}"

    async def __call__(self, session: int, turn: int) -> tuple[float, float]:
        text = f"message {turn} of session {session}: {_filler(self.message_bytes)}"
        request = gateway_pb2.SendMessageRequest(
            session_key=self.key(session, turn), agent_id=self.agent, text=text
        )
        started = time.perf_counter()
        first: float | None = None
        final: str | None = None
        try:
            async for event in self.stub.SendMessage(request, timeout=120):
                kind = event.WhichOneof("event")
                if kind == "text_delta":
                    if first is None:
                        first = time.perf_counter()
                elif kind == "completed":
                    final = event.completed.message.content
                elif kind in ("failed", "cancelled"):
                    detail = event.failed.error.message if kind == "failed" else ""
                    raise _RunError(f"run {kind}: {detail}")
        except grpc.aio.AioRpcError as exc:
            raise _RunError(f"SendMessage: {exc.code().name}: {exc.details()}") from None
        end = time.perf_counter()
        if final != self.expected or first is None:
            raise _RunError(f"unexpected answer {str(final)[:80]!r}")
        return first - started, end - started


class _DirectCaller:
    """The provider called directly with the router's OpenAI adapter."""

    def __init__(self, base_url: str, model: str, deltas: int, message_bytes: int, api_key: str = ""):
        self.api_key = api_key
        self.provider = OpenAIProvider("direct", ProviderConfig(type="openai", base_url=base_url))
        self.model = model
        self.expected = _expected(deltas)
        self.messages = [
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="You are a helpful assistant."),
            common_pb2.Message(
                role=common_pb2.ROLE_USER, content=f"message 0 of session 0: {_filler(message_bytes)}"
            ),
        ]

    async def __call__(self, session: int, turn: int) -> tuple[float, float]:
        started = time.perf_counter()
        first: float | None = None
        text: list[str] = []
        try:
            async for chunk in self.provider.stream(
                Request(model=self.model, messages=self.messages), self.api_key
            ):
                if chunk.kind == "text":
                    if first is None:
                        first = time.perf_counter()
                    text.append(chunk.text)
        except Exception as exc:  # noqa: BLE001 - any adapter error is a failed request here
            raise _RunError(f"direct: {type(exc).__name__}: {exc}") from None
        end = time.perf_counter()
        if "".join(text) != self.expected or first is None:
            raise _RunError(f"direct answer {''.join(text)[:80]!r}")
        return first - started, end - started

    async def aclose(self) -> None:
        await self.provider.aclose()


# --------------------------------------------------------------------------- measurement


class _Bench:
    """State of one benchmark run."""

    def __init__(self, settings: dict[str, Any], procs: _Processes):
        self.settings = settings
        self.procs = procs
        self.workers: list[str] = []
        self.provider_ports: dict[int, int] = {}
        self.database = ""
        self.admin: db.Connection | None = None
        self.pg = procstat.PgProcesses(None, "not located")
        self.wal = procstat.WalInspector(None, 0, "not opened")
        self.stub: gateway_pb2_grpc.GatewayServiceStub | None = None
        self.litellm_port = 0
        self.litellm_key = ""
        self.litellm_note = ""
        self.point_index = 0

    # -- counters

    def _service_pids(self, deltas: int | None = None) -> dict[str, list[int]]:
        pids = {
            "gateway": [self.procs.pid("gateway")],
            "router": [self.procs.pid("router")],
            "sessions": [self.procs.pid("sessions")],
            "worker": [self.procs.pid(w) for w in self.workers],
            "bench_client": [os.getpid()],
        }
        if deltas is not None:
            pids["provider"] = [self.procs.pid(f"provider-d{deltas}")]
        return pids

    @staticmethod
    def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
        return {name: sum(procstat.cpu_seconds(pid) or 0.0 for pid in group) for name, group in pids.items()}

    @staticmethod
    def _waits(pids: dict[str, list[int]]) -> dict[str, float]:
        return {
            name: sum(procstat.run_queue_wait_seconds(pid) or 0.0 for pid in group)
            for name, group in pids.items()
        }

    async def _snapshot(self, deltas: int | None) -> dict[str, Any]:
        assert self.admin is not None
        pids = self._service_pids(deltas)
        return {
            "time": time.perf_counter(),
            "cpu": self._cpu(pids),
            "wait": self._waits(pids),
            "pg_cpu": await self.pg.sample(self.admin, self.database),
            "lsn": await procstat.wal_insert_lsn(self.admin),
        }

    # -- phases

    async def idle_baseline(self) -> dict[str, Any]:
        """Background work of the idle stack: commits/s and CPU ms/s."""
        assert self.admin is not None
        seconds = self.settings["settle_s"]
        await asyncio.sleep(seconds)  # let the start-up's statistics be published
        before = await self._snapshot(None)
        counters = await procstat.db_counters(self.admin, self.database)
        await asyncio.sleep(seconds)
        after = await self._snapshot(None)
        later = await procstat.db_counters(self.admin, self.database)
        elapsed = after["time"] - before["time"]
        cpu = {k: (after["cpu"][k] - before["cpu"][k]) * 1000 / elapsed for k in after["cpu"]}
        pg = before["pg_cpu"].delta(after["pg_cpu"])
        if self.pg.available:
            cpu["postgres"] = pg["db"] * 1000 / elapsed
            cpu["postgres_background"] = pg["background"] * 1000 / elapsed
        return {
            "seconds": elapsed,
            "commits_per_s": (later["xact_commit"] - counters["xact_commit"]) / elapsed,
            "cpu_ms_per_s": cpu,
            "wal_bytes_per_s": (after["lsn"] - before["lsn"]) / elapsed,
        }

    def _amount(self) -> dict[str, Any]:
        return {"duration_s": self.settings["duration_s"], "runs": self.settings["runs"]}

    async def _side_load(
        self, base_url: str, model: str, deltas: int, n: int, pid: int | None, api_key: str = ""
    ) -> dict[str, Any]:
        """Direct (or LiteLLM) load: warm-up, then the measured window."""
        caller = _DirectCaller(base_url, model, deltas, self.settings["message_bytes"], api_key)
        try:
            await _drive(n, caller, duration_s=self.settings["warmup_s"], runs=None)
            cpu_before = procstat.cpu_seconds(pid) if pid else None
            load = await _drive(n, caller, **self._amount())
            cpu_after = procstat.cpu_seconds(pid) if pid else None
        finally:
            await caller.aclose()
        figures = load.figures()
        if cpu_before is not None and cpu_after is not None and load.completed:
            figures["server_cpu_ms_per_request"] = (cpu_after - cpu_before) * 1000 / load.completed
        figures["ttft"] = load.ttft
        return figures

    async def point(self, deltas: int, n: int) -> dict[str, Any]:
        assert self.admin is not None and self.stub is not None
        self.point_index += 1
        settings = self.settings
        load_average = os.getloadavg()
        prefix = f"bench:{self.point_index}:d{deltas}:n{n}"
        # 1. Warm up the stack at this concurrency (connections, pools, code paths).
        await _drive(
            n,
            _StackCaller(
                self.stub, deltas, prefix + ":warm", settings["turns_per_key"], settings["message_bytes"]
            ),
            duration_s=settings["warmup_s"],
            runs=None,
        )
        quiet_from = time.monotonic()
        # 2. While PostgreSQL's statistics settle: the same load sent directly
        #    to the provider (and through LiteLLM); neither touches PostgreSQL.
        provider_url = f"http://127.0.0.1:{self.provider_ports[deltas]}/v1"
        direct = await self._side_load(
            provider_url, "bench", deltas, n, self.procs.pid(f"provider-d{deltas}")
        )
        litellm = None
        if self.litellm_port:
            litellm = await self._side_load(
                f"http://127.0.0.1:{self.litellm_port}/v1",
                _agent(deltas),
                deltas,
                n,
                self.procs.pid("litellm"),
                self.litellm_key,
            )
        await asyncio.sleep(max(0.0, settings["settle_s"] - (time.monotonic() - quiet_from)))
        # 3. The measured window.
        counters_before = await procstat.db_counters(self.admin, self.database)
        before = await self._snapshot(deltas)
        await self.wal.hold(before["lsn"])
        stack = await _drive(
            n,
            _StackCaller(self.stub, deltas, prefix, settings["turns_per_key"], settings["message_bytes"]),
            **self._amount(),
        )
        await asyncio.sleep(TAIL_S)
        after = await self._snapshot(deltas)
        # WAL segments are recycled after a checkpoint: read the range now.
        wal = await self.wal.attribute(before["lsn"], after["lsn"])
        wal_error = self.wal.reason if wal is None and self.wal.available else ""
        # 4. Quiet again until every backend has published its counters; then
        #    the same again, to measure the idle stack's own background commits
        #    (sequencers, pollers) and take the settling period's share out.
        await asyncio.sleep(settings["settle_s"])
        counters_after = await procstat.db_counters(self.admin, self.database)
        settled_at = time.perf_counter()
        await asyncio.sleep(settings["settle_s"])
        counters_later = await procstat.db_counters(self.admin, self.database)
        background = {
            name: (counters_later[name] - counters_after[name]) / (time.perf_counter() - settled_at)
            for name in ("xact_commit", "tup_inserted", "tup_updated", "tup_deleted")
        }
        return self._point_figures(
            deltas,
            n,
            load_average,
            stack,
            direct,
            litellm,
            before,
            after,
            (counters_before, counters_after, background, settled_at - after["time"]),
            wal,
            wal_error,
        )

    def _point_figures(
        self,
        deltas: int,
        n: int,
        load_average: tuple[float, float, float],
        stack: Load,
        direct: dict[str, Any],
        litellm: dict[str, Any] | None,
        before: dict[str, Any],
        after: dict[str, Any],
        counters: tuple[dict[str, Any], dict[str, Any], dict[str, float], float],
        wal: dict[str, int] | None,
        wal_error: str,
    ) -> dict[str, Any]:
        """``counters``: readings before and after, background rates per
        second and the seconds of settling after the window they cover."""
        runs = max(stack.completed, 1)
        figures = stack.figures()
        direct_ttft = direct.pop("ttft")
        cpu = {k: (after["cpu"][k] - before["cpu"][k]) * 1000 / runs for k in after["cpu"]}
        services = sum(cpu[s] for s in SERVICES)
        pg_cpu = before["pg_cpu"].delta(after["pg_cpu"])
        cpu["services"] = services
        if self.pg.available:
            cpu["postgres"] = pg_cpu["db"] * 1000 / runs
            cpu["postgres_background"] = pg_cpu["background"] * 1000 / runs
            cpu["total"] = services + cpu["postgres"] + cpu["postgres_background"]
        # Time runnable but waiting for a CPU: queueing, where CPU time is cost.
        wait = {k: (after["wait"][k] - before["wait"][k]) * 1000 / runs for k in after["wait"]}
        wait["services"] = sum(wait[s] for s in SERVICES)
        if self.pg.available:
            wait["postgres"] = before["pg_cpu"].wait_delta(after["pg_cpu"])["db"] * 1000 / runs
            wait["total"] = wait["services"] + wait["postgres"]
        counters_before, counters_after, background, settling_s = counters
        raw = {k: counters_after[k] - counters_before[k] for k in _COUNTED}
        # Counts with the settling period's background taken out (see point()).
        diff = {k: raw[k] - background.get(k, 0.0) * settling_s for k in _COUNTED}
        pg: dict[str, Any] = {
            "commits_per_run": diff["xact_commit"] / runs,
            "commits_per_run_raw": raw["xact_commit"] / runs,
            "rollbacks_per_run": diff["xact_rollback"] / runs,
            "rows_written_per_run": (diff["tup_inserted"] + diff["tup_updated"] + diff["tup_deleted"]) / runs,
            "rows_written_per_run_raw": (raw["tup_inserted"] + raw["tup_updated"] + raw["tup_deleted"])
            / runs,
            "rows_inserted_per_run": diff["tup_inserted"] / runs,
            "rows_updated_per_run": diff["tup_updated"] / runs,
            "rows_deleted_per_run": diff["tup_deleted"] / runs,
            "background_commits_per_s": background["xact_commit"],
            "settling_s": settling_s,
            "wal_bytes_per_run_server": (after["lsn"] - before["lsn"]) / runs,
            "other_databases_commits": procstat.other_commits(counters_before, counters_after),
            "backends_exited": int(pg_cpu["exited"]),
        }
        if wal_error:
            pg["wal_error"] = wal_error
        if wal is not None:
            pg["wal_bytes_per_run"] = wal["bytes"] / runs
            pg["wal_fpi_bytes_per_run"] = wal["fpi_bytes"] / runs
            pg["wal_records_per_run"] = wal["records"] / runs
            pg["write_commits_per_run"] = wal["write_commits"] / runs
        result: dict[str, Any] = {
            "deltas": deltas,
            "sessions": n,
            "load_average": list(load_average),
            "stack": figures,
            "direct": direct,
            "ratio": figures["per_s"] / direct["per_s"] if direct["per_s"] else float("nan"),
            "added_ttft_p50_ms": figures["ttft_p50_ms"] - percentile(direct_ttft, 50) * 1000,
            "added_ttft_p99_ms": figures["ttft_p99_ms"] - percentile(direct_ttft, 99) * 1000,
            "cpu_ms_per_run": cpu,
            "run_queue_wait_ms_per_run": wait,
            "pg": pg,
        }
        if litellm is not None:
            litellm.pop("ttft", None)
            result["litellm"] = litellm
        return result

    async def turns(self, deltas: int) -> dict[str, Any]:
        """One session, ``turns`` messages in a row: WAL bytes per turn."""
        assert self.admin is not None and self.stub is not None
        count = self.settings["turns"]
        width = min(5, max(1, count // 4))
        samples = sorted({1, max(1, count // 2), count})
        windows: dict[int, tuple[int, int]] = {}
        for turn in samples:
            low = max(1, min(turn - width // 2, count - width + 1))
            windows[turn] = (low, low + width - 1)
        window_end = {end: turn for turn, (_, end) in windows.items()}
        caller = _StackCaller(
            self.stub, deltas, f"bench:turns:{uuid.uuid4().hex[:8]}", 0, self.settings["message_bytes"]
        )
        per_turn: dict[int, dict[str, Any]] = {}
        errors: list[str] = []
        wal_errors: list[str] = []
        starts = {low for low, _ in windows.values()}
        inside = {t for low, high in windows.values() for t in range(low + 1, high + 1)}
        for turn in range(1, count + 1):
            start = await procstat.wal_insert_lsn(self.admin)
            if turn in starts or turn not in inside:
                await self.wal.hold(start)  # keep this window's WAL until it is read
                start = await procstat.wal_insert_lsn(self.admin)
            try:
                _, total = await caller(0, turn - 1)
            except _RunError as exc:
                errors.append(f"turn {turn}: {exc}")
                if len(errors) > 5:
                    break
                continue
            end = await procstat.wal_insert_lsn(self.admin)
            per_turn[turn] = {"server": end - start, "latency_s": total, "range": (start, end)}
            if turn in window_end:
                low, high = windows[window_end[turn]]
                for index in range(low, high + 1):
                    if index in per_turn:
                        lo, hi = per_turn[index]["range"]
                        wal = await self.wal.attribute(lo, hi)
                        per_turn[index]["db"] = wal["bytes"] if wal is not None else None
                        per_turn[index]["db_no_fpi"] = (
                            wal["bytes"] - wal["fpi_bytes"] if wal is not None else None
                        )
                        if wal is None and self.wal.available:
                            wal_errors.append(f"turn {index}: {self.wal.reason}")
        result: dict[str, Any] = {
            "turns": count,
            "deltas": deltas,
            "window": width,
            "samples": {},
            "errors": errors,
            "wal_errors": wal_errors[:5],
        }
        for turn, (low, high) in windows.items():
            rows = [per_turn[i] for i in range(low, high + 1) if i in per_turn]
            if not rows:
                continue
            db_values = [r["db"] for r in rows if r.get("db") is not None]
            no_fpi = [r["db_no_fpi"] for r in rows if r.get("db_no_fpi") is not None]
            result["samples"][str(turn)] = {
                "turns": [low, high],
                "server_bytes_median": statistics.median(r["server"] for r in rows),
                "server_bytes_mean": statistics.fmean(r["server"] for r in rows),
                "db_bytes_median": statistics.median(db_values) if db_values else None,
                "db_bytes_mean": statistics.fmean(db_values) if db_values else None,
                "db_bytes_no_fpi_median": statistics.median(no_fpi) if no_fpi else None,
                "run_ms_median": statistics.median(r["latency_s"] for r in rows) * 1000,
            }
        first, last = result["samples"].get("1"), result["samples"].get(str(count))
        if first and last:
            # Full-page images depend on when checkpoints happen, not on the
            # turn: compare without them where pg_walinspect can tell them apart.
            key = (
                "db_bytes_no_fpi_median"
                if first["db_bytes_no_fpi_median"] and last["db_bytes_no_fpi_median"]
                else "server_bytes_median"
            )
            result["ratio_basis"] = key
            result["ratio"] = last[key] / first[key] if first[key] else float("nan")
        return result

    async def start_litellm(self) -> None:
        """A LiteLLM proxy in front of the loopback providers, if installed."""
        missing = [m for m in ("litellm", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
        if missing:
            self.litellm_note = (
                f"LiteLLM skipped: {', '.join(missing)} not importable (pip install 'litellm[proxy]')"
            )
            return
        lines = ["model_list:"]
        for deltas, port in self.provider_ports.items():
            lines += [
                f"  - model_name: {_agent(deltas)}",
                "    litellm_params:",
                "      model: openai/bench",
                f"      api_base: http://127.0.0.1:{port}/v1",
                "      api_key: unused",
            ]
        config = self.procs.dir / "litellm.yaml"
        config.write_text("\n".join(lines) + "\n")
        port = free_port()
        env = dict(os.environ)
        env.setdefault("LITELLM_LOG", "ERROR")
        # The proxy refuses to start without a master key (LiteLLM 1.106+).
        self.litellm_key = "sk-bench-" + secrets.token_urlsafe(24)
        env["LITELLM_MASTER_KEY"] = self.litellm_key
        await self.procs.spawn(
            "litellm",
            [
                sys.executable,
                "-c",
                "import sys; from litellm import run_server; sys.exit(run_server())",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--num_workers",
                "1",
            ],
            env,
        )
        await self.procs.wait_http("litellm", f"http://127.0.0.1:{port}/health/liveliness")
        self.litellm_port = port
        version = importlib.metadata.version("litellm")
        self.litellm_note = f"LiteLLM proxy {version}, one process, no database (nothing persisted)"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("grpcio", "protobuf", "asyncpg", "httpx"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            check=False,
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if described.returncode == 0:
            out["runyard_commit"] = described.stdout.strip()
    return out


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


async def _run(settings: dict[str, Any], database_url: str | None) -> dict[str, Any]:
    procs = _Processes()
    bench = _Bench(settings, procs)
    results: dict[str, Any] = {
        "settings": settings,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "cpu_model": procstat.cpu_model(),
            "memory_gib": round(procstat.memory_gib(), 1),
            "load_average_before": list(os.getloadavg()),
            **_versions(),
        },
        "points": [],
        "notes": [],
    }
    try:
        server_url, scratch_url, name = await _database(database_url, procs)
        bench.database = name
        results["database"] = {
            "server": "embedded pgserver" if procs.pg is not None else _redact(server_url),
            "scratch_database": name,
        }
        bench.admin = await asyncpg.connect(server_url)
        results["machine"]["postgresql"] = await bench.admin.fetchval("SHOW server_version")
        bench.pg = await procstat.PgProcesses.locate(bench.admin)
        if not bench.pg.available:
            results["notes"].append(f"PostgreSQL CPU not measured: {bench.pg.reason}")
        bench.wal = await procstat.WalInspector.open(_with_database(server_url, f"{name}_wal"), name)
        if bench.wal.available and bench.wal.slot_note:
            results["notes"].append(bench.wal.slot_note)
        if not bench.wal.available:
            results["notes"].append(
                f"WAL per database not measured ({bench.wal.reason}); WAL figures are whole-server LSN "
                "differences"
            )
        for deltas in settings["deltas"]:
            bench.provider_ports[deltas] = await _start_provider(f"provider-d{deltas}", deltas, procs)
        address, bench.workers = await _start_stack(settings, scratch_url, bench.provider_ports, procs)
        if settings["litellm"]:
            await bench.start_litellm()
            results["notes"].append(bench.litellm_note)
        async with grpc.aio.insecure_channel(address) as channel:
            bench.stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            results["idle"] = await bench.idle_baseline()
            for deltas in settings["deltas"]:
                for n in settings["sessions"]:
                    point = await bench.point(deltas, n)
                    results["points"].append(point)
                    print(_point_line(point), file=sys.stderr, flush=True)
            results["turns"] = await bench.turns(settings["deltas"][0])
        results["machine"]["load_average_after"] = list(os.getloadavg())
        if bench.wal.available and bench.wal.slot_note and bench.wal.slot_note not in results["notes"]:
            results["notes"].append(bench.wal.slot_note)
        return results
    finally:
        await bench.wal.close()
        if bench.admin is not None:
            await bench.admin.close()
        await procs.close()


# --------------------------------------------------------------------------- report


def _find(results: dict[str, Any], deltas: int, n: int) -> dict[str, Any] | None:
    points: list[dict[str, Any]] = results["points"]
    for point in points:
        if point["deltas"] == deltas and point["sessions"] == n:
            return point
    return None


def _target_values(results: dict[str, Any]) -> dict[str, float | None]:
    values: dict[str, float | None] = {key: None for key, *_ in TARGETS}
    p = _find(results, 8, 32)
    if p is not None:
        values["runs_per_s_n32_d8"] = p["stack"]["per_s"]
        values["ratio_n32_d8"] = p["ratio"]
        values["commits_per_run_d8"] = p["pg"]["commits_per_run"]
        values["cpu_ms_per_run_d8"] = p["cpu_ms_per_run"].get("total")
    p = _find(results, 200, 32)
    if p is not None:
        values["runs_per_s_n32_d200"] = p["stack"]["per_s"]
    p = _find(results, 8, 1)
    if p is not None:
        values["added_ttft_p50_n1"] = p["added_ttft_p50_ms"]
    p = _find(results, 8, 8)
    if p is not None:
        values["added_ttft_p99_n8"] = p["added_ttft_p99_ms"]
    turns = results.get("turns") or {}
    if turns.get("turns") == 200 and turns.get("deltas") == 8 and "ratio" in turns:
        values["turn_bytes_ratio"] = turns["ratio"]
    return values


def _evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its value and verdict: PASS, MISS or n/a (not
    measured with these options, e.g. N=32 not in ``--sessions``)."""
    values = _target_values(results)
    out = []
    for key, text, op, limit in TARGETS:
        value = values[key]
        if value is None or math.isnan(value):
            verdict = "n/a"
        else:
            verdict = "PASS" if (value >= limit if op == ">=" else value <= limit) else "MISS"
        out.append({"key": key, "target": f"{text} {op} {limit:g}", "value": value, "verdict": verdict})
    return out


_MODES = ("stack", "direct", "litellm")


def _failed(results: dict[str, Any]) -> int:
    """Failed runs and requests over every point and mode."""
    return sum(p[mode]["errors"] for p in results["points"] for mode in _MODES if mode in p)


def _f(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _point_line(p: dict[str, Any]) -> str:
    return (
        f"  d={p['deltas']} N={p['sessions']}: {p['stack']['per_s']:.1f} runs/s "
        f"(direct {p['direct']['per_s']:.1f}/s), TTFT p50 {p['stack']['ttft_p50_ms']:.1f} ms, "
        f"{p['pg']['commits_per_run']:.1f} commits/run, CPU {_f(p['cpu_ms_per_run'].get('total'))} ms/run"
    )


def _report(results: dict[str, Any]) -> str:
    m, s = results["machine"], results["settings"]
    amount = f"{s['runs']} runs" if s["runs"] else f"{s['duration_s']:g} s"
    lines = [
        f"runyard bench stack ({results['started']}, commit {m.get('runyard_commit', '?')})",
        (
            f"machine: {m['cpus']} CPUs ({m['cpu_model'] or 'unknown model'}), {m['memory_gib']} GiB; load "
            "average "
            f"{m['load_average_before'][0]:.2f} before, "
            f"{m.get('load_average_after', [float('nan')])[0]:.2f} after; "
            f"Python {m['python']}, PostgreSQL {m.get('postgresql', '?')} ({results['database']['server']}), "
            f"grpcio {m.get('grpcio', '?')}, httpx {m.get('httpx', '?')}"
        ),
        f"setup: {s['workers']} worker(s) of capacity {s['worker_capacity']}; each of N sessions sends "
        "messages "
        f"back to back (new session key every {s['turns_per_key'] or 'never'} turns); {amount} per point "
        "after "
        f"{s['warmup_s']:g} s warm-up; counters read after {s['settle_s']:g} s of quiet"
        + (
            " (shorter than PostgreSQL's 10 s idle flush: commits and rows are approximate)"
            if s["settle_s"] < procstat.STATS_SETTLE_S
            else ""
        ),
    ]
    idle = results.get("idle")
    if idle:
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in idle["cpu_ms_per_s"].items() if k != "bench_client")
        lines.append(
            f"idle stack: {idle['commits_per_s']:.1f} commits/s, {idle['wal_bytes_per_s']:.0f} WAL bytes/s "
            f"(server), CPU ms/s: {cpu}"
        )
    lines += [
        "",
        "throughput and latency (ms; added TTFT = stack TTFT - direct TTFT at the same percentile)",
        (
            f"{'deltas':>6} {'N':>3} {'runs/s':>8} {'direct/s':>9} {'ratio':>6} {'TTFT p50':>9} {'p99':>8} "
            f"{'run p50':>8} {'p99':>8} {'dir TTFT p50':>12} {'p99':>7} {'added p50':>9} {'p99':>8} "
            f"{'load':>5}"
        ),
    ]
    for p in results["points"]:
        st, d = p["stack"], p["direct"]
        lines.append(
            f"{p['deltas']:>6} {p['sessions']:>3} {st['per_s']:>8.1f} {d['per_s']:>9.1f} {p['ratio']:>6.3f} "
            f"{st['ttft_p50_ms']:>9.2f} {st['ttft_p99_ms']:>8.2f} {st['total_p50_ms']:>8.2f} "
            f"{st['total_p99_ms']:>8.2f} {d['ttft_p50_ms']:>12.2f} {d['ttft_p99_ms']:>7.2f} "
            f"{p['added_ttft_p50_ms']:>9.2f} {p['added_ttft_p99_ms']:>8.2f} {p['load_average'][0]:>5.2f}"
        )
    lines += [
        "",
        "CPU ms per run (postgres = backends of the scratch database; pg bg = server background processes)",
        (
            f"{'deltas':>6} {'N':>3} {'gateway':>8} {'router':>7} {'sessions':>8} {'worker':>7} "
            f"{'postgres':>8} "
            f"{'pg bg':>6} {'total':>7} {'provider':>8} {'client':>7}"
        ),
    ]
    for p in results["points"]:
        c = p["cpu_ms_per_run"]
        lines.append(
            f"{p['deltas']:>6} {p['sessions']:>3} {c['gateway']:>8.2f} {c['router']:>7.2f} "
            f"{c['sessions']:>8.2f} "
            f"{c['worker']:>7.2f} {_f(c.get('postgres'), 2):>8} {_f(c.get('postgres_background'), 2):>6} "
            f"{_f(c.get('total'), 2):>7} {c['provider']:>8.2f} {c['bench_client']:>7.2f}"
        )
    lines += [
        "",
        "run-queue wait ms per run (threads runnable but waiting for a CPU, summed over threads; "
        "where CPU ms is the cost, this is the queueing for the CPUs)",
        (
            f"{'deltas':>6} {'N':>3} {'gateway':>8} {'router':>7} {'sessions':>8} {'worker':>7} "
            f"{'postgres':>8} {'total':>7} {'provider':>8} {'client':>7}"
        ),
    ]
    for p in results["points"]:
        w = p.get("run_queue_wait_ms_per_run")
        if w is None:  # a JSON file written before this figure existed
            continue
        lines.append(
            f"{p['deltas']:>6} {p['sessions']:>3} {w['gateway']:>8.2f} {w['router']:>7.2f} "
            f"{w['sessions']:>8.2f} {w['worker']:>7.2f} {_f(w.get('postgres'), 2):>8} "
            f"{_f(w.get('total'), 2):>7} {w['provider']:>8.2f} {w['bench_client']:>7.2f}"
        )
    lines += [
        "",
        (
            "PostgreSQL per run: commits = xact_commit (every transaction, read-only included) and rows ="
            " tup_inserted+updated+deleted, both less the idle stack's background (bg c/s) during the "
            "settling;"
            " w-commits = commit records in WAL; WAL db = records of the scratch database's transactions"
            " (pg_walinspect); WAL server = insert-LSN difference (every database)"
        ),
        (
            f"{'deltas':>6} {'N':>3} {'commits':>8} {'raw':>7} {'bg c/s':>6} {'w-commits':>9} {'rows':>7} "
            f"{'ins/upd/del':>17} {'WAL db':>9} {'of it FPI':>9} {'WAL server':>10} {'other-db commits':>16}"
        ),
    ]
    for p in results["points"]:
        g = p["pg"]
        rows = "/".join(f"{g[f'rows_{kind}_per_run']:.1f}" for kind in ("inserted", "updated", "deleted"))
        lines.append(
            f"{p['deltas']:>6} {p['sessions']:>3} {g['commits_per_run']:>8.2f} "
            f"{g['commits_per_run_raw']:>7.2f} "
            f"{g['background_commits_per_s']:>6.1f} "
            f"{_f(g.get('write_commits_per_run'), 2):>9} {g['rows_written_per_run']:>7.1f} {rows:>17} "
            f"{_f(g.get('wal_bytes_per_run'), 0):>9} {_f(g.get('wal_fpi_bytes_per_run'), 0):>9} "
            f"{g['wal_bytes_per_run_server']:>10,.0f} {g['other_databases_commits']:>16}"
        )
        if g.get("wal_error"):
            lines.append(f"{'':>10} WAL db not measured: {g['wal_error']}")
    exited = [
        f"d={p['deltas']} N={p['sessions']}: {p['pg']['backends_exited']}"
        for p in results["points"]
        if p["pg"]["backends_exited"]
    ]
    if exited:
        lines.append(
            "PostgreSQL processes of the scratch database that exited during a window (their CPU after the "
            "first "
            "sample is not counted): " + ", ".join(exited)
        )
    litellm = [p for p in results["points"] if "litellm" in p]
    if litellm:
        lines += [
            "",
            "LiteLLM proxy, same provider and concurrency",
            f"{'deltas':>6} {'N':>3} {'req/s':>8} {'TTFT p50':>9} {'p99':>8} {'CPU ms/req':>10}",
        ]
        for p in litellm:
            ll = p["litellm"]
            lines.append(
                f"{p['deltas']:>6} {p['sessions']:>3} {ll['per_s']:>8.1f} {ll['ttft_p50_ms']:>9.2f} "
                f"{ll['ttft_p99_ms']:>8.2f} {_f(ll.get('server_cpu_ms_per_request'), 2):>10}"
            )
    turns = results.get("turns")
    if turns:
        lines += [
            "",
            (
                f"bytes written per turn, one session, {turns['turns']} turns of {turns['deltas']} deltas "
                f"(median over {turns['window']} consecutive turns around each)"
            ),
        ]
        for turn, sample in turns["samples"].items():
            low, high = sample["turns"]
            lines.append(
                f"  turn {turn:>3} (turns {low}-{high}): WAL db {_f(sample['db_bytes_median'], 0)} B, "
                f"without full-page images {_f(sample['db_bytes_no_fpi_median'], 0)} B; "
                f"WAL server {sample['server_bytes_median']:,.0f} B; run {sample['run_ms_median']:.1f} ms"
            )
        if "ratio" in turns:
            lines.append(f"  turn {turns['turns']} / turn 1: {turns['ratio']:.2f}x ({turns['ratio_basis']})")
        for error in turns["errors"]:
            lines.append(f"  error: {error}")
        for error in turns["wal_errors"]:
            lines.append(f"  WAL db not measured: {error}")
    for note in results["notes"]:
        lines.append(f"note: {note}")
    errors = _failed(results)
    if errors:
        first = next(
            e for p in results["points"] for mode in _MODES if mode in p for e in p[mode]["first_errors"]
        )
        lines.append(f"errors: {errors} failed runs/requests (first: {first})")
    lines += ["", "targets (issue 10):"]
    for target in results["targets"]:
        value = target["value"]
        lines.append(f"  {target['verdict']:<4} {target['target']}: {_f(value, 2)}")
    missed = [t for t in results["targets"] if t["verdict"] == "MISS"]
    if missed:
        lines.append(f"targets MISSED: {len(missed)} of {len(results['targets'])}")
    elif any(t["verdict"] == "n/a" for t in results["targets"]):
        lines.append("no target missed; some not measured with these options")
    else:
        lines.append("all targets met")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Run the benchmark and print the figures (and write ``--json``).

    Returns 1 if a target was missed or any run failed, else 0."""
    settings = _settings(args)
    if settings["runs"] is not None and settings["runs"] < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return 2
    if settings["workers"] < 1 or settings["turns"] < 1 or settings["turns_per_key"] < 0:
        print("--workers and --turns must be at least 1, --turns-per-key at least 0", file=sys.stderr)
        return 2
    if not 0 <= settings["message_bytes"] <= 60_000:
        print(
            "--message-bytes must be between 0 and 60000 (the gateway's max_text_bytes is 65536)",
            file=sys.stderr,
        )
        return 2
    results = asyncio.run(_run(settings, args.database_url))
    results["targets"] = _evaluate(results)
    print(_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    failed = _failed(results) + len(results.get("turns", {}).get("errors", []))
    missed = any(t["verdict"] == "MISS" for t in results["targets"])
    return 1 if failed or missed else 0
