"""`runyard bench router`'s verdict: the concurrency-1 TTFT targets and the
cascade gate the exit code and print "targets MISSED"."""

from __future__ import annotations

import argparse

import pytest

from runyard.bench import router as bench


def results(*, c1_p99: float, c32_p99: float = 0.5, cascade_p50: float = 3.0, errors: int = 0) -> dict:
    def row(concurrency: int, metric: str, p99: float) -> dict:
        return {
            "concurrency": concurrency,
            "metric": metric,
            "n": 400,
            "direct_p50_ms": 1.0,
            "direct_p99_ms": 2.0,
            "router_p50_ms": 1.4,
            "router_p99_ms": 2.0 + p99,
            "overhead_p50_ms": 0.4,
            "overhead_p99_ms": p99,
            "router_cpu_ms_per_request": 0.3,
        }

    overhead = [row(1, "ttft", c1_p99), row(1, "total", 0.5), row(32, "ttft", c32_p99), row(32, "total", 0.5)]
    return {
        "chunks": 8,
        "requests": 400,
        "cpus": 2,
        "load_before": 1.0,
        "load_after": 1.0,
        "overhead": overhead,
        "engine": overhead,
        "cascade": {
            "n": 200,
            "fallback_ttft_p50_ms": 1.0,
            "fallback_ttft_p99_ms": 2.0,
            "cascade_ttft_p50_ms": 1.0 + cascade_p50,
            "cascade_ttft_p99_ms": 6.0,
            "extra_p50_ms": cascade_p50,
            "extra_p99_ms": 4.0,
        },
        "errors": ["router: UNAVAILABLE: x"] * errors,
        "error_count": errors,
    }


def args(**over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    namespace = parser.parse_args([])
    for key, value in over.items():
        setattr(namespace, key, value)
    return namespace


def test_all_targets_met_exits_0(capsys: pytest.CaptureFixture[str]):
    assert bench.report(results(c1_p99=1.0), args()) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("targets met") and "MISSED" not in out


def test_a_missed_concurrency_1_target_prints_targets_missed_and_exits_1(capsys: pytest.CaptureFixture[str]):
    assert bench.report(results(c1_p99=7.5), args()) == 1
    out = capsys.readouterr().out
    assert "concurrency 1 ttft overhead p99: 7.500 ms < 5.0 ms MISSED" in out
    assert out.rstrip().endswith("targets MISSED: concurrency 1 ttft overhead p99")


def test_a_missed_cascade_target_is_gated_too(capsys: pytest.CaptureFixture[str]):
    assert bench.report(results(c1_p99=1.0, cascade_p50=25.0), args(json=True)) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "targets MISSED: cascade p50"  # JSON on stdout, the verdict on stderr
    assert '"gated": true' in captured.out


def test_the_whole_answer_and_higher_concurrency_are_reported_but_not_gated(
    capsys: pytest.CaptureFixture[str],
):
    data = results(c1_p99=1.0, c32_p99=9.0)
    data["overhead"][1]["overhead_p50_ms"] = 2.2  # concurrency 1, whole answer
    assert bench.report(data, args()) == 0
    out = capsys.readouterr().out
    assert "concurrency 32 ttft overhead p99: 9.000 ms < 5.0 ms MISSED (not gated)" in out
    assert "concurrency 1 total overhead p50: 2.200 ms < 1.0 ms MISSED (not gated)" in out


def test_failed_requests_exit_2(capsys: pytest.CaptureFixture[str]):
    assert bench.report(results(c1_p99=1.0, errors=3), args()) == 2
    assert "errors: 3" in capsys.readouterr().out
