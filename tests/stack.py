"""Start the real services as processes on free ports against a test database.

Configuration is passed the way operators pass it: ``RUNYARD_*`` environment
variables (nested keys joined by ``__``, lists as JSON).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from runyard.client import Client
from runyard.common.auth import load_private_key, public_key_text, run_token_env
from runyard.common.config import merge_tree
from runyard.common.processes import Processes, free_port

__all__ = ["Stack", "flatten_env", "free_port"]

INTERNAL_SECRET = "test-internal-secret-0123456789-abcdef"
#: The gateway's run-token signing key (Ed25519 secret key, base64 of 64 bytes); the other
#: services get its public half (RUN_TOKEN_PUBLIC_KEY). Tests that mint tokens
#: sign with it: RunTokenSigner(RUN_TOKEN_PRIVATE_KEY).
RUN_TOKEN_PRIVATE_KEY = (
    "yc8QuxqRoobal2o4kvjETUtTKKMVwaYNofS4UDjUZC1FyZwb/buhANTmMLPgXmfjWPPhQwx327ydP82+PH+FZg=="
)
RUN_TOKEN_PUBLIC_KEY = public_key_text(load_private_key(RUN_TOKEN_PRIVATE_KEY).public_key())
#: Kept for tests written before run tokens were Ed25519: now the signing key.
RUN_TOKEN_SECRET = RUN_TOKEN_PRIVATE_KEY


def flatten_env(tree: dict[str, Any], prefix: str = "RUNYARD") -> dict[str, str]:
    """``{"gateway": {"listen": "x"}}`` -> ``{"RUNYARD_GATEWAY__LISTEN": "x"}``."""
    env: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}__{key.upper()}" if prefix != "RUNYARD" else f"RUNYARD_{key.upper()}"
        if isinstance(value, dict) and value and not key.endswith("headers"):
            env.update(flatten_env(value, name))
        elif isinstance(value, (list, dict)):
            env[name] = json.dumps(value)
        elif isinstance(value, bool):
            env[name] = "true" if value else "false"
        else:
            env[name] = str(value)
    return env


class Stack:
    """The four services as processes (any subset, any number of workers).

    Args:
        tmp_path: where logs go.
        database_url: the test's own database.
        config: nested overrides, e.g. ``{"agents": {"default": {"model": "fake/a"}}}``.
    """

    def __init__(self, tmp_path: Path, database_url: str, config: dict[str, Any] | None = None):
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.ports = {
            "gateway": free_port(),
            "router": free_port(),
            "sessions": free_port(),
            "gateway_internal": free_port(),
        }
        base: dict[str, Any] = {
            "log_level": "INFO",
            "endpoints": {
                "gateway": f"127.0.0.1:{self.ports['gateway']}",
                "gateway_internal": f"127.0.0.1:{self.ports['gateway_internal']}",
                "router": f"127.0.0.1:{self.ports['router']}",
                "sessions": f"127.0.0.1:{self.ports['sessions']}",
            },
            "gateway": {
                "listen": f"127.0.0.1:{self.ports['gateway']}",
                "internal_listen": f"127.0.0.1:{self.ports['gateway_internal']}",
                "metrics_port": 0,
                "poll_interval_ms": 200,
                "heartbeat_interval_ms": 300,
                "run_lease_ms": 3000,
                "shutdown_grace_s": 3,
            },
            "router": {
                "listen": f"127.0.0.1:{self.ports['router']}",
                "metrics_port": 0,
                "shutdown_grace_s": 3,
            },
            "sessions": {
                "listen": f"127.0.0.1:{self.ports['sessions']}",
                "metrics_port": 0,
                "shutdown_grace_s": 3,
            },
            "worker": {"metrics_port": 0, "capacity": 4, "shutdown_grace_s": 3, "reconnect_max_ms": 500},
        }
        self.config = merge_tree(base, config or {})
        self.processes = Processes(tmp_path, log_tail_chars=4000)
        self.procs = self.processes.procs
        self._workers = 0
        #: Client credentials for health checks when the stack runs with [tls].
        self.channel_credentials: grpc.ChannelCredentials | None = None

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.ports['gateway']}"

    @property
    def gateway_internal_address(self) -> str:
        return f"127.0.0.1:{self.ports['gateway_internal']}"

    def env(self, extra: dict[str, Any] | None = None, service: str = "") -> dict[str, str]:
        """The environment of ``runyard serve <service>``: its half of the run-token keys."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
        env["RUNYARD_INTERNAL_SECRET"] = INTERNAL_SECRET
        env.update(run_token_env(service, RUN_TOKEN_PRIVATE_KEY))
        env.update(flatten_env(merge_tree(self.config, extra or {})))
        env["RUNYARD_DATABASE_URL"] = self.database_url
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def log_path(self, name: str) -> Path:
        return self.processes.log_path(name)

    def logs(self, name: str) -> str:
        return self.processes.log(name)

    async def spawn(self, name: str, service: str, extra: dict[str, Any] | None = None) -> None:
        """Start ``runyard serve <service>`` as process ``name`` (not waiting for health)."""
        argv = [sys.executable, "-m", "runyard", "serve", service]
        await self.processes.spawn(name, argv, self.env(extra, service))

    async def wait_healthy(self, name: str, address: str, timeout_s: float = 30.0) -> None:
        credentials = self.channel_credentials
        await self.processes.wait_healthy(name, address, timeout_s=timeout_s, credentials=credentials)

    async def start_service(self, service: str) -> None:
        """Start (or restart) one of gateway, router, sessions and wait until SERVING."""
        await self.spawn(service, service)
        await self.wait_healthy(service, f"127.0.0.1:{self.ports[service]}")

    async def add_worker(self, *, wait_connected: bool = True, extra: dict[str, Any] | None = None) -> str:
        """Start one more worker; returns its process name (``worker-N``)."""
        self._workers += 1
        name = f"worker-{self._workers}"
        port = free_port()
        self.ports[name] = port
        own = {"worker": {"listen": f"127.0.0.1:{port}", "worker_id": name}}
        await self.spawn(name, "worker", merge_tree(own, extra or {}))
        await self.wait_healthy(name, f"127.0.0.1:{port}")
        if wait_connected:
            await self.wait_log(name, "connected to gateway")
        return name

    async def wait_log(self, name: str, text: str, timeout_s: float = 20.0, count: int = 1) -> None:
        await self.processes.wait_log(name, text, timeout_s=timeout_s, count=count)

    async def start(self, *, workers: int = 1) -> Stack:
        """Sessions, router and gateway (in parallel), then ``workers`` workers."""
        await asyncio.gather(*(self.start_service(s) for s in ("sessions", "router", "gateway")))
        await asyncio.gather(*(self.add_worker() for _ in range(workers)))
        return self

    async def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        """Signal a process and wait for it to exit; returns its exit code.

        Raises:
            TimeoutError: it had to be killed after ``timeout_s``.
        """
        if await self.processes.stop([name], sig=sig, timeout_s=timeout_s):
            # The end of its log: a stop past its grace names what it waits on there.
            raise TimeoutError(
                f"{name} did not exit within {timeout_s:g} s of signal {sig}; killed. "
                f"Its log ends:\n{self.logs(name)[-12000:]}"
            )
        return int(self.procs[name].returncode or 0)

    def client(self, api_key: str = "") -> Client:
        return Client(self.gateway_address, api_key=api_key)

    async def close(self) -> None:
        workers = [n for n in self.procs if n.startswith("worker")]
        gateways = [n for n in self.procs if n.startswith("gateway")]
        rest = [n for n in self.procs if n not in workers and n not in gateways]
        for group in (workers, gateways, rest):
            await self.processes.stop(group, timeout_s=10)
