"""``runyard bench router``: what the router costs, and how fast a 404 cascades.

The benchmark starts everything it needs on loopback:

* a fast OpenAI-compatible streaming provider (:mod:`runyard.bench.loopback`,
  its own process);
* a PostgreSQL database: a scratch database created on ``--database-url`` /
  ``RUNYARD_DATABASE_URL`` and dropped afterwards, else an embedded server
  (``pgserver``) in a temporary directory;
* the real router (``runyard serve router``, its own process) configured with
  that provider.

Then it measures, from this process:

1. **Overhead**: the same streamed answer fetched directly from the provider
   (with the router's own OpenAI adapter, i.e. httpx + SSE parsing, as any
   client would) and through ``RouterService/Generate`` (gRPC hop, run-token
   check, model selection, cooldown lookups, stall timers, protobuf events).
   Per request: time to first token (TTFT) and to the end of the stream, at
   each ``--concurrency``; at concurrency 1 direct and routed requests
   alternate one by one, above it in ``--rounds`` batches, so drift hits
   both. Overhead = routed percentile - direct percentile. The machine's
   load average is reported with the figures: other work on the machine
   shows up as noise, mostly in p99.
2. **Engine alone**: the same comparison with :meth:`Router.generate`
   called in this process (its cooldown store on the scratch database):
   the routing logic without the gRPC hop.
3. **Cascade**: requests whose first model answers 404 ``model_not_found``
   (a fresh model name each time, so no cooldown short-cuts it) and fail over
   to a working model, interleaved with requests that go to the working model
   directly; cascade cost = TTFT with the cascade - TTFT without.

Targets (from the issue): overhead p50 < 1 ms and p99 < 5 ms; cascade
< 20 ms beyond the fallback's own latency. The targets the router meets are
gated: time to first token through gRPC at concurrency 1 and the cascade;
when one is missed the report ends with ``targets MISSED: ...`` (on stderr
with ``--json``) and the exit code is 1. The whole answer at concurrency 1
(grpcio sends each of the answer's stream messages separately, about 1 ms
before any routing, see docs/benchmarks.md) and higher concurrency levels
(which measure the machine's load as much as the router) are reported
against the same targets but not gated. A failed or wrong answer exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc

from runyard._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
from runyard.bench import percentile
from runyard.common.auth import (
    RunTokenSigner,
    credential_interceptors,
    generate_run_token_keys,
    run_token_env,
)
from runyard.common.batches import MAX_BATCH_BYTES, generate_responses
from runyard.common.config import Config, ProviderConfig
from runyard.common.outbox import Outbox
from runyard.common.processes import Processes, free_port
from runyard.router.cooldowns import CooldownStore
from runyard.router.engine import Router
from runyard.router.providers import OpenAIProvider, Request

__all__ = ["add_arguments", "main"]

OVERHEAD_P50_TARGET_MS = 1.0
OVERHEAD_P99_TARGET_MS = 5.0
CASCADE_TARGET_MS = 20.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``runyard bench router``."""
    parser.add_argument(
        "--requests", type=int, default=400, help="requests per mode and concurrency (default 400)"
    )
    parser.add_argument(
        "--concurrency", default="1,32", help="comma-separated concurrency levels (default 1,32)"
    )
    parser.add_argument(
        "--cascade-requests", type=int, default=200, help="404 cascades to time (default 200)"
    )
    parser.add_argument("--chunks", type=int, default=8, help="text deltas per answer (default 8)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests per mode first (default 50)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="alternating direct/router batches above concurrency 1 (default 8)",
    )
    parser.add_argument(
        "--database-url",
        help="PostgreSQL server for a scratch database "
        "(default: RUNYARD_DATABASE_URL, else an embedded server)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--p50-target-ms",
        type=float,
        default=OVERHEAD_P50_TARGET_MS,
        help=f"overhead p50 target at concurrency 1 (default {OVERHEAD_P50_TARGET_MS})",
    )
    parser.add_argument(
        "--p99-target-ms",
        type=float,
        default=OVERHEAD_P99_TARGET_MS,
        help=f"overhead p99 target at concurrency 1 (default {OVERHEAD_P99_TARGET_MS})",
    )
    parser.add_argument(
        "--cascade-target-ms",
        type=float,
        default=CASCADE_TARGET_MS,
        help=f"404 cascade cost target, p50 and p99 (default {CASCADE_TARGET_MS})",
    )


@dataclass
class Sample:
    """Latencies in seconds."""

    ttft: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)


class _Processes(Processes):
    """The bench's processes (logs in a scratch directory), its embedded
    PostgreSQL and scratch database; :meth:`close` undoes all."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="runyard-bench-")
        super().__init__(Path(self.tmp.name), die_with_parent=True)
        self.pg: Any = None
        self.scratch: tuple[str, str] | None = None  # (admin url, database name)

    async def close(self) -> None:
        await self.stop(list(reversed(self.procs)), timeout_s=15)
        if self.scratch is not None:
            admin_url, name = self.scratch
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                conn = await asyncpg.connect(admin_url)
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await conn.close()
        if self.pg is not None:
            await asyncio.to_thread(self.pg.cleanup)
        self.tmp.cleanup()


def _process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid`` (Linux
    ``/proc``; 0.0 where unavailable, and the report then says n/a)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _database(args: argparse.Namespace, procs: _Processes) -> str:
    """A scratch database URL (created here, dropped by ``procs.close``)."""
    server_url = args.database_url or os.environ.get("RUNYARD_DATABASE_URL", "")
    if not server_url:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            procs.pg = await asyncio.to_thread(pgserver.get_server, procs.log_dir / "pg", cleanup_mode="stop")
        server_url = str(procs.pg.get_uri())
    name = f"runyard_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    procs.scratch = (server_url, name)
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


async def _start_provider(chunks: int, procs: _Processes) -> int:
    """The loopback provider streaming ``chunks`` deltas; returns its port."""
    argv = [sys.executable, "-m", "runyard.bench.loopback", "--port", "0", "--chunks", str(chunks)]
    await procs.spawn("provider", argv)
    line = await procs.wait_log("provider", "listening on ", timeout_s=30)
    return int(line.split()[-1])


async def _start_router(env: dict[str, str], address: str, procs: _Processes) -> None:
    await procs.spawn("router", [sys.executable, "-m", "runyard", "serve", "router"], env)
    await procs.wait_healthy("router", address, timeout_s=60)


class _Client:
    """Timed calls, directly and through the router."""

    def __init__(
        self,
        provider_url: str,
        router: router_pb2_grpc.RouterServiceStub,
        signer: RunTokenSigner,
        chunks: int,
    ):
        self.direct = OpenAIProvider("loop", ProviderConfig(type="openai", base_url=provider_url))
        self.router = router
        self.chunks = chunks
        self.messages = [
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
            common_pb2.Message(role=common_pb2.ROLE_USER, content="Say something."),
        ]
        self.expected = "".join(f"tok{i} " for i in range(chunks))
        self.errors: list[str] = []
        run = common_pb2.RunPayload(
            run_id=str(uuid.uuid4()),
            org_id="bench",
            session_id=str(uuid.uuid4()),
            session_key="bench",
            agent_id="default",
            input=common_pb2.RunInput(text="Say something."),
        )
        run.run_token = signer.sign(
            org_id=run.org_id, agent_id=run.agent_id, session_id=run.session_id, run_id=run.run_id, epoch=0
        )
        self.run = run

    async def call_direct(self, sample: Sample) -> None:
        started = time.perf_counter()
        first: float | None = None
        text = []
        async for chunk in self.direct.stream(Request(model="ok", messages=self.messages), ""):
            if chunk.kind == "text":
                if first is None:
                    first = time.perf_counter()
                text.append(chunk.text)
        end = time.perf_counter()
        if "".join(text) != self.expected or first is None:
            self.errors.append(f"direct answer was {''.join(text)!r}")
            return
        sample.ttft.append(first - started)
        sample.total.append(end - started)

    async def call_router(self, sample: Sample, model: str = "") -> None:
        # As the worker asks: what the router has ready at once comes as one batch.
        request = router_pb2.GenerateRequest(
            run=self.run, messages=self.messages, max_batch_bytes=MAX_BATCH_BYTES
        )
        if model:
            request.run.model.model = model
        started = time.perf_counter()
        first: float | None = None
        failovers = 0
        final = ""
        try:
            async for message in self.router.Generate(request, timeout=30):
                for response in generate_responses(message):
                    kind = response.WhichOneof("event")
                    if kind == "text_delta" and first is None:
                        first = time.perf_counter()
                    elif kind == "model_failover":
                        failovers += 1
                    elif kind == "final":
                        final = response.final.message.content
        except grpc.aio.AioRpcError as exc:
            self.errors.append(f"router: {exc.code().name}: {exc.details()}")
            return
        end = time.perf_counter()
        if final != self.expected or first is None or failovers != (1 if model else 0):
            self.errors.append(f"router answer {final!r} with {failovers} failover(s)")
            return
        sample.ttft.append(first - started)
        sample.total.append(end - started)

    async def call_engine(self, engine: Router, sample: Sample) -> None:
        """The router's engine called in this process (no gRPC hop)."""
        started = time.perf_counter()
        first: float | None = None
        final = ""
        async for response in engine.generate(self.run, self.messages, timeout_s=30):
            kind = response.WhichOneof("event")
            if kind == "text_delta" and first is None:
                first = time.perf_counter()
            elif kind == "final":
                final = response.final.message.content
        end = time.perf_counter()
        if final != self.expected or first is None:
            self.errors.append(f"engine answer {final!r}")
            return
        sample.ttft.append(first - started)
        sample.total.append(end - started)


async def _batch(count: int, concurrency: int, call: Callable[[], Awaitable[None]]) -> None:
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))


async def _engine_overhead(
    args: argparse.Namespace, levels: list[int], client: _Client, database_url: str, provider_url: str
) -> list[dict[str, Any]]:
    """The engine alone: :meth:`Router.generate` in this process (with its
    shared cooldown store on the scratch database) against the same adapter
    called directly, both in this process: what routing logic costs without
    the gRPC hop."""
    config = Config.model_validate(
        {
            "providers": {"loop": {"type": "openai", "base_url": provider_url}},
            "agents": {"default": {"model": "loop/ok"}},
        }
    )
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    assert pool is not None
    store = CooldownStore(
        config.router, pool, database_url=database_url, outbox=Outbox("router", "bench_events")
    )
    engine = Router(config, store, instance_id="bench-engine")
    await engine.start()
    rows = []
    try:
        for level in levels:
            scratch = Sample()
            await _batch(args.warmup, level, partial(client.call_direct, scratch))
            await _batch(args.warmup, level, partial(client.call_engine, engine, scratch))
            direct, routed = Sample(), Sample()
            if level == 1:
                for _ in range(args.requests):
                    await client.call_direct(direct)
                    await client.call_engine(engine, routed)
            else:
                per_round = max(args.requests // max(args.rounds, 1), 1)
                for _ in range(max(args.rounds, 1)):
                    await _batch(per_round, level, partial(client.call_direct, direct))
                    await _batch(per_round, level, partial(client.call_engine, engine, routed))
            rows.append(_row(level, "ttft", direct.ttft, routed.ttft))
            rows.append(_row(level, "total", direct.total, routed.total))
    finally:
        await engine.aclose()
        await pool.close()
    return rows


def _ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


def _row(concurrency: int, metric: str, direct: list[float], routed: list[float]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "concurrency": concurrency,
        "metric": metric,
        "n": min(len(direct), len(routed)),
        "direct_p50_ms": _ms(direct, 50),
        "direct_p99_ms": _ms(direct, 99),
        "router_p50_ms": _ms(routed, 50),
        "router_p99_ms": _ms(routed, 99),
    }
    row["overhead_p50_ms"] = row["router_p50_ms"] - row["direct_p50_ms"]
    row["overhead_p99_ms"] = row["router_p99_ms"] - row["direct_p99_ms"]
    return row


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    procs = _Processes()
    levels = [int(part) for part in str(args.concurrency).split(",") if part.strip()]
    try:
        database_url = await _database(args, procs)
        provider_port = await _start_provider(args.chunks, procs)
        provider_url = f"http://127.0.0.1:{provider_port}/v1"
        router_port = free_port()
        address = f"127.0.0.1:{router_port}"
        run_token_key, _ = generate_run_token_keys()
        internal_secret = secrets.token_urlsafe(32)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
        env.update(
            {
                "RUNYARD_DATABASE_URL": database_url,
                **run_token_env("router", run_token_key),
                "RUNYARD_INTERNAL_SECRET": internal_secret,
                "RUNYARD_LOG_LEVEL": "WARNING",
                "RUNYARD_ROUTER__LISTEN": address,
                "RUNYARD_ROUTER__METRICS_PORT": "0",
                "RUNYARD_PROVIDERS__LOOP__TYPE": "openai",
                "RUNYARD_PROVIDERS__LOOP__BASE_URL": provider_url,
                "RUNYARD_AGENTS__DEFAULT__MODEL": "loop/ok",
            }
        )
        await _start_router(env, address, procs)
        signer = RunTokenSigner(run_token_key)
        results: dict[str, Any] = {
            "chunks": args.chunks,
            "requests": args.requests,
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg()[0],
            "overhead": [],
            "cascade": {},
        }
        async with grpc.aio.insecure_channel(
            address, interceptors=credential_interceptors(internal_secret)
        ) as channel:
            client = _Client(provider_url, router_pb2_grpc.RouterServiceStub(channel), signer, args.chunks)
            router_pid = procs.procs["router"].pid
            try:
                for level in levels:
                    # Warm up at this concurrency: connections open, code paths hot.
                    scratch = Sample()
                    await _batch(args.warmup, level, partial(client.call_direct, scratch))
                    await _batch(args.warmup, level, partial(client.call_router, scratch))
                    direct, routed = Sample(), Sample()
                    router_cpu = 0.0
                    if level == 1:
                        # One at a time: alternate request by request.
                        for _ in range(args.requests):
                            await client.call_direct(direct)
                            before = _process_cpu_s(router_pid)
                            await client.call_router(routed)
                            router_cpu += _process_cpu_s(router_pid) - before
                    else:
                        per_round = max(args.requests // max(args.rounds, 1), 1)
                        for _ in range(max(args.rounds, 1)):
                            await _batch(per_round, level, partial(client.call_direct, direct))
                            before = _process_cpu_s(router_pid)
                            await _batch(per_round, level, partial(client.call_router, routed))
                            router_cpu += _process_cpu_s(router_pid) - before
                    for row in (
                        _row(level, "ttft", direct.ttft, routed.ttft),
                        _row(level, "total", direct.total, routed.total),
                    ):
                        row["router_cpu_ms_per_request"] = router_cpu * 1000 / max(len(routed.total), 1)
                        results["overhead"].append(row)
                results["engine"] = await _engine_overhead(args, levels, client, database_url, provider_url)
                plain, cascade = Sample(), Sample()
                for index in range(args.cascade_requests):
                    await client.call_router(plain)
                    await client.call_router(cascade, model=f"loop/missing-{index}-{uuid.uuid4().hex[:6]}")
                results["cascade"] = {
                    "n": min(len(plain.ttft), len(cascade.ttft)),
                    "fallback_ttft_p50_ms": _ms(plain.ttft, 50),
                    "fallback_ttft_p99_ms": _ms(plain.ttft, 99),
                    "cascade_ttft_p50_ms": _ms(cascade.ttft, 50),
                    "cascade_ttft_p99_ms": _ms(cascade.ttft, 99),
                    "extra_p50_ms": _ms(cascade.ttft, 50) - _ms(plain.ttft, 50),
                    "extra_p99_ms": _ms(cascade.ttft, 99) - _ms(plain.ttft, 99),
                }
            finally:
                await client.direct.aclose()
            results["load_after"] = os.getloadavg()[0]
            results["errors"] = client.errors[:20]
            results["error_count"] = len(client.errors)
        return results
    finally:
        await procs.close()


def _verdict(ok: bool, value: float | None = None) -> str:
    if not ok:
        return "MISSED"
    if value is not None and value < 0:
        return "met (negative: below the noise between the two samples)"
    return "met"


def _table_line(row: dict[str, Any]) -> str:
    return (
        f"{row['concurrency']:>4}  {row['metric']:<6} "
        f"{row['direct_p50_ms']:>10.3f} {row['direct_p99_ms']:>10.3f} "
        f"{row['router_p50_ms']:>10.3f} {row['router_p99_ms']:>10.3f} {row['overhead_p50_ms']:>12.3f} "
        f"{row['overhead_p99_ms']:>12.3f}"
    )


def targets(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every target with its measured value: ``name``, ``value_ms``,
    ``target_ms``, ``met`` and ``gated`` (TTFT at concurrency 1, the cascade)."""
    rows = []
    for row in results["overhead"]:
        for q, target in (("p50", args.p50_target_ms), ("p99", args.p99_target_ms)):
            value = row[f"overhead_{q}_ms"]
            rows.append(
                {
                    "name": f"concurrency {row['concurrency']} {row['metric']} overhead {q}",
                    "value_ms": value,
                    "target_ms": target,
                    "met": value < target,
                    "gated": row["concurrency"] == 1 and row["metric"] == "ttft",
                }
            )
    cascade = results["cascade"]
    for q in ("p50", "p99"):
        value = cascade[f"extra_{q}_ms"]
        rows.append(
            {
                "name": f"cascade {q}",
                "value_ms": value,
                "target_ms": args.cascade_target_ms,
                "met": value < args.cascade_target_ms,
                "gated": True,
            }
        )
    return rows


def _report(results: dict[str, Any]) -> str:
    lines = [
        (
            f"router overhead: loopback OpenAI-compatible provider, {results['chunks']} deltas per answer, "
            f"{results['requests']} requests per cell; {results['cpus']} CPUs, load average "
            f"{results['load_before']:.2f} before, {results['load_after']:.2f} after"
        ),
        (
            f"{'conc':>4}  {'metric':<6} {'direct p50':>10} {'direct p99':>10} "
            f"{'router p50':>10} {'router p99':>10} "
            f"{'overhead p50':>12} {'overhead p99':>12}   (ms)"
        ),
    ]
    lines += [_table_line(row) for row in results["overhead"]]
    lines += [
        "",
        "the engine alone (Router.generate in the bench process, no gRPC hop), same layout:",
    ]
    lines += [_table_line(row) for row in results["engine"]]
    cpu = {row["concurrency"]: row["router_cpu_ms_per_request"] for row in results["overhead"]}
    lines.append(
        "router process CPU per routed request: "
        + ", ".join(
            f"concurrency {level}: {value:.3f} ms" if value else f"concurrency {level}: n/a"
            for level, value in cpu.items()
        )
    )
    c = results["cascade"]
    lines += [
        "",
        f"404 MODEL_NOT_FOUND cascade to the fallback's first token (concurrency 1, {c['n']} requests, ms):",
        f"  fallback alone: p50 {c['fallback_ttft_p50_ms']:.3f}  p99 {c['fallback_ttft_p99_ms']:.3f}",
        f"  with cascade:   p50 {c['cascade_ttft_p50_ms']:.3f}  p99 {c['cascade_ttft_p99_ms']:.3f}",
        f"  cascade cost:   p50 {c['extra_p50_ms']:.3f}  p99 {c['extra_p99_ms']:.3f}",
        "",
        "targets (TTFT at concurrency 1 and the cascade gate the exit code):",
    ]
    for target in results["targets"]:
        gated = "" if target["gated"] else " (not gated)"
        lines.append(
            f"  {target['name']}: {target['value_ms']:.3f} ms < {target['target_ms']} ms "
            f"{_verdict(target['met'], target['value_ms'])}{gated}"
        )
    lines.append(_summary(results))
    if results["error_count"]:
        lines.append(f"errors: {results['error_count']} (first: {results['errors'][0]})")
    return "\n".join(lines)


def _summary(results: dict[str, Any]) -> str:
    missed = [t["name"] for t in results["targets"] if t["gated"] and not t["met"]]
    return f"targets MISSED: {', '.join(missed)}" if missed else "targets met"


def main(args: argparse.Namespace) -> int:
    """Run the benchmark; prints a table (or JSON, with the verdict on
    stderr). Exit code 2 if any request failed or returned a wrong answer
    (the figures would be meaningless), 1 if a gated target was missed
    (``targets MISSED``), else 0."""
    results = asyncio.run(_run(args))
    return report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> int:
    """Print ``results`` (as :func:`main` does) and return the exit code."""
    results["targets"] = targets(results, args)
    if args.json:
        print(json.dumps(results, indent=2))
        print(_summary(results), file=sys.stderr)
    else:
        print(_report(results))
    if results["error_count"]:
        return 2
    return 1 if any(t["gated"] and not t["met"] for t in results["targets"]) else 0
