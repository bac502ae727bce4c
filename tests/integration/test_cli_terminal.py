"""The ``runyard`` command as a person meets it: through a subprocess, and
through a pseudo-terminal where a terminal changes what it does (progress on
stderr, the chat prompt, Ctrl-C). Item by item of issue 14: first steps
(config check, --version, no stack running, a taken port, a dead model URL),
progress and --model on ``send``, ``sessions list`` header and --json, the
chat's local commands and Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import select
import socket
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from runyard._proto.v1 import gateway_pb2
from runyard.common.server import ServiceServer
from tests.stack import free_port

pytestmark = pytest.mark.timeout(120)

RUNYARD = [sys.executable, "-m", "runyard"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNYARD_", "OPENAI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def run(*args: str, env: dict[str, str] | None = None, stdin: bytes = b"") -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *RUNYARD,
        *args,
        env=env or clean_env(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return int(proc.returncode or 0), out.decode(), err.decode()


class Terminal:
    """A process on a pseudo-terminal (its controlling terminal, so Ctrl-C
    written to it is SIGINT), with ``expect`` on what it prints."""

    def __init__(self, argv: list[str], env: dict[str, str], *, stdout_pipe: bool = False):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=slave,
            stdout=subprocess.PIPE if stdout_pipe else slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.output = b""
        self.seen = 0

    def _read(self, timeout_s: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout_s)
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the process closed the terminal
            data = b""
        self.output += data
        return bool(data)

    def expect(self, text: str, timeout_s: float = 20.0) -> str:
        """Wait until ``text`` appears after what earlier expects consumed; returns the output up to it."""
        needle = text.encode()
        deadline = time.monotonic() + timeout_s
        while (index := self.output.find(needle, self.seen)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._read(min(remaining, 0.5)) and self.proc.poll() is not None:
                raise AssertionError(
                    f"never printed {text!r}; printed:\n{self.output.decode(errors='replace')}"
                )
        before = self.output[self.seen : index + len(needle)].decode(errors="replace")
        self.seen = index + len(needle)
        return before

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def drain(self, timeout_s: float = 2.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._read(0.2):
            pass
        return self.output.decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        os.close(self.master)


@contextlib.contextmanager
def terminal(argv: list[str], env: dict[str, str], **kwargs: bool):
    term = Terminal(argv, env, **kwargs)
    try:
        yield term
    finally:
        term.close()


# ---------------------------------------------------------------- first steps (no stack)


async def test_config_check_takes_config_after_the_command_and_reports_every_mistake_at_once(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[gateway]\nmax_attempts = 0\nlistn = "0.0.0.0:1"\n'
        '[providers.openai]\ntype = "openai"\nbase_url = "https://api.openai.com/v1"\n'
        '[agents.default]\nmodel = "openai/gpt-4o-mini"\nfallbacks = ["opnai/gpt-4o", "echo/echo"]\n'
    )
    env = clean_env(RUNYARD_HANDSHAKE_TIMEOUT_MS="soon")
    code, out, err = await run("config", "check", "--config", str(bad), env=env)
    assert code == 2, out + err
    lines = [line.strip() for line in err.splitlines()[1:]]
    assert len(lines) == 4, err  # four mistakes, four lines, in one run
    problems = dict(line.split(": ", 1) for line in lines)
    assert problems["gateway.listn"].startswith("unknown setting; did you mean 'listen'?")
    assert "did you mean 'openai'?" in problems["agents.default.fallbacks"]
    assert "'opnai'" in problems["agents.default.fallbacks"]
    assert "RUNYARD_HANDSHAKE_TIMEOUT_MS" in problems["gateway.handshake_timeout_ms"]
    assert "gateway.max_attempts" in problems
    # The same file given before the command reports the same.
    assert (await run("--config", str(bad), "config", "check", env=env))[2] == err


async def test_version():
    import runyard

    code, out, _ = await run("--version")
    assert (code, out.strip()) == (0, f"runyard {runyard.__version__}")


async def test_client_commands_with_no_stack_say_how_to_start_one():
    address = f"127.0.0.1:{free_port()}"
    code, out, err = await run("send", "--gateway", address, "--session", "demo", "hello")
    assert (code, out) == (1, "")
    assert err.startswith(f"error: cannot reach the runyard gateway at {address} (connection refused).\n"), (
        err
    )
    assert "runyard up" in err and "UNAVAILABLE UNAVAILABLE" not in err and "Traceback" not in err
    # chat gives the same answer before showing a prompt.
    code, out, chat_err = await run("chat", "--gateway", address, "--session", "demo", stdin=b"hello\n")
    assert (code, out, chat_err) == (1, "", err)
    code, _, err = await run("sessions", "list", "--gateway", address)
    assert code == 1 and "runyard up" in err


async def test_up_refuses_a_taken_port_in_one_line_naming_it_and_the_likely_cause(tmp_path: Path):
    env = clean_env(RUNYARD_HOME=str(tmp_path / "home"), RUNYARD_DATA_DIR=str(tmp_path / "pg"))
    for name in ("gateway", "router", "sessions", "worker"):
        env[f"RUNYARD_{name.upper()}__LISTEN"] = f"127.0.0.1:{free_port()}"
        env[f"RUNYARD_{name.upper()}__METRICS_PORT"] = str(free_port())
    # Another program on the router's metrics port.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        code, out, err = await run("up", env={**env, "RUNYARD_ROUTER__METRICS_PORT": str(port)})
    assert (code, out) == (1, ""), err
    assert err.count("\n") == 1 and err.startswith(
        f"runyard up: port {port} (router metrics) is already in use"
    ), err
    assert "another program" in err and "RUNYARD_ROUTER__METRICS_PORT" in err
    # A runyard service (gRPC health answers) on the gateway's port: another stack.
    server = ServiceServer("gateway", "127.0.0.1:0", [], shutdown_grace_s=0.1)
    await server.start()
    try:
        code, out, err = await run("up", env={**env, "RUNYARD_GATEWAY__LISTEN": f"127.0.0.1:{server.port}"})
    finally:
        await server.stop(0)
    assert (code, out) == (1, "")
    assert err.startswith(
        f"runyard up: port {server.port} (gateway gRPC) is already in use: another runyard stack"
    )
    assert err.count("\n") == 1 and "runyard status" in err
    assert not (tmp_path / "pg").exists(), "nothing was started"


async def test_up_with_a_dead_openai_url_and_no_model_says_what_to_do(tmp_path: Path):
    env = clean_env(RUNYARD_HOME=str(tmp_path / "home"), RUNYARD_DATA_DIR=str(tmp_path / "pg"))
    for name in ("gateway", "router", "sessions", "worker"):
        env[f"RUNYARD_{name.upper()}__LISTEN"] = f"127.0.0.1:{free_port()}"
        env[f"RUNYARD_{name.upper()}__METRICS_PORT"] = "0"
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, _, err = await run("up", "--openai-base-url", url, env=env)
    assert code == 1
    assert f"cannot list the models at {url}/models (connection refused" in err
    assert "--model NAME" in err and "urlopen error" not in err


# ---------------------------------------------------------------- with a stack


def stack_config() -> dict:
    return {
        "providers": {"echo": {"type": "echo", "echo_delay_ms": 150}, "other": {"type": "echo"}},
        # echo/fail-404 behaves like a model that does not exist: a failover before the first token.
        "agents": {"flaky": {"model": "echo/fail-404", "fallbacks": ["echo/echo"]}},
    }


async def test_send_shows_progress_on_a_terminal_only_and_takes_a_model(stack_factory):
    stack = await stack_factory(stack_config()).start()
    gateway = ["--gateway", stack.gateway_address]
    env = clean_env()

    # stderr on a terminal: queued / started on the model, erased once the answer streams.
    with terminal(
        [*RUNYARD, "send", *gateway, "--session", "tty", "hello", "there"], env, stdout_pipe=True
    ) as term:
        term.expect("started on echo/echo")
        assert term.proc.wait(30) == 0
        assert term.proc.stdout is not None and term.proc.stdout.read() == b"echo: hello there\n"
        shown = term.drain()
    assert "\x1b[2K" in shown  # the status line is erased, not left above the answer

    # Piped: nothing but the answer.
    code, out, err = await run("send", *gateway, "--session", "pipe", "hello", env=env)
    assert (code, out, err) == (0, "echo: hello\n", "")

    # A failover before the first token: shown on a terminal, not when piped (the output is unaffected).
    argv = [*RUNYARD, "send", *gateway, "--session", "flaky", "--agent", "flaky", "hi"]
    with terminal(argv, env, stdout_pipe=True) as term:
        term.expect("[failover echo/fail-404 -> echo/echo: MODEL_NOT_FOUND]")
        assert term.proc.wait(30) == 0
    code, out, err = await run("send", *gateway, "--session", "flaky", "--agent", "flaky", "again", env=env)
    assert (code, out, err) == (0, "echo: again\n", "")

    # --model picks the model (ModelPreferences.model).
    code, out, err = await run(
        "send", *gateway, "--session", "pipe", "--model", "other/m1", "--timing", "hi", env=env
    )
    assert (code, out) == (0, "echo: hi\n") and err.startswith("[other/m1; first token"), err

    # sessions list: a header, and --json for scripts.
    code, out, _ = await run("sessions", "list", *gateway, env=env)
    header, *rows = out.splitlines()
    assert code == 0 and header.split() == ["KEY", "SESSION", "AGENT", "MESSAGES", "CREATED", "STATE"]
    assert sorted(row.split()[0] for row in rows) == ["flaky", "pipe", "tty"]
    code, out, _ = await run("sessions", "list", *gateway, "--json", env=env)
    sessions = {s["key"]: s for s in json.loads(out)}
    assert set(sessions) == {"flaky", "pipe", "tty"}
    assert (int(sessions["pipe"]["message_count"]), sessions["pipe"]["state"]) == (4, "current")


async def test_chat_runs_local_commands_and_ctrl_c_cancels_a_reply_then_leaves(stack_factory):
    stack = await stack_factory(stack_config()).start()
    argv = [*RUNYARD, "chat", "--gateway", stack.gateway_address, "--session", "term"]

    def converse() -> int:
        with terminal(argv, clean_env()) as term:
            term.expect("> ")
            term.write(b"/help\r")
            assert "/reset" in term.expect("> ") and "echo:" not in term.output.decode()
            term.write(b"/nonsense\r")
            assert "unknown command /nonsense" in term.expect("> ")
            term.write(b"hello\r")
            term.expect("echo: hello")
            term.expect("> ")
            long = " ".join(f"w{i}" for i in range(60))  # 60 words, 150 ms apart: 9 s
            term.write(long.encode() + b"\r")
            term.expect("echo: w0")
            term.write(b"\x03")  # Ctrl-C while the reply streams: cancel it, back to the prompt
            term.expect("[cancelled]", timeout_s=10)
            term.expect("> ", timeout_s=10)
            term.write(b"\x03")  # Ctrl-C at the prompt: leave now, not at the next Enter
            return term.proc.wait(10)

    assert await asyncio.to_thread(converse) == 130
    async with stack.client() as client:
        messages = await client.unary("GetMessages", gateway_pb2.GetMessagesRequest(session_key="term"))
    # /help never reached the model; the cancelled run left nothing in the transcript.
    assert [m.content for m in messages.messages] == ["hello", "echo: hello"]


async def test_chat_leaves_at_once_on_ctrl_c_with_half_a_line_typed(stack_factory):
    stack = stack_factory()
    await stack.start_service("sessions")
    await stack.start_service("gateway")
    argv = [*RUNYARD, "chat", "--gateway", stack.gateway_address, "--session", "quick"]

    def interrupted() -> int:
        with terminal(argv, clean_env()) as term:
            term.expect("> ")
            term.write(b"half a line")  # typed, no Enter
            term.write(b"\x03")
            return term.proc.wait(10)

    assert await asyncio.to_thread(interrupted) == 130
