"""Command-line flags of the sessions service (kept free of heavy imports:
``runyard`` builds its parser from them)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

__all__ = ["RESTART_ENV", "RestartExpectedAction"]

#: Environment override that `--restart-expected` sets (children inherit it).
RESTART_ENV = "RUNYARD_SESSIONS__SHUTDOWN_MODE"


class RestartExpectedAction(argparse.Action):
    """``--restart-expected``: the sessions service ends its activations with
    RESTART instead of SHUTDOWN when it stops (sets ``RUNYARD_SESSIONS__SHUTDOWN_MODE``)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any):
        kwargs.setdefault(
            "help",
            "sessions: when this process stops, end active sessions with RESTART (a restart is "
            "expected) instead of SHUTDOWN",
        )
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        os.environ[RESTART_ENV] = "restart"
        setattr(namespace, self.dest, True)
