"""Prometheus metrics shared by every service (one process = one service).

gRPC server metrics use the names and label values of go-grpc-prometheus /
go-grpc-middleware (``grpc_server_handled_total{grpc_code="InvalidArgument"}``),
so dashboards written for Go services work unchanged. Domain metrics are
prefixed ``runyard_`` and use base units; no run or session id is ever a label.

Like go-grpc-prometheus, no ``*_created`` series are exported (prometheus-client
adds one per counter and histogram child by default: about a third of all
samples). Every family is defined here, but a service's ``/metrics`` shows only
the ``runyard_*`` families that service sets (:data:`SERVICE_FAMILIES`), the
shared ones and the ``grpc_*``/process families.

The same HTTP server answers ``/healthz`` and ``/readyz`` for container health
checks (see :func:`set_health_probe` and :mod:`runyard.common.server`).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.registry import Collector

# Before any metric (or metric child) exists: the flag is read when one is created.
disable_created_metrics()  # type: ignore[no-untyped-call]  # unannotated in prometheus_client

__all__ = [
    "GO_CODE_NAMES",
    "PROVIDER_STATES",
    "SERVICE_FAMILIES",
    "init_grpc_server_metrics",
    "init_service_metrics",
    "serve_metrics",
    "set_health_probe",
    "set_provider_state",
]

#: grpc.StatusCode -> the Go ``codes.Code.String()`` spelling used as grpc_code.
GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

GRPC_SERVER_STARTED = Counter(
    "grpc_server_started_total", "Total number of RPCs started on the server.", _GRPC_LABELS
)
GRPC_SERVER_HANDLED = Counter(
    "grpc_server_handled_total",
    "Total number of RPCs completed on the server, regardless of success or failure.",
    (*_GRPC_LABELS, "grpc_code"),
)
GRPC_SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
    _GRPC_LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
GRPC_SERVER_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total",
    "Total number of RPC stream messages received on the server.",
    _GRPC_LABELS,
)
GRPC_SERVER_MSG_SENT = Counter(
    "grpc_server_msg_sent_total", "Total number of gRPC stream messages sent by the server.", _GRPC_LABELS
)
RPCS_IN_FLIGHT = Gauge(
    "runyard_rpcs_in_flight", "RPCs and streams currently being handled.", ("grpc_service", "grpc_type")
)

GRPC_CLIENT_STARTED = Counter(
    "grpc_client_started_total", "Total number of RPCs started on the client.", _GRPC_LABELS
)
GRPC_CLIENT_HANDLED = Counter(
    "grpc_client_handled_total",
    "Total number of RPCs completed by the client, regardless of success or failure.",
    (*_GRPC_LABELS, "grpc_code"),
)
GRPC_CLIENT_HANDLING_SECONDS = Histogram(
    "grpc_client_handling_seconds",
    "Histogram of response latency (seconds) of the gRPC until it is finished by the application.",
    _GRPC_LABELS,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
GRPC_CLIENT_MSG_RECEIVED = Counter(
    "grpc_client_msg_received_total",
    "Total number of RPC stream messages received by the client.",
    _GRPC_LABELS,
)
GRPC_CLIENT_MSG_SENT = Counter(
    "grpc_client_msg_sent_total", "Total number of gRPC stream messages sent by the client.", _GRPC_LABELS
)

# ---------------------------------------------------------------- domain metrics

RUNS_TOTAL = Counter("runyard_runs_total", "Runs that reached a terminal status.", ("status",))
RUNS_QUEUE_WAIT_SECONDS = Histogram(
    "runyard_run_queue_wait_seconds",
    "Time from a run's creation to its (first) claim by a worker.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
RUN_DURATION_SECONDS = Histogram(
    "runyard_run_duration_seconds",
    "Time from claim to terminal status.",
    ("status",),
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
TIME_TO_FIRST_TOKEN_SECONDS = Histogram(
    "runyard_time_to_first_token_seconds",
    "Time from a model request to its first streamed token.",
    ("provider",),
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKENS_STREAMED = Counter("runyard_tokens_streamed_total", "Text deltas streamed from models.", ("provider",))
FAILOVERS_TOTAL = Counter(
    "runyard_failovers_total",
    "Switches of an answer from one model to another (next_model, context_window_chain, "
    "content_policy_chain), by the failover reason of the model left behind.",
    ("reason",),
)
ROUTER_RETRIES_TOTAL = Counter(
    "runyard_router_retries_total",
    "Router retries of the same model, by failover reason and kind (same_model: after a backoff; "
    "auth_profile: with another key).",
    ("reason", "kind"),
)
ROUTER_ABORTS_TOTAL = Counter(
    "runyard_router_aborts_total",
    "Router requests that ended without an answer, by the failover reason that decided it and outcome "
    "(abort, exhausted, all_cooling, deadline, compact_session).",
    ("reason", "outcome"),
)
ROUTER_DECISIONS_TOTAL = Counter(
    "runyard_router_decisions_total",
    "Router failover decisions by reason and decision (retry_same_model, rotate_auth_profile, next_model, "
    "context_window_chain, content_policy_chain, compact_session, abort, exhausted).",
    ("reason", "decision"),
)
ROUTER_PROBES_TOTAL = Counter(
    "runyard_router_probes_total", "Attempts on a cooling model/profile (probes), by outcome.", ("outcome",)
)
RUN_EVENTS_PERSISTED = Counter("runyard_run_events_persisted_total", "Run events written to PostgreSQL.")
WORKERS_CONNECTED = Gauge("runyard_workers_connected", "Workers connected to this gateway.")
WORKER_FREE_CAPACITY = Gauge(
    "runyard_worker_free_capacity", "Free run slots of the workers connected to this gateway."
)
QUEUE_DEPTH = Gauge(
    "runyard_queue_depth", "Queued runs, all gateways together (sampled every 5 s by each gateway)."
)
SNAPSHOT_BYTES = Histogram(
    "runyard_snapshot_bytes",
    "Size of stored transcript snapshots.",
    buckets=(1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216),
)
ACTIVE_SESSIONS = Gauge("runyard_active_sessions", "Session activations owned by this sessions instance.")
SESSION_ENDS_TOTAL = Counter("runyard_session_ends_total", "Session ends by reason.", ("reason",))
HOOK_ERRORS_TOTAL = Counter("runyard_hook_errors_total", "Hook handler failures.", ("hook", "reason"))
DRAIN_DURATION_SECONDS = Histogram(
    "runyard_drain_duration_seconds",
    "Duration of shutdown drains.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30),
)
DRAIN_TIMED_OUT_HANDLERS_TOTAL = Counter(
    "runyard_drain_timed_out_handlers_total",
    "Hook handlers that did not finish within the drain bound.",
    ("hook",),
)
HOOK_CALLS_TOTAL = Counter(
    "runyard_hook_calls_total", "In-process hook handler calls (successful or not).", ("hook",)
)
COMPACTIONS_TOTAL = Counter(
    "runyard_compactions_total",
    "Transcript compactions by outcome: summarized (worker), rolled_over (committed by sessions), "
    "failed (summary call failed; the run went on uncompacted).",
    ("outcome",),
)
MAINTENANCE_ITEMS_TOTAL = Counter(
    "runyard_maintenance_items_total",
    "Rows removed or changed by session maintenance, by action (sessions_idle, sessions_capped, "
    "snapshots_archived, snapshots_dropped, pending_snapshots_dropped, events_trimmed).",
    ("action",),
)
EVENTS_RELAYED_TOTAL = Counter(
    "runyard_events_relayed_total",
    "Lifecycle events the gateway copied into its outbox, by source.",
    ("source",),
)
WATCH_STREAMS = Gauge("runyard_watch_streams", "Open WatchEvents streams on this gateway.")

#: States of :data:`PROVIDER_STATE` (RouterService ProviderHealth, lower case).
PROVIDER_STATES = ("ok", "cooling", "disabled")
PROVIDER_STATE = Gauge(
    "runyard_provider_state",
    "1 for the current state of each provider / auth profile / model the router knows, 0 for the others "
    "(model is empty when the state covers the whole provider or profile).",
    ("provider", "auth_profile", "model", "state"),
)
#: States of an MCP tool server of the worker (runyard.worker.mcp).
MCP_SERVER_STATES = ("starting", "ready", "failed")
MCP_SERVERS = Gauge(
    "runyard_mcp_servers",
    "1 for the current state of each MCP tool server of the worker's agents, 0 for the others.",
    ("agent", "server", "state"),
)
COOLDOWNS_TOTAL = Counter(
    "runyard_cooldowns_total",
    "Cooldowns started (or extended) by the router, by provider and failover reason.",
    ("provider", "reason"),
)
TASK_SLOTS_IN_USE = Gauge(
    "runyard_task_slots_in_use",
    "Background-task concurrency slots held, per concurrency key (model, provider or default).",
    ("key",),
)
TOOL_CALLS_TOTAL = Counter(
    "runyard_tool_calls_total",
    "Tool calls of the tool loop by tool, source (builtin, mcp, client) and outcome (ok, error). A client "
    "tool's call is counted when its result reaches the worker. Tool names the run did not offer are "
    'counted as "(undeclared)", names beyond the first 200 as "(other)".',
    ("tool", "source", "outcome"),
)
TOOL_CALL_DURATION_SECONDS = Histogram(
    "runyard_tool_call_duration_seconds",
    "Duration of tool calls by tool and source; for a client tool, from the run's requires_action to the "
    "result's arrival at the gateway.",
    ("tool", "source"),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
BUILD_INFO = Gauge(
    "runyard_build_info",
    "Always 1; labels name the runyard version and the service of this process.",
    ("version", "service"),
)

#: Label values created at start-up so that rate() and increase() see the very
#: first event (go-grpc-prometheus does the same for its gRPC metrics).
_SERVICE_LABELS: dict[str, list[tuple[Counter | Histogram | Gauge, tuple[str, ...]]]] = {
    "gateway": [
        *((RUNS_TOTAL, (status,)) for status in ("completed", "failed", "cancelled")),
        *((RUN_DURATION_SECONDS, (status,)) for status in ("completed", "failed", "cancelled")),
    ],
}


#: The ``runyard_*`` families each service sets; its ``/metrics`` shows these,
#: :data:`SHARED_FAMILIES`, and every non-``runyard_`` family (grpc_*, process_*).
SERVICE_FAMILIES: dict[str, tuple[Counter | Gauge | Histogram, ...]] = {
    "gateway": (
        RUNS_TOTAL,
        RUNS_QUEUE_WAIT_SECONDS,
        RUN_DURATION_SECONDS,
        RUN_EVENTS_PERSISTED,
        WORKERS_CONNECTED,
        WORKER_FREE_CAPACITY,
        QUEUE_DEPTH,
        EVENTS_RELAYED_TOTAL,
        WATCH_STREAMS,
        TASK_SLOTS_IN_USE,
    ),
    "router": (
        TIME_TO_FIRST_TOKEN_SECONDS,
        TOKENS_STREAMED,
        FAILOVERS_TOTAL,
        ROUTER_DECISIONS_TOTAL,
        ROUTER_PROBES_TOTAL,
        PROVIDER_STATE,
        COOLDOWNS_TOTAL,
    ),
    "sessions": (
        SNAPSHOT_BYTES,
        ACTIVE_SESSIONS,
        SESSION_ENDS_TOTAL,
        HOOK_ERRORS_TOTAL,
        HOOK_CALLS_TOTAL,
        DRAIN_DURATION_SECONDS,
        DRAIN_TIMED_OUT_HANDLERS_TOTAL,
        COMPACTIONS_TOTAL,
        MAINTENANCE_ITEMS_TOTAL,
    ),
    "worker": (COMPACTIONS_TOTAL, TOOL_CALLS_TOTAL, TOOL_CALL_DURATION_SECONDS, MCP_SERVERS),
}
#: ``runyard_*`` families every service exports.
SHARED_FAMILIES: tuple[Counter | Gauge | Histogram, ...] = (RPCS_IN_FLIGHT, BUILD_INFO)

#: The service of this process (set by :func:`init_service_metrics`); None until then.
_service: str | None = None


def _family_name(metric: Counter | Gauge | Histogram) -> str:
    (family,) = metric.describe()
    return family.name


def _runyard_families() -> set[str]:
    return {
        _family_name(value)
        for value in globals().values()
        if isinstance(value, (Counter, Gauge, Histogram)) and _family_name(value).startswith("runyard_")
    }


class _ServiceView(Collector):
    """The default registry as this process's service exports it: the
    ``runyard_*`` families of other services are left out."""

    def __init__(self, registry: Any = REGISTRY):
        self._registry = registry
        self._all = _runyard_families()
        self._hidden: dict[str | None, frozenset[str]] = {}

    def hidden(self, service: str | None) -> frozenset[str]:
        found = self._hidden.get(service)
        if found is None:
            shown = {_family_name(m) for m in (*SHARED_FAMILIES, *SERVICE_FAMILIES.get(service or "", ()))}
            found = self._hidden[service] = frozenset(self._all - shown)
        return found

    def collect(self) -> Iterator[Any]:
        hidden = self.hidden(_service)
        for family in self._registry.collect():
            if family.name not in hidden:
                yield family


def set_provider_state(provider: str, auth_profile: str, model: str, state: str) -> None:
    """Record ``state`` (one of :data:`PROVIDER_STATES`) for one provider / profile / model."""
    if state not in PROVIDER_STATES:
        raise ValueError(f"unknown provider state {state!r}; expected one of {PROVIDER_STATES}")
    for candidate in PROVIDER_STATES:
        PROVIDER_STATE.labels(provider, auth_profile, model, candidate).set(1 if candidate == state else 0)


def init_service_metrics(service: str, version: str) -> None:
    """Set ``runyard_build_info``, pre-create the label values ``service``
    reports, and make ``/metrics`` show that service's families only."""
    global _service
    _service = service
    BUILD_INFO.labels(version, service).set(1)
    for metric, values in _SERVICE_LABELS.get(service, ()):
        metric.labels(*values)


def init_grpc_server_metrics(service_names: Iterable[str]) -> None:
    """Create the ``grpc_server_*`` series of every method of ``service_names``
    (all codes, value 0), as go-grpc-prometheus' ``InitializeMetrics`` does.

    Services whose descriptors are not in the default pool are skipped.
    """
    pool = descriptor_pool.Default()
    for name in service_names:
        try:
            service = pool.FindServiceByName(name)
        except KeyError:
            continue
        for method in service.methods:
            if method.client_streaming and method.server_streaming:
                kind = "bidi_stream"
            elif method.client_streaming:
                kind = "client_stream"
            elif method.server_streaming:
                kind = "server_stream"
            else:
                kind = "unary"
            labels = (kind, service.full_name, method.name)
            GRPC_SERVER_STARTED.labels(*labels)
            GRPC_SERVER_MSG_RECEIVED.labels(*labels)
            GRPC_SERVER_MSG_SENT.labels(*labels)
            GRPC_SERVER_HANDLING_SECONDS.labels(*labels)
            for code in GO_CODE_NAMES.values():
                GRPC_SERVER_HANDLED.labels(*labels, code)


#: Answers ``/healthz`` and ``/readyz``: ``probe(path) -> (HTTP status, body)``.
HealthProbe = Callable[[str], tuple[int, str]]
_health_probe: HealthProbe | None = None
HEALTH_PATHS = ("/healthz", "/readyz")


def set_health_probe(probe: HealthProbe | None) -> None:
    """Install what answers ``/healthz`` and ``/readyz`` on the metrics port
    (:class:`runyard.common.server.ServiceServer` does; before that both
    answer 503 ``starting``). ``probe`` is called on an HTTP server thread."""
    global _health_probe
    _health_probe = probe


def _app() -> Callable[..., Any]:
    metrics_app = make_wsgi_app(_ServiceView())

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path not in HEALTH_PATHS:
            return metrics_app(environ, start_response)
        probe = _health_probe
        status, body = probe(path) if probe is not None else (503, "starting")
        data = (body + "\n").encode()
        reason = "OK" if status == 200 else "Service Unavailable"
        start_response(
            f"{status} {reason}",
            [
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(data))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [data]

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Probes every few seconds: no access log."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def serve_metrics(port: int, host: str = "0.0.0.0") -> WSGIServer | None:
    """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` in a
    background thread (port 0 = disabled, returns None); returns the server
    (``shutdown()`` stops it).

    ``/metrics``: the Prometheus text format, this service's families only.
    ``/readyz`` and ``/healthz``: see :func:`set_health_probe`.
    """
    if not port:
        return None
    host = host.strip("[]") or "0.0.0.0"
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_ThreadingServer):
        address_family = family

    server = make_server(str(address[0]), port, _app(), Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
