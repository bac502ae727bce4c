"""Operator sub-commands of ``runyard``: ``status`` and ``health``.

``runyard status`` asks every service, at once, for

* its gRPC health (``grpc.health.v1.Health/Check``),
* its own report (``runyard.v1.AdminService/GetStatus``: version, in-flight
  RPCs and streams; a gateway adds its connected workers and the queue depth,
  a worker its agents' MCP servers),
* and, from the router, the state of every provider / auth profile / model
  (``RouterService/GetProviderStatus``),

and prints one table row per service, then the gateway's workers, every
provider state that is not OK and every MCP server that is not ready. It
exits 0 only when every service is SERVING and answered every question.

``runyard health ADDRESS`` checks one server (exit 0 when SERVING); the
compose file uses it as the containers' health check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runyard._proto.v1 import admin_pb2, admin_pb2_grpc, common_pb2, router_pb2, router_pb2_grpc
from runyard.common import tls
from runyard.common.auth import internal_metadata
from runyard.common.clients import internal_channel
from runyard.common.config import Config, load_config

__all__ = ["ServiceStatus", "add_parsers", "collect_status", "internal_secret", "render_table"]

_HEALTH_NAMES = {v: k for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}
_PROVIDER_HEALTH = {
    router_pb2.PROVIDER_HEALTH_UNSPECIFIED: "unknown",
    router_pb2.PROVIDER_HEALTH_OK: "ok",
    router_pb2.PROVIDER_HEALTH_COOLING: "cooling",
    router_pb2.PROVIDER_HEALTH_DISABLED: "disabled",
}
_REASONS = {v: k.removeprefix("FAILOVER_REASON_") for k, v in common_pb2.FailoverReason.items()}
_MCP_STATES = {v: k.removeprefix("MCP_SERVER_STATE_").lower() for k, v in admin_pb2.McpServerState.items()}


@dataclass
class ServiceStatus:
    """What ``runyard status`` learnt about one service address."""

    service: str
    address: str
    #: SERVING, NOT_SERVING, UNREACHABLE, ... (grpc.health.v1 names).
    health: str = "UNKNOWN"
    #: AdminService/GetStatus answer (None: unreachable or refused, see ``problems``).
    status: admin_pb2.GetStatusResponse | None = None
    #: RouterService/GetProviderStatus answer (routers only).
    providers: router_pb2.GetProviderStatusResponse | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the service is SERVING."""
        return self.health == "SERVING"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form (``runyard status --json``)."""
        out: dict[str, Any] = {
            "service": self.service,
            "address": self.address,
            "health": self.health,
            "problems": self.problems,
        }
        if self.status is not None:
            out.update(
                version=self.status.version,
                draining=self.status.draining,
                started_at=self.status.started_at.ToJsonString(),
                rpcs_in_flight=self.status.rpcs_in_flight,
                streams_in_flight=self.status.streams_in_flight,
            )
            if self.status.HasField("gateway"):
                out["queue_depth"] = self.status.gateway.queue_depth
                out["workers"] = [
                    {
                        "worker_id": w.worker_id,
                        "capacity": w.capacity,
                        "running": w.running,
                        "free": w.free,
                        "draining": w.draining,
                    }
                    for w in self.status.gateway.workers
                ]
            if self.status.HasField("worker"):  # the worker's MCP servers (issue 13)
                out["mcp_servers"] = [
                    {
                        "agent_id": m.agent_id,
                        "name": m.name,
                        "transport": m.transport,
                        "state": _MCP_STATES.get(m.state, "unspecified"),
                        "tools": m.tools,
                        "since": m.since.ToJsonString(),
                        "restarts": m.restarts,
                        "last_error": m.last_error,
                        "protocol_version": m.protocol_version,
                    }
                    for m in self.status.worker.mcp_servers
                ]
        if self.providers is not None:
            out["providers"] = [
                {
                    "provider": s.provider,
                    "auth_profile": s.auth_profile,
                    "model": s.model,
                    "state": _PROVIDER_HEALTH.get(s.health, "unknown"),
                    "until": s.until.ToJsonString() if s.HasField("until") else None,
                    "last_reason": _REASONS.get(s.last_reason, "") if s.last_reason else "",
                    "failure_count": s.failure_count,
                }
                for s in self.providers.states
            ]
        return out


def _describe_error(what: str, exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"{what}: refused (internal secret missing or wrong: set RUNYARD_INTERNAL_SECRET)"
    return f"{what}: {code.name} {exc.details() or ''}".rstrip()


async def _probe(
    service: str, address: str, *, secret: str, timeout_s: float, tls_settings: tls.TlsSettings | None
) -> ServiceStatus:
    result = ServiceStatus(service, address)
    metadata = internal_metadata(secret)
    channel = internal_channel(address, tls=tls_settings)
    try:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout_s
            )
            result.health = _HEALTH_NAMES.get(reply.status, str(reply.status))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                result.health = "UNREACHABLE"
                result.problems.append(f"{exc.code().name} {exc.details() or ''}".rstrip())
                return result
            result.health = exc.code().name
        try:
            result.status = await admin_pb2_grpc.AdminServiceStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=timeout_s, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            result.problems.append(_describe_error("status", exc))
        if service == "router":
            try:
                result.providers = await router_pb2_grpc.RouterServiceStub(channel).GetProviderStatus(
                    router_pb2.GetProviderStatusRequest(), timeout=timeout_s, metadata=metadata
                )
            except grpc.aio.AioRpcError as exc:
                result.problems.append(_describe_error("provider status", exc))
    finally:
        await channel.close()
    return result


async def collect_status(
    targets: list[tuple[str, str]],
    *,
    secret: str,
    timeout_s: float = 3.0,
    tls_settings: tls.TlsSettings | None = None,
) -> list[ServiceStatus]:
    """Probe every ``(service, address)`` of ``targets`` concurrently
    (over TLS with ``tls_settings``, else plaintext)."""
    return list(
        await asyncio.gather(
            *(
                _probe(name, addr, secret=secret, timeout_s=timeout_s, tls_settings=tls_settings)
                for name, addr in targets
            )
        )
    )


def _in_flight(status: admin_pb2.GetStatusResponse | None) -> str:
    if status is None:
        return "-"
    streams = status.streams_in_flight
    return f"{status.rpcs_in_flight} ({streams} stream{'' if streams == 1 else 's'})"


def _workers(status: admin_pb2.GetStatusResponse | None) -> str:
    if status is None or not status.HasField("gateway"):
        return "-"
    workers = status.gateway.workers
    free = sum(w.free for w in workers)
    capacity = sum(w.capacity for w in workers)
    return f"{len(workers)} ({free}/{capacity} free)"


def _providers(result: ServiceStatus) -> str:
    if result.providers is None:
        return "-"
    if not result.providers.states:
        return "none reported"
    counts: dict[str, int] = {}
    for state in result.providers.states:
        name = _PROVIDER_HEALTH.get(state.health, "unknown")
        counts[name] = counts.get(name, 0) + 1
    order = ["ok", "cooling", "disabled", "unknown"]
    return ", ".join(f"{counts[n]} {n}" for n in order if n in counts)


def _table(rows: list[list[str]], out: TextIO, indent: str = "") -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write(indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n")


def _when(ts: Any) -> str:
    return datetime.fromtimestamp(ts.ToSeconds()).astimezone().strftime("%H:%M:%S")


def render_table(results: list[ServiceStatus], out: TextIO) -> None:
    """Print the services table, the gateways' workers, non-OK provider states and problems."""
    rows = [["SERVICE", "ADDRESS", "HEALTH", "VERSION", "IN-FLIGHT", "WORKERS", "QUEUE", "PROVIDERS"]]
    for r in results:
        health = r.health + (" (draining)" if r.status is not None and r.status.draining else "")
        queue = (
            str(r.status.gateway.queue_depth)
            if r.status is not None and r.status.HasField("gateway")
            else "-"
        )
        rows.append(
            [
                r.service,
                r.address,
                health,
                r.status.version if r.status is not None else "-",
                _in_flight(r.status),
                _workers(r.status),
                queue,
                _providers(r),
            ]
        )
    _table(rows, out)
    for r in results:
        if r.status is None or not r.status.HasField("gateway") or not r.status.gateway.workers:
            continue
        out.write(f"\nworkers connected to {r.service} {r.address}:\n")
        worker_rows = [["WORKER", "RUNNING", "CAPACITY", "FREE", "STATE"]]
        for w in r.status.gateway.workers:
            worker_rows.append(
                [
                    w.worker_id,
                    str(w.running),
                    str(w.capacity),
                    str(w.free),
                    "draining" if w.draining else "active",
                ]
            )
        _table(worker_rows, out, indent="  ")
    for r in results:
        if r.providers is None:
            continue
        troubled = [s for s in r.providers.states if s.health != router_pb2.PROVIDER_HEALTH_OK]
        if not troubled:
            continue
        out.write(f"\nprovider states that are not ok ({r.service} {r.address}):\n")
        state_rows = [["PROVIDER", "PROFILE", "MODEL", "STATE", "UNTIL", "LAST REASON", "FAILURES"]]
        for s in troubled:
            state_rows.append(
                [
                    s.provider,
                    s.auth_profile or "-",
                    s.model or "(all)",
                    _PROVIDER_HEALTH.get(s.health, "unknown"),
                    _when(s.until) if s.HasField("until") else "-",
                    _REASONS.get(s.last_reason, "-") if s.last_reason else "-",
                    str(s.failure_count),
                ]
            )
        _table(state_rows, out, indent="  ")
    for r in results:  # the worker's MCP servers that are not ready (issue 13)
        if r.status is None or not r.status.HasField("worker"):
            continue
        not_ready = [m for m in r.status.worker.mcp_servers if m.state != admin_pb2.MCP_SERVER_STATE_READY]
        if not not_ready:
            continue
        out.write(f"\nMCP servers that are not ready ({r.service} {r.address}):\n")
        mcp_rows = [["AGENT", "SERVER", "TRANSPORT", "STATE", "SINCE", "RESTARTS", "LAST ERROR"]]
        for m in not_ready:
            mcp_rows.append(
                [
                    m.agent_id,
                    m.name,
                    m.transport,
                    _MCP_STATES.get(m.state, "unspecified"),
                    _when(m.since) if m.HasField("since") else "-",
                    str(m.restarts),
                    m.last_error or "-",
                ]
            )
        _table(mcp_rows, out, indent="  ")
    problems = [(r, p) for r in results for p in r.problems]
    if problems:
        out.write("\n")
        out.writelines(f"{r.service} {r.address}: {problem}\n" for r, problem in problems)


def _local(address: str) -> str:
    """A listen address as a client dials it (wildcard hosts become loopback)."""
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def internal_secret(config: Config) -> str:
    """The internal secret: configured, else the one ``runyard up`` generated and kept."""
    if config.auth.internal_secret:
        return config.auth.internal_secret
    from runyard.cli.up import home_dir

    path = home_dir() / "secrets.json"
    try:
        return str(json.loads(path.read_text()).get("internal_secret", ""))
    except (OSError, ValueError):
        return ""


def _targets(args: argparse.Namespace, config: Config) -> list[tuple[str, str]]:
    targets = [
        # AdminService is on the gateway's internal listener.
        ("gateway", args.gateway or config.endpoints.gateway_internal),
        ("router", args.router or config.endpoints.router),
        ("sessions", args.sessions or config.endpoints.sessions),
    ]
    workers = args.worker or [_local(config.worker.listen)]
    targets.extend(("worker", address) for address in workers)
    return targets


async def _status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    config = load_config(args.config)
    results = await collect_status(
        _targets(args, config),
        secret=internal_secret(config),
        timeout_s=args.timeout,
        tls_settings=tls.load(config),
    )
    if args.json:
        json.dump([r.as_dict() for r in results], out, indent=2)
        out.write("\n")
    else:
        render_table(results, out)
    # 0 only when every service is SERVING and answered in full.
    return 0 if all(r.ok and not r.problems for r in results) else 1


async def _health(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    channel = internal_channel(args.address, tls=tls.load(config))
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        )
    except grpc.aio.AioRpcError as exc:
        print(f"{args.address}: {exc.code().name} {exc.details() or ''}".rstrip(), file=sys.stderr)
        return 1
    finally:
        await channel.close()
    name = _HEALTH_NAMES.get(reply.status, str(reply.status))
    print(name)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def add_parsers(sub: Any) -> None:
    """Add ``status`` and ``health`` to the ``runyard`` parser."""
    status = sub.add_parser(
        "status",
        help="health, version, in-flight RPCs, workers, queue depth and provider states of every service",
    )
    status.add_argument("--gateway", help="gateway internal host:port (default: endpoints.gateway_internal)")
    status.add_argument("--router", help="router host:port (default: endpoints.router)")
    status.add_argument("--sessions", help="sessions host:port (default: endpoints.sessions)")
    status.add_argument(
        "--worker", action="append", help="worker host:port; repeat for several (default: worker.listen)"
    )
    status.add_argument("--timeout", type=float, default=3.0, help="seconds per call (default 3)")
    status.add_argument("--json", action="store_true", help="print JSON instead of tables")
    status.set_defaults(func=lambda a: asyncio.run(_status(a)))

    health = sub.add_parser("health", help="gRPC health check of one server (exit 0 when SERVING)")
    health.add_argument("address", help="host:port")
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    health.set_defaults(func=lambda a: asyncio.run(_health(a)))
