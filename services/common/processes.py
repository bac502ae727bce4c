"""Start processes, wait until they are ready, stop them.

The one launcher of ``runyard up``, the benchmarks and the tests (the
services never start processes): each child is named, logs to
``<log_dir>/<name>.log`` (appended, so a restarted process keeps one log),
and a child that dies while something waits for it fails the wait at once,
naming its exit code, its log and the log's tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["ProcessExited", "Processes", "free_port", "set_parent_death_signal"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def set_parent_death_signal() -> None:
    """Linux (``prctl(PR_SET_PDEATHSIG, SIGTERM)``, for ``preexec_fn``): the
    child gets SIGTERM when its parent dies, so none is left orphaned.
    Elsewhere it does nothing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class ProcessExited(RuntimeError):
    """A child exited while something waited for it."""


class Processes:
    """Named child processes.

    Args:
        log_dir: where ``<name>.log`` goes (created when needed).
        die_with_parent: children get SIGTERM when this process dies (Linux).
        new_session: children run in their own session (a Ctrl-C in the
            terminal reaches only this process, which stops them in order).
        log_tail_chars: how much of a child's log an error quotes (0: none,
            only its path).
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        die_with_parent: bool = False,
        new_session: bool = False,
        log_tail_chars: int = 3000,
    ):
        self.log_dir = log_dir
        self.die_with_parent = die_with_parent
        self.new_session = new_session
        self.log_tail_chars = log_tail_chars
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    # ------------------------------------------------------------ logs

    def log_path(self, name: str) -> Path:
        """Where ``name`` logs."""
        return self.log_dir / f"{name}.log"

    def log(self, name: str) -> str:
        """Everything ``name`` logged so far ("" before it started)."""
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def _problem(self, text: str, name: str) -> str:
        message = f"{text}; see {self.log_path(name)}"
        tail = self.log(name)[-self.log_tail_chars :] if self.log_tail_chars else ""
        return f"{message}:\n{tail}" if tail else message

    # ------------------------------------------------------------ start and wait

    async def spawn(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None, *, echo: bool = False
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` as ``name`` (replacing an earlier process of that
        name); its output goes to its log, or to this terminal with ``echo``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path(name).open("ab") as handle:
            out = None if echo else handle
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=dict(env) if env is not None else None,
                stdout=out,
                stderr=out,
                start_new_session=self.new_session,
                preexec_fn=set_parent_death_signal if self.die_with_parent else None,
            )
        self.procs[name] = proc
        return proc

    def check_alive(self, name: str) -> None:
        """Raises:
        ProcessExited: ``name`` has exited."""
        proc = self.procs[name]
        if proc.returncode is not None:
            raise ProcessExited(self._problem(f"{name} exited with code {proc.returncode}", name))

    async def wait_healthy(
        self,
        name: str,
        address: str,
        *,
        timeout_s: float = 60.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """Wait until ``name`` answers ``grpc.health.v1.Health/Check`` with
        SERVING at ``address`` (over TLS with ``credentials``).

        Raises:
            ProcessExited: it exited first.
            TimeoutError: not SERVING within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        channel = (
            grpc.aio.secure_channel(address, credentials)
            if credentials is not None
            else grpc.aio.insecure_channel(address)
        )
        async with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                self.check_alive(name)
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.05)
        problem = f"{name} did not become healthy on {address} within {timeout_s:g} s"
        raise TimeoutError(self._problem(problem, name))

    async def wait_log(self, name: str, text: str, *, timeout_s: float = 30.0, count: int = 1) -> str:
        """Wait until ``name``'s log holds ``text`` ``count`` times; returns
        the line of the ``count``-th.

        Raises:
            ProcessExited: it exited without logging it.
            TimeoutError: not logged within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            log = self.log(name)
            if log.count(text) >= count:
                lines = [line for line in log.splitlines() if text in line]
                return lines[min(count, len(lines)) - 1]
            self.check_alive(name)
            if time.monotonic() > deadline:
                problem = f"{name} never logged {text!r} within {timeout_s:g} s"
                raise TimeoutError(self._problem(problem, name))
            await asyncio.sleep(0.05)

    async def wait_http(self, name: str, url: str, *, timeout_s: float = 120.0) -> None:
        """Wait until ``GET url`` answers 200.

        Raises:
            ProcessExited: ``name`` exited first.
            TimeoutError: no 200 within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                self.check_alive(name)
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError(self._problem(f"{name} did not answer {url} within {timeout_s:g} s", name))

    # ------------------------------------------------------------ stop

    async def stop(
        self,
        names: Sequence[str],
        *,
        sig: int = signal.SIGTERM,
        timeout_s: float = 20.0,
        on_kill: Callable[[str], None] | None = None,
    ) -> list[str]:
        """Send ``sig`` to every running process of ``names`` at once, then
        wait for each; one still running after ``timeout_s`` is killed
        (``on_kill(name)`` first). Returns the names that had to be killed."""
        running = [(n, self.procs[n]) for n in names if n in self.procs and self.procs[n].returncode is None]
        for _, proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        killed = []
        for name, proc in running:
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                if on_kill is not None:
                    on_kill(name)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                killed.append(name)
        return killed
