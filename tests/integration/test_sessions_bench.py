"""`runyard bench sessions` at a small scale: it runs end to end and its
checks hold (the full-size figures are in docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json

import pytest

from runyard.bench import sessions as bench

pytestmark = pytest.mark.timeout(120)


def test_the_sessions_bench_runs_and_its_checks_hold(pg_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RUNYARD_DATABASE_URL", pg_url)
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "results.json"
    args = parser.parse_args(["--active", "200", "--stored", "200", "2000", "--json", str(out)])
    assert bench.main(args) == 0, capsys.readouterr().out
    results = json.loads(out.read_text())
    drain = results["drain"]
    assert drain["shutdown_events"] == drain["distinct_sessions"] == 200 and drain["other_end_events"] == 0
    assert drain["exit_ms"] < 5_000
    assert [m["listed"] for m in results["memory"]] == [200, 2000]
    assert [m["pruned_dry_run"] for m in results["memory"]] == [200, 2000]
    assert max(results["peak_rss_ratio"].values()) <= 1.10
