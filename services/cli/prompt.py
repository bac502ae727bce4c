"""The line prompt of ``runyard chat``: Ctrl-C leaves it at once, always.

``input()`` blocks in ``read(2)`` and sees Ctrl-C only when that read is
interrupted. Two cases escape it: SIGINT arriving between the prompt being
written and the read starting (the handler runs, but the read then blocks),
and SIGINT delivered to another thread (gRPC's poller thread is one), which
never interrupts the main thread's read. Both left ``runyard chat`` waiting
for Enter after Ctrl-C. :class:`LinePrompt` waits in ``select(2)`` on stdin
*and* on a wake-up pipe that the signal machinery writes to
(:func:`signal.set_wakeup_fd`), so the Python handler runs, and raises
:class:`KeyboardInterrupt`, whichever thread took the signal and whenever
it came.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
from collections.abc import Iterator
from typing import TextIO

__all__ = ["LinePrompt"]


class LinePrompt:
    """Reads one line per :meth:`read` from a file descriptor (stdin by default).

    The terminal's own line discipline does the editing (canonical mode), as
    it does for ``input()`` without readline. Lines are decoded as UTF-8,
    undecodable bytes replaced. Raises :class:`EOFError` at end of input
    (Ctrl-D) and :class:`KeyboardInterrupt` on Ctrl-C (SIGINT with Python's
    default handler). Must be used from the main thread (a wake-up fd can be
    set only there); elsewhere, or when stdin has no file descriptor, it
    falls back to ``input()``.
    """

    def __init__(self, stdin: TextIO | None = None, prompt_out: TextIO | None = None) -> None:
        self._stdin = stdin if stdin is not None else sys.stdin
        self._out = prompt_out if prompt_out is not None else sys.stderr
        self._pending = b""
        self._eof = False

    def read(self, prompt: str) -> str:
        """Write ``prompt``, return the next line without its newline."""
        try:
            fd = self._stdin.fileno()
        except (AttributeError, OSError, ValueError):
            return input(prompt)
        self._out.write(prompt)
        self._out.flush()
        while b"\n" not in self._pending and not self._eof:
            with _wakeup_pipe() as wakeup:
                readable, _, _ = select.select([fd, wakeup], [], [])
            # A signal's byte in the pipe: its handler ran (or runs at the next
            # bytecode) and raised KeyboardInterrupt if that is what it does.
            if fd in readable:
                chunk = os.read(fd, 4096)
                self._pending += chunk
                self._eof = not chunk
        if b"\n" in self._pending:
            line, _, self._pending = self._pending.partition(b"\n")
        elif self._pending:  # the last line had no newline
            line, self._pending = self._pending, b""
        else:
            raise EOFError
        return line.decode("utf-8", errors="replace").removesuffix("\r")


@contextlib.contextmanager
def _wakeup_pipe() -> Iterator[int]:
    """A pipe whose write end is the signal wake-up fd for the duration;
    yields its read end. The previous wake-up fd is restored after."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:  # not the main thread: no wake-up, select still returns on input
        previous = None
    try:
        yield read_fd
    finally:
        if previous is not None:
            signal.set_wakeup_fd(previous)
        os.close(read_fd)
        os.close(write_fd)
