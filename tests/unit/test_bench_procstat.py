"""The benchmark's run-queue reading (runyard.bench.procstat): threads kept
from a CPU by more runnable work than there are CPUs show it as wait."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from runyard.bench.procstat import cpu_seconds, run_queue_wait_seconds

pytestmark = pytest.mark.timeout(30)


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_more_busy_processes_than_cpus_wait_for_a_cpu():
    cpus = len(os.sched_getaffinity(0))
    context = multiprocessing.get_context("spawn")
    spinners = [context.Process(target=_spin, args=(1.5,)) for _ in range(cpus * 3)]
    for spinner in spinners:
        spinner.start()
    try:
        time.sleep(0.5)  # every spinner is running by now
        before = {p.pid: (run_queue_wait_seconds(p.pid) or 0.0, cpu_seconds(p.pid) or 0.0) for p in spinners}
        time.sleep(0.6)
        after = {p.pid: (run_queue_wait_seconds(p.pid) or 0.0, cpu_seconds(p.pid) or 0.0) for p in spinners}
    finally:
        for spinner in spinners:
            spinner.join(10)
            if spinner.is_alive():
                spinner.kill()
    waited = sum(after[pid][0] - before[pid][0] for pid in before)
    ran = sum(after[pid][1] - before[pid][1] for pid in before)
    # Three runnable processes per CPU: about twice as much waiting as running.
    assert waited > ran * 0.8, (waited, ran)


def test_an_unknown_process_has_no_reading():
    assert run_queue_wait_seconds(2**22 + 12345) is None
    assert (run_queue_wait_seconds(os.getpid()) or 0.0) >= 0.0
