"""The time budget of the run being executed: one deadline, end to end.

A run's budget is ``RunOptions.timeout_ms``, else its agent's
``timeout_ms``, else ``router.request_timeout_ms``
(:meth:`runyard.common.config.Config.run_timeout_ms`). The worker starts the
clock when it starts executing the run (:func:`run_deadline`, around
:meth:`runyard.worker.runner.RunExecutor.execute`); every router call of the
run (the answer, each tool-loop turn, a compaction summary) gets what is
left as its gRPC deadline, so the run as a whole never takes longer.

The deadline lives in a context variable: each run executes in its own task,
and code called from it reads the deadline with :func:`time_left` without
passing it around.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["ROUTER_DEADLINE_MARGIN_S", "run_deadline", "time_left"]

#: Added to a router call's gRPC deadline, beyond the run's remaining budget:
#: the router itself stops at the budget (it keeps this margin from the
#: caller's deadline, see runyard.router.service) so that its own error,
#: which says what ran out while waiting for which model, arrives before a
#: bare DEADLINE_EXCEEDED from gRPC.
ROUTER_DEADLINE_MARGIN_S = 0.25

_DEADLINE: ContextVar[float | None] = ContextVar("runyard_run_deadline", default=None)


@contextlib.contextmanager
def run_deadline(budget_s: float) -> Iterator[None]:
    """Run the body with a deadline ``budget_s`` seconds from now."""
    token = _DEADLINE.set(time.monotonic() + budget_s)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds left in the current run's budget (may be negative), or None
    outside a run."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()
