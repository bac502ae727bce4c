"""Deployment files, checked with the real tools where the machine has them:
``docker compose config`` (Compose v2), ``promtool`` (Prometheus), the
Kubernetes API schemas (``kubernetes-validate``, strict) and pip building the
package from exactly the files the Dockerfile copies. Every command the
manifests run is parsed by the real ``runyard`` argument parser."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from typing import Any

import pytest
import yaml

from runyard.cli.main import build_parser
from runyard.common import metrics
from runyard.common.config import GatewayConfig, RouterConfig, SessionsConfig, WorkerConfig
from tests.stack import RUN_TOKEN_PRIVATE_KEY, RUN_TOKEN_PUBLIC_KEY
from tests.support import ROOT

pytestmark = pytest.mark.timeout(300)

SERVICES = ("gateway", "router", "sessions", "worker")
DEFAULTS = {
    "gateway": GatewayConfig(),
    "router": RouterConfig(),
    "sessions": SessionsConfig(),
    "worker": WorkerConfig(),
}
GRPC_PORT = {name: int(cfg.listen.rsplit(":", 1)[1]) for name, cfg in DEFAULTS.items()}
METRICS_PORT = {name: cfg.metrics_port for name, cfg in DEFAULTS.items()}
#: Seconds a stop must leave beyond shutdown_grace_s: the worker's 5 s wait for
#: result acknowledgements and the sessions hook drain bound (2 s), with margin.
DRAIN_MARGIN_S = 10
SECRETS = {
    "RUNYARD_INTERNAL_SECRET": "i" * 40,
    "RUNYARD_RUN_TOKEN_PRIVATE_KEY": RUN_TOKEN_PRIVATE_KEY,
    "RUNYARD_RUN_TOKEN_PUBLIC_KEY": RUN_TOKEN_PUBLIC_KEY,
}
#: The gateway's internal listener (workers, status): its own port, never published.
GATEWAY_INTERNAL_PORT = int(GatewayConfig().internal_listen.rsplit(":", 1)[1])


def seconds(duration: str | float) -> float:
    """Compose durations ("1m30s", "40s") and plain numbers as seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    total = 0.0
    for value, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration):
        total += float(value) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
    return total


def parses_as_runyard_command(argv: list[str]) -> None:
    """The real CLI parser accepts ``argv`` (argparse exits on an unknown command)."""
    args = build_parser().parse_args(argv)
    assert callable(args.func), argv


# ---------------------------------------------------------------- compose


def compose_services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def check_compose(compose: dict[str, Any]) -> None:
    services = compose_services(compose)
    assert set(services) >= {"postgres", "migrate", *SERVICES, "prometheus"}

    postgres = services["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])

    migrate = services["migrate"]
    parses_as_runyard_command(migrate["command"])
    assert migrate["command"] == ["migrate"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate.get("restart") == "no"

    for name in SERVICES:
        service = services[name]
        assert service["command"] == ["serve", name]
        parses_as_runyard_command(service["command"])
        # A cheap HTTP probe of /readyz on the service's own metrics port (no
        # gRPC client, no runyard import); test_compose_health_check_follows_readiness runs it.
        test = service["healthcheck"]["test"]
        assert test[:5] == ["CMD", "python", "-I", "-S", "-c"], test
        assert f"'127.0.0.1', {METRICS_PORT[name]}," in test[5] and "'/readyz'" in test[5], test
        # Every dependency on another runyard service waits for it to be healthy,
        # on the migration for it to have completed.
        depends = service["depends_on"]
        assert depends, name
        for other, condition in depends.items():
            expected = "service_completed_successfully" if other == "migrate" else "service_healthy"
            assert condition["condition"] == expected, (name, other)
        env = service["environment"]
        for key in (
            "RUNYARD_DATABASE_URL",
            "RUNYARD_INTERNAL_SECRET",
            "RUNYARD_RUN_TOKEN_PUBLIC_KEY",
            "RUNYARD_ENDPOINTS__GATEWAY",
            "RUNYARD_ENDPOINTS__GATEWAY_INTERNAL",
            "RUNYARD_ENDPOINTS__ROUTER",
            "RUNYARD_ENDPOINTS__SESSIONS",
        ):
            assert key in env, (name, key)
        # Only the gateway signs run tokens.
        assert ("RUNYARD_RUN_TOKEN_PRIVATE_KEY" in env) == (name == "gateway"), name
        # stop_grace_period longer than the service's drain bound.
        grace = float(env[f"RUNYARD_{name.upper()}__SHUTDOWN_GRACE_S"])
        assert seconds(service["stop_grace_period"]) >= grace + DRAIN_MARGIN_S, name
        exposed = {int(p) for p in service.get("expose", [])}
        assert METRICS_PORT[name] in exposed, name
    for name, depends in (
        ("gateway", {"sessions", "migrate"}),
        ("worker", {"gateway", "router", "sessions"}),
    ):
        assert depends <= set(services[name]["depends_on"]), name
    for name in ("sessions", "router", "gateway"):
        assert "migrate" in services[name]["depends_on"], name
    assert services["worker"]["deploy"]["replicas"] == 2
    endpoints = services["gateway"]["environment"]
    for name in ("gateway", "router", "sessions"):
        assert endpoints[f"RUNYARD_ENDPOINTS__{name.upper()}"] == f"{name}:{GRPC_PORT[name]}"
    assert endpoints["RUNYARD_ENDPOINTS__GATEWAY_INTERNAL"] == f"gateway:{GATEWAY_INTERNAL_PORT}"
    # The internal listener is reachable by the other containers, never published.
    assert GATEWAY_INTERNAL_PORT in {int(p) for p in services["gateway"]["expose"]}
    assert all(str(GATEWAY_INTERNAL_PORT) not in str(port) for port in services["gateway"].get("ports", []))

    # Prometheus scrapes every service with the compose scrape config and loads the alerting rules.
    prometheus = services["prometheus"]
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in prometheus["volumes"]]
    config_mount = next(m for m in mounts if m.split(":")[1] == "/etc/prometheus/prometheus.yml")
    source = (ROOT / config_mount.split(":")[0]).resolve()
    assert source == ROOT / "deploy" / "prometheus.compose.yml"
    scrape = yaml.safe_load(source.read_text())
    rules_mount = next(m for m in mounts if m.split(":")[1] == "/etc/prometheus/alerts.yml")
    assert (ROOT / rules_mount.split(":")[0]).resolve() == ROOT / "deploy" / "alerts.yml"
    assert scrape["rule_files"] == ["alerts.yml"]
    # Prometheus and Grafana have health checks of their own; Grafana waits for Prometheus.
    assert "http://127.0.0.1:9090/-/ready" in prometheus["healthcheck"]["test"]
    assert "http://127.0.0.1:3000/api/health" in services["grafana"]["healthcheck"]["test"]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert set(jobs) == set(SERVICES)
    for name, job in jobs.items():
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [name] and sd["port"] == METRICS_PORT[name], name

    for service in services.values():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if host.startswith((".", "/")):
                assert (ROOT / host).resolve().exists(), host


def test_compose_file_structure():
    check_compose(yaml.safe_load((ROOT / "compose.yaml").read_text()))


async def test_compose_health_check_follows_readiness():
    """The compose health check command itself, run against a live server's
    metrics port: exit 0 while SERVING, non-zero once a drain began."""
    from runyard.common.server import ServiceServer
    from tests.stack import free_port

    test = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["worker"]["healthcheck"]["test"]
    port = free_port()
    argv = [sys.executable, *test[2:5], test[5].replace(str(METRICS_PORT["worker"]), str(port))]
    http = metrics.serve_metrics(port, "127.0.0.1")

    def probe() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(argv, check=False, capture_output=True, timeout=30)

    server = ServiceServer("worker", "127.0.0.1:0", [], shutdown_grace_s=0.1)
    try:
        await server.start()
        assert (await asyncio.to_thread(probe)).returncode == 0
        await server.begin_shutdown()
        assert (await asyncio.to_thread(probe)).returncode != 0
    finally:
        await server.stop(0)
        assert http is not None
        http.shutdown()
        http.server_close()
        metrics.set_health_probe(None)


def _compose_available() -> str | None:
    if shutil.which("docker") is None:
        return "the docker CLI is not installed"
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "the docker compose plugin (Compose v2) is not installed (.ci/run installs it)"
    return None


def docker_compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RUNYARD_", "COMPOSE_", "POSTGRES_"))}
    clean.update(env)
    return subprocess.run(
        ["docker", "compose", "-f", str(ROOT / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=clean,
        cwd=ROOT,
        timeout=60,
    )


def test_docker_compose_config_validates():
    reason = _compose_available()
    if reason:
        pytest.skip(reason)
    result = docker_compose_config(SECRETS)
    assert result.returncode == 0, result.stderr
    normalized = json.loads(result.stdout)
    check_compose(normalized)
    # Interpolation reached the services.
    worker_env = normalized["services"]["worker"]["environment"]
    assert worker_env["RUNYARD_RUN_TOKEN_PUBLIC_KEY"] == SECRETS["RUNYARD_RUN_TOKEN_PUBLIC_KEY"]
    assert "RUNYARD_RUN_TOKEN_PRIVATE_KEY" not in worker_env
    assert worker_env["RUNYARD_DATABASE_URL"] == "postgresql://runyard:runyard@postgres:5432/runyard"


def test_docker_compose_refuses_to_run_without_secrets():
    reason = _compose_available()
    if reason:
        pytest.skip(reason)
    result = docker_compose_config({})
    assert result.returncode != 0
    assert "RUNYARD_INTERNAL_SECRET" in result.stderr or "RUNYARD_RUN_TOKEN_" in result.stderr


# ---------------------------------------------------------------- prometheus


def test_prometheus_configs_scrape_every_service():
    local = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    assert local["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in local["scrape_configs"]}
    assert set(jobs) == set(SERVICES)
    for name, job in jobs.items():
        (static,) = job["static_configs"]
        assert static["targets"] == [f"127.0.0.1:{METRICS_PORT[name]}"], name
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (the Debian prometheus package) is not installed")
    for path in ("deploy/prometheus.yml", "deploy/prometheus.compose.yml"):
        result = subprocess.run([promtool, "check", "config", path], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- alerts

ALERTS = ROOT / "deploy" / "alerts.yml"


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (the Debian prometheus package) is not installed")
    return promtool


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def test_alert_rules_cover_the_operators_cases_with_metrics_runyard_exports():
    rules = alert_rules()
    for name in (
        "RunyardTargetDown",
        "RunyardServiceMissing",
        "RunyardNoWorkers",  # services down
        "RunyardDrainTimeouts",
        "RunyardHookErrors",
        "RunyardFailoverBurst",
        "RunyardQueueDepthHigh",
        "RunyardQueueWaitHigh",  # queue depth and age
        "RunyardAllModelsFailing",
        "RunyardRunsFailing",
    ):
        assert name in rules, name
    defined = defined_sample_names()
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        used = set(re.findall(r"\b(runyard_[a-z_]+)\b", rule["expr"]))
        assert used <= defined, (name, sorted(used - defined))


def test_alert_rules_pass_promtool_check_and_their_unit_tests(tmp_path):
    promtool = _promtool()
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        check=False,
        cwd=ALERTS.parent,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (ALERTS.parent / "alerts.test.yml").read_text()))
    assert tested == set(alert_rules()), "every alert has a unit test"
    # The unit tests do catch a rule that no longer fires as intended.
    rules = ALERTS.read_text().replace("max(runyard_queue_depth) > 100", "max(runyard_queue_depth) > 1000")
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(ALERTS.parent / "alerts.test.yml", tmp_path)
    broken = subprocess.run(
        [promtool, "test", "rules", "alerts.test.yml"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert broken.returncode != 0 and "RunyardQueueDepthHigh" in broken.stdout + broken.stderr


# ---------------------------------------------------------------- grafana

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "runyard.json"


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    return exprs


def defined_sample_names() -> set[str]:
    names = set()
    for value in vars(metrics).values():
        if isinstance(value, (metrics.Counter, metrics.Gauge, metrics.Histogram)):
            (family,) = value.describe()
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
    return names


def test_dashboard_uses_only_metrics_runyard_exports():
    defined = defined_sample_names()
    used = set()
    for expr in dashboard_exprs():
        used.update(re.findall(r"\b((?:runyard|grpc)_[a-z_]+)\b", expr))
    used -= {"grpc_type", "grpc_service", "grpc_method", "grpc_code"}  # label names
    assert used, "the dashboard queries no runyard metric"
    assert used <= defined, sorted(used - defined)
    # Every domain metric the issue lists has a panel.
    for name in (
        "runyard_runs_total",
        "runyard_run_queue_wait_seconds_bucket",
        "runyard_run_duration_seconds_bucket",
        "runyard_time_to_first_token_seconds_bucket",
        "runyard_tokens_streamed_total",
        "runyard_failovers_total",
        "runyard_provider_state",
        "runyard_active_sessions",
        "runyard_session_ends_total",
        "runyard_drain_duration_seconds_sum",
        "runyard_drain_timed_out_handlers_total",
        "runyard_hook_errors_total",
        "runyard_snapshot_bytes_bucket",
        "runyard_rpcs_in_flight",
        "runyard_workers_connected",
        "runyard_worker_free_capacity",
        "runyard_task_slots_in_use",
        "grpc_server_handled_total",
        "grpc_server_handling_seconds_bucket",
        "grpc_client_handled_total",
    ):
        assert name in used, name


def promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, as Prometheus runs it."""
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "1m")


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (the Debian prometheus package) is not installed")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{index}", "expr": promql(expr)}
                    for index, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # The check does fail on a broken query.
    path.write_text(
        yaml.safe_dump({"groups": [{"name": "x", "rules": [{"record": "x:y", "expr": "sum(rate(x[1m])"}]}]})
    )
    assert subprocess.run([promtool, "check", "rules", str(path)], capture_output=True).returncode != 0


def test_grafana_provisioning_matches_compose_mounts():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"])
    assert DASHBOARD.parent == (ROOT / "deploy/grafana/dashboards").resolve()
    assert (ROOT / "deploy/grafana/provisioning/dashboards").is_dir()
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/runyard.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["templating"]["list"][0]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# ---------------------------------------------------------------- kubernetes

K8S = ROOT / "deploy" / "k8s"


def k8s_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert kustomization["namespace"] == "runyard"


def test_k8s_manifests_match_the_kubernetes_api_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in k8s_documents():
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    # Strict validation does catch a misspelt field.
    broken = next(d for d in k8s_documents() if d["kind"] == "Deployment")
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def assert_restricted(pod_spec: dict[str, Any], name: str) -> None:
    """What the "restricted" Pod Security Standard checks, plus no service account token."""
    assert pod_spec["automountServiceAccountToken"] is False, name
    security = pod_spec["securityContext"]
    assert security["runAsNonRoot"] is True and security["seccompProfile"] == {"type": "RuntimeDefault"}, name
    for container in pod_spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"]["drop"] == ["ALL"], name


def test_k8s_network_policies_let_in_only_what_each_service_needs():
    docs = k8s_documents()
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    deployments = {d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"}
    deny = policies["runyard-default-deny-ingress"]
    (selector,) = deny["podSelector"]["matchExpressions"]
    assert deployments <= set(selector["values"]) and "ingress" not in deny
    assert policies["runyard-gateway"]["ingress"] == [{"ports": [{"port": "grpc"}]}]
    for name in ("runyard-router", "runyard-sessions"):
        (rule,) = policies[name]["ingress"]
        sources = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rule["from"]}
        assert sources == {"runyard-gateway", "runyard-worker"} and rule["ports"] == [{"port": "grpc"}], name
    (metrics_rule,) = policies["runyard-metrics"]["ingress"]
    assert metrics_rule["ports"] == [{"port": "metrics"}]
    assert not any(
        p["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "runyard-worker"
        for p in policies.values()
    ), "nothing but metrics reaches a worker"


def test_k8s_deployments_probe_drain_and_scale():
    docs = k8s_documents()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert set(deployments) == {f"runyard-{name}" for name in SERVICES}
    for name in SERVICES:
        deployment = deployments[f"runyard-{name}"]
        assert deployment["spec"]["replicas"] >= 2, name
        pod = deployment["spec"]["template"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        assert container["args"] == ["serve", name]
        parses_as_runyard_command(container["args"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        expected_ports = {"grpc": GRPC_PORT[name], "metrics": METRICS_PORT[name]}
        if name == "gateway":
            expected_ports["grpc-internal"] = GATEWAY_INTERNAL_PORT
        assert ports == expected_ports
        env = {e["name"]: e for e in container["env"]}
        assert env[f"RUNYARD_{name.upper()}__LISTEN"]["value"] == f"0.0.0.0:{GRPC_PORT[name]}"
        assert env[f"RUNYARD_{name.upper()}__METRICS_PORT"]["value"] == str(METRICS_PORT[name])
        for key, secret_key in (
            ("RUNYARD_DATABASE_URL", "database-url"),
            ("RUNYARD_INTERNAL_SECRET", "internal-secret"),
        ):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "runyard", "key": secret_key}
        # The run-token private key is the gateway's alone (a Secret of its own); the rest verify.
        if name == "gateway":
            assert env["RUNYARD_RUN_TOKEN_PRIVATE_KEY"]["valueFrom"]["secretKeyRef"] == {
                "name": "runyard-gateway",
                "key": "run-token-private-key",
            }
            assert env["RUNYARD_GATEWAY__INTERNAL_LISTEN"]["value"] == f"0.0.0.0:{GATEWAY_INTERNAL_PORT}"
        else:
            assert "RUNYARD_RUN_TOKEN_PRIVATE_KEY" not in env, name
            assert env["RUNYARD_RUN_TOKEN_PUBLIC_KEY"]["valueFrom"]["secretKeyRef"] == {
                "name": "runyard",
                "key": "run-token-public-key",
            }
        # HTTP probes on the metrics port: readiness and startup follow the gRPC
        # health (/readyz), liveness is /healthz (stays up while draining).
        for probe, path in (
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/readyz"),
            ("livenessProbe", "/healthz"),
        ):
            assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, (name, probe)
        # The "restricted" Pod Security profile admits the pod; no API token is mounted.
        assert_restricted(pod["spec"], name)
        # The pod gets longer than its drain to stop: preStop pause + shutdown_grace_s + margin.
        grace = float(env[f"RUNYARD_{name.upper()}__SHUTDOWN_GRACE_S"]["value"])
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        pause = float(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0.0
        termination = pod["spec"]["terminationGracePeriodSeconds"]
        assert termination >= pause + grace + DRAIN_MARGIN_S, name
        # Liveness never fires during a drain (health is NOT_SERVING then).
        liveness = container["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] > termination, name
        annotations = pod["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT[name])
        if name != "worker":
            service = services[f"runyard-{name}"]
            assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
            service_ports = {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]}
            assert service_ports["grpc"] == (GRPC_PORT[name], "grpc")
    config = next(d for d in docs if d["kind"] == "ConfigMap")
    for name in ("gateway", "router", "sessions"):
        host, port = config["data"][f"RUNYARD_ENDPOINTS__{name.upper()}"].split(":")
        assert host in services and int(port) == GRPC_PORT[name]
    # The public Service carries GatewayService only; the internal listener has its own ClusterIP Service.
    assert GATEWAY_INTERNAL_PORT not in {p["port"] for p in services["runyard-gateway"]["spec"]["ports"]}
    host, port = config["data"]["RUNYARD_ENDPOINTS__GATEWAY_INTERNAL"].split(":")
    internal = services[host]
    assert internal["spec"].get("type", "ClusterIP") == "ClusterIP" and int(port) == GATEWAY_INTERNAL_PORT
    job = next(d for d in docs if d["kind"] == "Job")
    assert_restricted(job["spec"]["template"]["spec"], "migrate")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"]
    parses_as_runyard_command(migrate["args"])
    budgets = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for d in docs
        if d["kind"] == "PodDisruptionBudget"
    }
    assert budgets == set(deployments)


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_runs_runyard_on_every_interface():
    instructions = dockerfile_instructions()
    assert ("ENTRYPOINT", '["runyard"]') in instructions
    exposed = {int(p) for kind, rest in instructions if kind == "EXPOSE" for p in rest.split()}
    assert exposed == set(GRPC_PORT.values()) | set(METRICS_PORT.values()) | {GATEWAY_INTERNAL_PORT}
    env = " ".join(rest for kind, rest in instructions if kind == "ENV")
    for name in SERVICES:
        assert f"RUNYARD_{name.upper()}__LISTEN=0.0.0.0:{GRPC_PORT[name]}" in env
    users = [rest for kind, rest in instructions if kind == "USER"]
    assert users and not users[-1].startswith(("0", "root"))


def test_build_requires_a_setuptools_that_reads_the_spdx_license():
    """``license = "Apache-2.0"`` (a PEP 639 SPDX expression) needs setuptools 77
    or later; an older one fails the build, so the declared minimum must be 77."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str)
    (setuptools,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    minimum = re.fullmatch(r"setuptools>=(\d+)(?:\.\d+)*(?:,.*)?", setuptools.replace(" ", ""))
    assert minimum is not None and int(minimum.group(1)) >= 77, setuptools


@pytest.mark.slow
def test_package_builds_from_exactly_the_docker_build_context(tmp_path):
    """pip builds the wheel from the files the Dockerfile copies (and .dockerignore lets through)."""
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", "the .dockerignore is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    context = tmp_path / "context"
    context.mkdir()
    copies = [
        rest.split()
        for kind, rest in dockerfile_instructions()
        if kind == "COPY" and not rest.startswith("--from")
    ]
    assert copies
    for args in copies:
        *sources, _dest = args
        for source in sources:
            assert source in allowed, f"{source} is copied but .dockerignore keeps it out"
            path = ROOT / source
            if path.is_dir():
                shutil.copytree(path, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(path, context / source)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path / "dist"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("runyard-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "runyard/cli/main.py",
        "runyard/common/admin.py",
        "runyard/_proto/v1/admin_pb2.py",
        "runyard/gateway/migrations/0001_init.sql",
        "runyard/py.typed",
    ):
        assert required in names, required
    for module in (ROOT / "services").rglob("*.py"):
        if "__pycache__" not in module.parts:
            assert f"runyard/{module.relative_to(ROOT / 'services').as_posix()}" in names, module
