"""A real Prometheus server scrapes the live stack with deploy/prometheus.yml
(targets pointed at the test's ports, 1 s scrape interval); everything is
asserted through Prometheus's HTTP API, as a dashboard would see it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

import runyard
from tests.stack import free_port
from tests.support import ROOT

pytestmark = pytest.mark.timeout(180)

SERVICES = ("gateway", "router", "sessions", "worker")


def render_config(ports: dict[str, int], path: Path) -> None:
    """deploy/prometheus.yml with each job's target moved to the test's metrics port."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(SERVICES), "deploy/prometheus.yml must scrape every service"
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    for name, job in jobs.items():
        job["scrape_interval"] = "1s"
        job["scrape_timeout"] = "1s"
        (static,) = job["static_configs"]
        host = static["targets"][0].rsplit(":", 1)[0]
        static["targets"] = [f"{host}:{ports[name]}"]
    path.write_text(yaml.safe_dump(config))


class Prometheus:
    """A prometheus process and its HTTP API."""

    def __init__(self, binary: str, config: Path, data: Path, port: int, log: Path):
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = self.get("/api/v1/query", query=expr)
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None when it returns nothing)."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=1):
                return True
        except OSError:
            return False

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            if await asyncio.to_thread(self.ready):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"prometheus not ready:\n{self.log.read_text()[-3000:]}")

    async def until(self, what: str, check, timeout_s: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            result = await asyncio.to_thread(check)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not seen through Prometheus in {timeout_s:.0f}s")
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package `prometheus`; .ci/run installs it)")
    return binary


@pytest.fixture
async def prometheus_factory(tmp_path: Path, prometheus_binary: str):
    started: list[Prometheus] = []

    def start(ports: dict[str, int]) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        render_config(ports, config)
        server = Prometheus(
            prometheus_binary, config, tmp_path / "tsdb", free_port(), tmp_path / "prometheus.log"
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "runyard.json").read_text())
    return [
        t["expr"].replace("$__rate_interval", "1m") for p in dashboard["panels"] for t in p.get("targets", [])
    ]


async def test_prometheus_scrapes_every_service_and_sees_the_runs(stack_factory, prometheus_factory):
    ports = {name: free_port() for name in SERVICES}
    stack = stack_factory({name: {"metrics_port": ports[name]} for name in ("gateway", "router", "sessions")})
    await stack.start(workers=0)
    await stack.add_worker(extra={"worker": {"metrics_port": ports["worker"]}})
    prometheus = prometheus_factory(ports)
    await prometheus.wait_ready()

    def all_targets_up() -> bool:
        active = prometheus.get("/api/v1/targets")["data"]["activeTargets"]
        return len(active) == 4 and all(t["health"] == "up" for t in active)

    await prometheus.until("all four targets up", all_targets_up)
    up = {r["metric"]["job"]: r["value"][1] for r in prometheus.query("up")}
    assert up == {name: "1" for name in SERVICES}

    sent = 'sum(grpc_server_handled_total{job="gateway", grpc_method="SendMessage", grpc_code="OK"})'
    completed = 'sum(runyard_runs_total{job="gateway", status="completed"})'
    # The series exist (value 0) before the first run: increase() sees the first one.
    assert prometheus.value(sent) == 0
    assert prometheus.value(completed) == 0
    assert prometheus.value('sum(grpc_server_handled_total{job="gateway", grpc_method="SendMessage"})') == 0

    async with stack.client() as client:
        for index in range(3):
            async for _ in client.send(f"prometheus:{index}", f"message {index}"):
                pass

    # Once every target has been scraped again, each service's counters include the runs.
    done = time.time() + 0.2
    await prometheus.until(
        "a scrape of every target after the runs", lambda: prometheus.value("min(timestamp(up))") > done
    )
    await prometheus.until("3 SendMessage calls handled", lambda: prometheus.value(sent) == 3)
    await prometheus.until("3 completed runs", lambda: prometheus.value(completed) == 3)
    assert prometheus.value(f"increase({completed.removeprefix('sum(').removesuffix(')')}[1m])") > 0
    assert (
        prometheus.value('sum(grpc_server_msg_sent_total{job="gateway", grpc_method="SendMessage"})') >= 3 * 4
    )  # queued, started, at least one text delta, completed

    # Client-side metrics of the internal channels, with Go label values.
    await prometheus.until(
        "the worker's Generate calls (client side)",
        lambda: (
            prometheus.value(
                'sum(grpc_client_handled_total{job="worker", grpc_service="runyard.v1.RouterService", '
                'grpc_method="Generate", grpc_type="server_stream", grpc_code="OK"})'
            )
            == 3
        ),
    )
    assert (
        prometheus.value(
            'sum(grpc_client_started_total{job="gateway", grpc_service="runyard.v1.SessionService"})'
        )
        >= 3
    )
    assert (
        prometheus.value(
            'sum(grpc_server_handled_total{job="router", grpc_method="Generate", grpc_code="OK"})'
        )
        == 3
    )
    # Domain metrics where the events happen.
    assert prometheus.value('sum(runyard_time_to_first_token_seconds_count{job="router"})') == 3
    assert prometheus.value('sum(runyard_run_queue_wait_seconds_count{job="gateway"})') == 3
    assert prometheus.value('sum(runyard_run_duration_seconds_count{job="gateway", status="completed"})') == 3
    assert prometheus.value('sum(runyard_tokens_streamed_total{job="router"})') >= 3
    assert prometheus.value('runyard_workers_connected{job="gateway"}') == 1
    assert prometheus.value('runyard_worker_free_capacity{job="gateway"}') == 4
    assert prometheus.value('sum(runyard_snapshot_bytes_count{job="sessions"})') >= 3
    versions = {
        (r["metric"]["job"], r["metric"]["service"], r["metric"]["version"])
        for r in prometheus.query("runyard_build_info")
    }
    assert versions == {(name, name, runyard.__version__) for name in SERVICES}
    # No *_created series (go-grpc-prometheus exports none), and a service
    # exports only the runyard_* families it sets.
    assert prometheus.query('{__name__=~".+_created"}') == []
    assert prometheus.query('runyard_runs_total{job!="gateway"}') == []
    assert prometheus.query('runyard_failovers_total{job!="router"}') == []
    assert {r["metric"]["job"] for r in prometheus.query("runyard_snapshot_bytes_count")} == {"sessions"}
    # The worker's hub stream is in flight on the gateway.
    hub = 'grpc_service="runyard.v1.WorkerHubService", grpc_type="bidi_stream"'
    assert prometheus.value(f'runyard_rpcs_in_flight{{job="gateway", {hub}}}') == 1

    # Every query of the Grafana dashboard runs on the real engine, and the
    # main panels have data.
    for expr in dashboard_exprs():
        prometheus.query(expr)
    assert prometheus.query("sum by (status) (rate(runyard_runs_total[1m]))")
    assert prometheus.query("sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total[1m]))")
