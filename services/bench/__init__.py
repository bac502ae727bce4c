"""Benchmarks (``runyard bench NAME``), the loopback provider they drive, and
their measuring helpers. Service packages never import this package.

* :mod:`runyard.bench.router`: router overhead vs a direct provider call, and
  the 404 cascade time;
* :mod:`runyard.bench.sessions`: shutdown drain of many active sessions, and
  memory vs stored sessions;
* :mod:`runyard.bench.stack`: the four services end to end (throughput,
  latency, CPU per process, PostgreSQL work per run);
* :mod:`runyard.bench.loopback`: a fast OpenAI-compatible streaming provider
  (``python -m runyard.bench.loopback``);
* :mod:`runyard.bench.procstat`: ``/proc`` CPU time, the PostgreSQL server's
  processes, ``pg_stat_database`` and WAL counters.

A benchmark module has ``add_arguments(parser)`` and ``main(args) -> int``
(non-zero when a target is missed) and is listed in :data:`BENCHMARKS`;
``runyard bench`` (:mod:`runyard.cli.bench`) registers every entry.
"""

from __future__ import annotations

__all__ = ["BENCHMARKS", "percentile"]

#: benchmark name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "router": ("runyard.bench.router", "router overhead vs a direct provider call, and the 404 cascade time"),
    "sessions": (
        "runyard.bench.sessions",
        "shutdown drain of 10k active sessions; RSS with 1k vs 100k stored",
    ),
    "stack": (
        "runyard.bench.stack",
        "the four services end to end: runs/s, latency, CPU, commits and WAL per run",
    ),
}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
