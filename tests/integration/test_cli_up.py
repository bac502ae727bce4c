"""`runyard up` as a new user runs it: embedded PostgreSQL, four processes,
`runyard send` streaming the reply, Ctrl-C, and a restart that keeps the
transcript."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.stack import free_port

pytestmark = pytest.mark.timeout(180)


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNYARD_", "OPENAI_"))}
    ports = {name: free_port() for name in ("gateway", "router", "sessions", "worker")}
    for name, port in ports.items():
        env[f"RUNYARD_{name.upper()}__LISTEN"] = f"127.0.0.1:{port}"
        env[f"RUNYARD_{name.upper()}__METRICS_PORT"] = "0"
        if name != "worker":
            env[f"RUNYARD_ENDPOINTS__{name.upper()}"] = f"127.0.0.1:{port}"
    env["RUNYARD_HOME"] = str(tmp_path / "home")
    env["RUNYARD_DATA_DIR"] = str(tmp_path / "pg")
    env["RUNYARD_PROVIDERS__ECHO__ECHO_DELAY_MS"] = "5"
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def _run(env: dict[str, str], *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runyard",
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def _up(env: dict[str, str], *args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runyard",
        "up",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    seen = ""
    while "Ctrl-C here stops everything" not in seen:
        line = await asyncio.wait_for(proc.stdout.readline(), 180)
        if not line:
            raise AssertionError(f"runyard up exited early:\n{seen}")
        seen += line.decode()
    return proc, seen


async def _stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None
    rest = await asyncio.wait_for(proc.stdout.read(), 60)
    await asyncio.wait_for(proc.wait(), 10)
    return rest.decode()


async def test_up_send_stop_and_restart_keeps_the_transcript(tmp_path: Path):
    env = _env(tmp_path)
    proc, banner = await _up(env)
    try:
        assert "runyard is up" in banner
        assert "access: OPEN" in banner
        for name in ("gateway", "router", "sessions", "worker"):
            assert env[f"RUNYARD_{name.upper()}__LISTEN"] in banner
        code, out, err = await _run(env, "send", "--session", "demo", "--timing", "hello", "there")
        assert code == 0, err
        assert out == "echo: hello there\n"
        assert "first token" in err
    finally:
        tail = await _stop(proc)
    assert proc.returncode == 0, tail
    assert "stopped" in tail

    proc, _ = await _up(env)
    try:
        code, out, err = await _run(env, "sessions", "show", "demo")
        assert code == 0, err
        assert "user: hello there" in out
        assert "assistant: echo: hello there" in out
        code, out, _ = await _run(env, "chat", "--session", "demo", stdin=b"again\n/exit\n")
        assert code == 0
        assert "echo: again" in out
        code, out, _ = await _run(env, "sessions", "list")
        assert "demo" in out and "4 msgs" in out
    finally:
        await _stop(proc)
    assert proc.returncode == 0


async def test_config_check_prints_every_error_with_its_path(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nmax_attempts = 0\n[sessions]\ncolour = 1\n")
    env = _env(tmp_path)
    env["RUNYARD_HANDSHAKE_TIMEOUT_MS"] = "soon"
    code, _, err = await _run(env, "--config", str(bad), "config", "check")
    assert code == 2
    assert "gateway.max_attempts:" in err and "sessions.colour: unknown setting" in err
    assert "gateway.handshake_timeout_ms:" in err and "RUNYARD_HANDSHAKE_TIMEOUT_MS" in err


async def test_a_service_with_bad_config_stops_with_the_path_instead_of_crash_looping(tmp_path: Path):
    env = _env(tmp_path)
    env["RUNYARD_DATABASE_URL"] = "postgresql://127.0.0.1:1/none"
    env["RUNYARD_GATEWAY__MAX_ATTEMPTS"] = "0"
    code, _, err = await _run(env, "serve", "gateway")
    assert code == 2
    assert "gateway.max_attempts" in err
    assert "auth.run_token_secret" not in err  # structural errors first, one clear list
