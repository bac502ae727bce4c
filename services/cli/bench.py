"""``runyard bench NAME``: one sub-command per benchmark of
:data:`runyard.bench.BENCHMARKS` (a new benchmark is listed there, not here)."""

from __future__ import annotations

import importlib
from typing import Any

from runyard.bench import BENCHMARKS

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    """Add ``bench`` and one sub-command per registered benchmark."""
    bench = sub.add_parser("bench", help="run a benchmark")
    names = bench.add_subparsers(dest="bench", required=True)
    for name, (module_name, help_text) in sorted(BENCHMARKS.items()):
        parser = names.add_parser(name, help=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(parser)
        parser.set_defaults(func=module.main)
