"""`runyard bench stack --quick` at a tiny scale: it starts the whole stack,
drives it and produces every figure (the targets are for the full run, not a
test; the full-size figures are in docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math

import asyncpg
import pytest

from runyard.bench import stack

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


async def test_the_stack_bench_produces_every_figure(pg_url, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    stack.add_arguments(parser)
    out = tmp_path / "results.json"
    args = parser.parse_args(
        [
            "--quick",
            "--database-url",
            pg_url,
            "--sessions",
            "2",
            "--deltas",
            "8,20",
            "--duration-s",
            "1",
            "--warmup-s",
            "0.3",
            "--settle-s",
            "1",
            "--turns",
            "6",
            "--json",
            str(out),
        ]
    )
    # main() runs its own event loop; run it off this test's loop.
    code = await asyncio.to_thread(stack.main, args)
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert code in (0, 1), printed  # 1 = a target missed; failed runs are checked below

    machine = results["machine"]
    assert machine["cpus"] >= 1 and machine["python"] and machine["postgresql"]
    assert len(machine["load_average_before"]) == 3 and len(machine["load_average_after"]) == 3

    assert [(p["deltas"], p["sessions"]) for p in results["points"]] == [(8, 2), (20, 2)]
    for point in results["points"]:
        where = f"deltas={point['deltas']}"
        assert point["stack"]["errors"] == 0 and point["direct"]["errors"] == 0, (where, point)
        for mode in ("stack", "direct"):
            figures = point[mode]
            assert figures["completed"] > 0 and _positive(figures["per_s"]), (where, mode, figures)
            for name in ("ttft_p50_ms", "ttft_p99_ms", "total_p50_ms", "total_p99_ms"):
                assert _positive(figures[name]), (where, mode, name, figures)
            assert figures["ttft_p50_ms"] <= figures["total_p50_ms"]
        assert _positive(point["ratio"])
        assert math.isfinite(point["added_ttft_p50_ms"]) and math.isfinite(point["added_ttft_p99_ms"])
        cpu = point["cpu_ms_per_run"]
        # A run costs every service some CPU; PostgreSQL runs on this machine
        # (local server or embedded), so its backends are readable here.
        for name in ("gateway", "router", "sessions", "worker", "postgres"):
            assert _positive(cpu[name]), (where, name, cpu)
        assert cpu["total"] >= cpu["services"] + cpu["postgres"]
        wait = point["run_queue_wait_ms_per_run"]
        for name in ("gateway", "router", "sessions", "worker", "postgres", "provider", "bench_client"):
            assert math.isfinite(wait[name]) and wait[name] >= 0, (where, name, wait)
        assert wait["total"] == pytest.approx(wait["services"] + wait["postgres"])
        pg = point["pg"]
        # With a 1 s settle these counts are approximate: PostgreSQL publishes
        # idle backends' counters after up to 10 s, so the background taken
        # out can exceed what a 1 s window published (the corrected figure
        # then comes out negative). Only the raw counts must be positive; the
        # corrected ones must be numbers.
        for name in ("commits_per_run_raw", "rows_written_per_run_raw", "wal_bytes_per_run_server"):
            assert _positive(pg[name]), (where, name, pg)
        for name in ("commits_per_run", "rows_written_per_run"):
            assert math.isfinite(pg[name]), (where, name, pg)

    # WAL of the scratch database alone needs pg_walinspect (PostgreSQL 15+
    # contrib, superuser); where it is missing the output says so.
    conn = await asyncpg.connect(pg_url)
    try:
        walinspect = await conn.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_walinspect'"
        )
    finally:
        await conn.close()
    if walinspect:
        for point in results["points"]:
            assert _positive(point["pg"]["wal_bytes_per_run"]), point["pg"]
            assert _positive(point["pg"]["write_commits_per_run"]), point["pg"]
    else:
        assert any("pg_walinspect unavailable" in note for note in results["notes"]), results["notes"]

    turns = results["turns"]
    assert turns["errors"] == [] and sorted(turns["samples"], key=int) == ["1", "3", "6"]
    for sample in turns["samples"].values():
        assert _positive(sample["server_bytes_median"]), sample
    assert _positive(turns["ratio"])

    assert "run-queue wait ms per run" in printed
    assert {t["key"] for t in results["targets"]} == {key for key, *_ in stack.TARGETS}
    assert "targets (issue 10):" in printed and "bytes written per turn" in printed
