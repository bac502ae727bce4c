"""``runyard bench NAME``: benchmarks that report ratios and percentiles.

Each benchmark is a module with ``add_arguments(parser)`` and
``main(args) -> int``, listed in :data:`BENCHMARKS`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BENCHMARKS", "add_parsers", "percentile"]

#: benchmark name -> (module, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "router": ("runyard.bench.router", "router overhead vs a direct provider call, and the 404 cascade time"),
    "sessions": ("runyard.bench.sessions", "shutdown drain of 10k active sessions; RSS with 1k vs 100k stored"),
    "stack": ("runyard.bench.stack", "the four services end to end: runs/s, latency, CPU, commits and WAL per run"),
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


def add_parsers(sub: Any) -> None:
    """Add ``bench`` and one sub-command per registered benchmark."""
    bench = sub.add_parser("bench", help="run a benchmark")
    names = bench.add_subparsers(dest="bench", required=True)
    for name, (module_name, help_text) in sorted(BENCHMARKS.items()):
        parser = names.add_parser(name, help=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(parser)
        parser.set_defaults(func=module.main)
