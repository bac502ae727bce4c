"""``runyard status`` and ``runyard health`` against the four real services."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

import runyard
from runyard._proto.v1 import admin_pb2, common_pb2, router_pb2
from runyard.cli.status_commands import ServiceStatus, internal_secret, render_table
from runyard.common.config import load_config
from runyard.v1 import SendMessageRequest
from tests.stack import INTERNAL_SECRET, Stack, free_port

pytestmark = pytest.mark.timeout(90)


def runyard_cli(*args: str, secret: str = INTERNAL_SECRET) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
    env["RUNYARD_INTERNAL_SECRET"] = secret
    # Keep `runyard up`'s kept secrets out of the picture.
    env["RUNYARD_HOME"] = "/nonexistent-runyard-home"
    return subprocess.run(
        [sys.executable, "-m", "runyard", *args], capture_output=True, text=True, env=env, timeout=60
    )


def status_args(stack: Stack, *workers: str) -> list[str]:
    args = [
        "status",
        "--gateway",
        stack.gateway_internal_address,
        "--router",
        f"127.0.0.1:{stack.ports['router']}",
        "--sessions",
        f"127.0.0.1:{stack.ports['sessions']}",
    ]
    for name in workers:
        args += ["--worker", f"127.0.0.1:{stack.ports[name]}"]
    return args


async def test_status_reports_every_service_and_health_checks(stack_factory):
    stack = await stack_factory().start(workers=2)
    result = await asyncio.to_thread(runyard_cli, *status_args(stack, "worker-1", "worker-2"), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = {(entry["service"], entry["address"]): entry for entry in json.loads(result.stdout)}
    assert [service for service, _ in report] == ["gateway", "router", "sessions", "worker", "worker"]
    for entry in report.values():
        assert entry["health"] == "SERVING"
        assert entry["version"] == runyard.__version__
        assert entry["draining"] is False
        assert entry["problems"] == []
    gateway = report[("gateway", stack.gateway_internal_address)]
    assert gateway["queue_depth"] == 0
    assert sorted(w["worker_id"] for w in gateway["workers"]) == ["worker-1", "worker-2"]
    for worker in gateway["workers"]:
        assert (worker["capacity"], worker["running"], worker["free"], worker["draining"]) == (4, 0, 4, False)
    # The two workers' hub connections are streams the gateway is handling.
    assert gateway["streams_in_flight"] >= 2
    assert gateway["rpcs_in_flight"] >= gateway["streams_in_flight"]
    router = report[("router", f"127.0.0.1:{stack.ports['router']}")]
    assert isinstance(router["providers"], list)
    assert "workers" not in report[("sessions", f"127.0.0.1:{stack.ports['sessions']}")]

    table = await asyncio.to_thread(runyard_cli, *status_args(stack, "worker-1"))
    assert table.returncode == 0, table.stdout + table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "SERVICE",
        "ADDRESS",
        "HEALTH",
        "VERSION",
        "IN-FLIGHT",
        "WORKERS",
        "QUEUE",
        "PROVIDERS",
    ]
    gateway_row = next(line for line in lines if line.startswith("gateway"))
    assert stack.gateway_internal_address in gateway_row and "SERVING" in gateway_row
    assert "2 (8/8 free)" in gateway_row
    assert any(line.split()[:1] == ["worker-1"] for line in lines), table.stdout
    assert "workers connected to gateway" in table.stdout

    # A wrong internal secret: health still answers, the reports are refused and say why.
    refused = await asyncio.to_thread(
        runyard_cli, *status_args(stack, "worker-1"), "--json", secret="not-the-secret"
    )
    assert refused.returncode == 1
    for entry in json.loads(refused.stdout):
        assert entry["health"] == "SERVING"
        assert "version" not in entry
        assert any("internal secret" in problem for problem in entry["problems"]), entry

    # `runyard health`: one server, exit 0 only when SERVING.
    ok = await asyncio.to_thread(runyard_cli, "health", stack.gateway_address)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    down = await asyncio.to_thread(runyard_cli, "health", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert down.returncode == 1
    assert "UNAVAILABLE" in down.stderr or "DEADLINE_EXCEEDED" in down.stderr


async def test_status_shows_queue_depth_and_unreachable_worker(stack_factory):
    stack = await stack_factory().start(workers=1)
    assert await stack.stop("worker-1") == 0
    await stack.wait_log("gateway", "worker worker-1 disconnected")
    # With no worker, a message stays queued.
    async with stack.client() as client:
        call = client.stub.SendMessage(SendMessageRequest(session_key="status:queued", text="wait"))
        first = await call.read()
        assert first.HasField("queued")
        call.cancel()

    result = await asyncio.to_thread(runyard_cli, *status_args(stack, "worker-1"), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    by_service = {entry["service"]: entry for entry in report}
    assert by_service["gateway"]["queue_depth"] == 1
    assert by_service["gateway"]["workers"] == []
    assert by_service["worker"]["health"] == "UNREACHABLE"
    assert by_service["worker"]["problems"]

    table = await asyncio.to_thread(runyard_cli, *status_args(stack, "worker-1"))
    assert table.returncode == 1
    worker_row = next(line for line in table.stdout.splitlines() if line.startswith("worker"))
    assert "UNREACHABLE" in worker_row


def test_status_uses_the_secret_runyard_up_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNYARD_HOME", str(tmp_path))
    assert internal_secret(load_config(environ={})) == ""
    kept = {"internal_secret": "kept-by-up", "run_token_secret": "x"}
    (tmp_path / "secrets.json").write_text(json.dumps(kept))
    assert internal_secret(load_config(environ={})) == "kept-by-up"
    # A configured secret wins.
    assert internal_secret(load_config(environ={"RUNYARD_INTERNAL_SECRET": "configured"})) == "configured"


def test_status_table_lists_provider_states_that_are_not_ok():
    until = Timestamp(seconds=int(time.time()) + 60)
    providers = router_pb2.GetProviderStatusResponse(
        states=[
            router_pb2.ProviderState(
                provider="echo", auth_profile="default", health=router_pb2.PROVIDER_HEALTH_OK
            ),
            router_pb2.ProviderState(
                provider="openai",
                auth_profile="key-2",
                model="gpt-x",
                health=router_pb2.PROVIDER_HEALTH_COOLING,
                until=until,
                last_reason=common_pb2.FAILOVER_REASON_RATE_LIMIT,
                failure_count=3,
            ),
        ]
    )
    status = admin_pb2.GetStatusResponse(service="router", version="1.2.3")
    router = ServiceStatus("router", "10.0.0.2:50052", health="SERVING", status=status, providers=providers)
    out = io.StringIO()
    render_table([router], out)
    lines = out.getvalue().splitlines()
    assert lines[1].split()[:4] == ["router", "10.0.0.2:50052", "SERVING", "1.2.3"]
    assert lines[1].endswith("1 ok, 1 cooling")
    row = next(line for line in lines if line.strip().startswith("openai"))
    when = datetime.fromtimestamp(until.seconds).strftime("%H:%M:%S")
    assert row.split() == ["openai", "key-2", "gpt-x", "cooling", when, "RATE_LIMIT", "3"]
    assert not any(line.strip().startswith("echo") for line in lines)
    as_json = router.as_dict()["providers"]
    assert as_json[1]["state"] == "cooling" and as_json[1]["last_reason"] == "RATE_LIMIT"
