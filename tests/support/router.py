"""Helpers for the router tests (no tests here): an in-process router on a
test database, run payloads, and response collection.

Import the fixtures into a test module with
``from tests.support.router import router_factory  # noqa: F401``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2, router_pb2
from runyard.common import db
from runyard.common.config import Config, merge_tree
from runyard.common.outbox import Outbox
from runyard.router.cooldowns import CooldownStore
from runyard.router.engine import Router
from runyard.router.main import EVENTS_CHANNEL
from tests.fakes.anthropic_server import FakeAnthropic
from tests.fakes.openai_server import FakeOpenAI
from tests.support import close_pool, collect, kinds, text_of

__all__ = [
    "Harness",
    "NotFoundServer",
    "build_config",
    "collect",
    "fake_anthropic",
    "fast_openai",
    "kinds",
    "router_factory",
    "text_of",
]

#: Fast timers for tests (each test may override).
FAST_ROUTER = {
    "ttft_timeout_ms": 2_000,
    "idle_timeout_ms": 2_000,
    "request_timeout_ms": 20_000,
    "retry_backoff_initial_ms": 5,
    "retry_backoff_max_ms": 20,
    "probe_interval_ms": 60_000,
    "primary_probe_margin_ms": 0,
}


def build_config(data: dict[str, Any]) -> Config:
    """A validated :class:`Config` from a tree (echo provider always present)."""
    tree = merge_tree({"providers": {"echo": {"type": "echo"}}, "router": dict(FAST_ROUTER)}, data)
    config = Config.model_validate(tree)
    assert not config.problems(), config.problems()
    return config


def payload(
    agent_id: str = "default", *, session_id: str | None = None, text: str = "hi", **model: Any
) -> common_pb2.RunPayload:
    """A run payload with fresh ids (``model`` fills ModelPreferences)."""
    return common_pb2.RunPayload(
        run_id=str(uuid.uuid4()),
        org_id="org-1",
        session_id=session_id or str(uuid.uuid4()),
        session_key="test:key",
        agent_id=agent_id,
        input=common_pb2.RunInput(text=text),
        model=common_pb2.ModelPreferences(**model),
    )


def messages(text: str = "hi") -> list[common_pb2.Message]:
    return [
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
        common_pb2.Message(role=common_pb2.ROLE_USER, content=text),
    ]


def failovers(responses: Sequence[router_pb2.GenerateResponse]) -> list[common_pb2.ModelFailover]:
    return [r.model_failover for r in responses if r.HasField("model_failover")]


class NotFoundServer:
    """A web server that answers every request with an HTML page, by default
    a 404 (what a wrong base URL usually reaches); ``status`` 200 is a site's
    home page, 405 a route that takes no POST."""

    def __init__(self, status: int = 404) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                return

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = (
                    b"<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"
                )
                self.send_response(status)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Harness:
    """One in-process router on the test database."""

    config: Config
    pool: asyncpg.Pool
    store: CooldownStore
    router: Router
    outbox: Outbox
    extra: list[Any] = field(default_factory=list)

    async def generate(
        self, run: common_pb2.RunPayload | None = None, *, text: str = "hi", timeout_s: float | None = None
    ) -> list[router_pb2.GenerateResponse]:
        run = run or payload(text=text)
        return await collect(self.router.generate(run, messages(run.input.text or text), timeout_s=timeout_s))

    async def events(self, types: Sequence[str] = ()) -> list[common_pb2.LifecycleEvent]:
        """Every committed outbox event (after flushing the writer)."""
        await self.store.flush()
        await self.outbox.wait_final(self.pool)
        return await self.outbox.read(self.pool, 0, 1000, types)

    async def row(self, provider: str, profile: str, model: str) -> asyncpg.Record | None:
        await self.store.flush()
        return await self.pool.fetchrow(
            "SELECT * FROM router.cooldowns WHERE provider = $1 AND auth_profile = $2 AND model = $3",
            provider,
            profile,
            model,
        )


@pytest.fixture
def fast_openai() -> Iterator[FakeOpenAI]:
    """The scriptable OpenAI-compatible server, stopping in ~50 ms."""
    server = FakeOpenAI(poll_interval_s=0.05).start()
    yield server
    server.stop()


@pytest.fixture
def fake_anthropic() -> Iterator[FakeAnthropic]:
    """The scriptable Anthropic Messages server."""
    server = FakeAnthropic().start()
    yield server
    server.stop()


@pytest.fixture
async def router_factory(database_url: str) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """``await make(config_tree) -> Harness`` (started); all are closed at teardown.

    Routers made by one test share its database, like replicas would.
    """
    await db.migrate(database_url, "router")
    pool = await db.create_pool(database_url, min_size=1, max_size=8)
    made: list[Harness] = []

    async def make(data: dict[str, Any], *, instance: str = "router-test", listen: bool = True) -> Harness:
        config = build_config(data)
        outbox = Outbox("router", EVENTS_CHANNEL)
        store = CooldownStore(config.router, pool, database_url=database_url if listen else "", outbox=outbox)
        router = Router(config, store, instance_id=instance)
        await router.start()
        harness = Harness(config, pool, store, router, outbox)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.router.aclose()
    await close_pool(pool)
