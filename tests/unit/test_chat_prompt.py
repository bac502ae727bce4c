"""The chat prompt (runyard.cli.prompt): lines in, Ctrl-C out at once."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
from collections.abc import Iterator

import pytest

from runyard.cli.prompt import LinePrompt


class PipeInput(io.TextIOBase):
    """Stands for stdin: only its file descriptor is used."""

    def __init__(self, fd: int):
        self._fd = fd

    def fileno(self) -> int:
        return self._fd


@pytest.fixture
def pipe() -> Iterator[tuple[LinePrompt, int, io.StringIO]]:
    read_fd, write_fd = os.pipe()
    shown = io.StringIO()
    try:
        yield LinePrompt(PipeInput(read_fd), shown), write_fd, shown
    finally:
        os.close(read_fd)
        with contextlib.suppress(OSError):  # closed by the test already
            os.close(write_fd)


def test_lines_come_one_per_read_and_end_of_input_is_eof(pipe):
    prompt, write_fd, shown = pipe
    os.write(write_fd, "first\r\nsecond\nthird, no newline — ü".encode())
    os.close(write_fd)
    assert [prompt.read("> ") for _ in range(3)] == ["first", "second", "third, no newline — ü"]
    with pytest.raises(EOFError):
        prompt.read("> ")
    assert shown.getvalue() == "> " * 4


def test_ctrl_c_taken_by_another_thread_still_interrupts_the_prompt(pipe):
    # SIGINT blocked on the main thread: the kernel hands it to another thread, as it
    # may hand a terminal's Ctrl-C to gRPC's poller thread. input() would then wait for
    # the next line; the prompt must raise KeyboardInterrupt at once.
    prompt, write_fd, _ = pipe
    kill = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    # If the signal is missed, a line arrives after 5 s so that the test fails instead of hanging.
    rescued = threading.Event()

    def rescue_line() -> None:
        rescued.set()
        os.write(write_fd, b"missed\n")

    rescue = threading.Timer(5.0, rescue_line)
    kill.start()  # threads take the creator's signal mask: start them before blocking
    rescue.start()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        with pytest.raises(KeyboardInterrupt):
            prompt.read("> ")
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        kill.cancel()
        rescue.cancel()
        kill.join()
        rescue.join()
    assert not rescued.is_set(), "Ctrl-C was seen only when the next line came"
    assert signal.set_wakeup_fd(-1) == -1, "the wake-up fd is restored"
