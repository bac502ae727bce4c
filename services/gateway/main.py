"""Entry point of the gateway (``runyard serve gateway``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from runyard._proto.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    sessions_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    worker_hub_pb2,
    worker_hub_pb2_grpc,
)
from runyard.common.auth import RunTokenSigner
from runyard.common.clients import internal_channel
from runyard.common.config import Config
from runyard.common.db import Listener
from runyard.common.metrics import serve_metrics
from runyard.common.runtime import database_url, instance_id, open_database
from runyard.common.server import ServiceServer
from runyard.gateway.auth import Authenticator
from runyard.gateway.events import Broker, RunLog
from runyard.gateway.hub import Dispatcher, Hub
from runyard.gateway.keys import KEYS_CHANNEL, ApiKeyStore
from runyard.gateway.runs import CANCEL_CHANNEL, EVENTS_CHANNEL, QUEUE_CHANNEL, RunStore
from runyard.gateway.service import GatewayServicer
from runyard.gateway.status import GatewayStatus
from runyard.gateway.tasks import TaskManager, TaskServicer, router_stub
from runyard.gateway.tool_results import ToolResults
from runyard.gateway.watch import LifecycleStream

__all__ = ["serve"]

log = logging.getLogger(__name__)

#: Served (and reflected) on the public listener, gateway.listen.
SERVICE_NAMES = [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name]
#: Served on the internal listener, gateway.internal_listen (plus AdminService).
INTERNAL_SERVICE_NAMES = [
    worker_hub_pb2.DESCRIPTOR.services_by_name["WorkerHubService"].full_name,
    tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
]


async def serve(config: Config) -> None:
    """Run the gateway until SIGTERM/SIGINT, then shut down gracefully.

    Shutdown: health NOT_SERVING and new calls refused; the dispatcher stops
    claiming; client streams end with UNAVAILABLE (DRAINING) naming the
    ``after_seq`` to resume from with JoinRun; workers are told to re-attach
    elsewhere; in-flight unary calls get ``shutdown_grace_s`` to finish.
    """
    cfg = config.gateway
    gateway_id = instance_id("gateway")
    signer = RunTokenSigner(config.auth.run_token_private_key, config.auth.run_token_ttl_s)
    pool = await open_database(config, "gateway")
    store = RunStore(
        pool,
        gateway_id=gateway_id,
        lease_s=cfg.run_lease_ms / 1000,
        max_attempts=cfg.max_attempts,
        max_queued_per_session=cfg.max_queued_runs_per_session,
    )
    broker = Broker()
    runlog = RunLog(store, broker, flush_interval_s=cfg.event_flush_interval_ms / 1000)
    dispatcher = Dispatcher(store, signer, runlog, poll_interval_s=cfg.poll_interval_ms / 1000)
    sessions_channel = internal_channel(config.endpoints.sessions, max_message_bytes=cfg.max_message_bytes)
    sessions = sessions_pb2_grpc.SessionServiceStub(sessions_channel)
    hub = Hub(
        store,
        runlog,
        dispatcher,
        sessions,
        internal_secret=config.auth.internal_secret,
        handshake_timeout_s=cfg.handshake_timeout_ms / 1000,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        lease_ms=cfg.run_lease_ms,
        gateway_id=gateway_id,
    )
    authenticator = Authenticator(
        ApiKeyStore(pool),
        anonymous=config.auth.anonymous,
        default_org=config.auth.default_org,
        rate_limit_rps=cfg.rate_limit_rps,
        rate_limit_burst=cfg.rate_limit_burst,
        max_streams_per_key=cfg.max_streams_per_key,
        auth_failure_rate_per_s=cfg.auth_failure_rate_per_s,
        auth_failure_burst=cfg.auth_failure_burst,
    )
    gateway = GatewayServicer(
        config,
        store,
        broker,
        dispatcher,
        sessions,
        authenticator,
        runlog,
    )
    # Background tasks (runyard.gateway.tasks): the API, the notification hook, the loop.
    router_channel, router = router_stub(config)
    tasks = TaskManager(config, pool, store, dispatcher, sessions, gateway_id=gateway_id, router=router)
    gateway.tasks = tasks
    dispatcher.prepare = tasks.prepare
    # Client-side tools (runyard.gateway.tool_results): runs waiting for the caller's results.
    tool_results = ToolResults(
        store, runlog, dispatcher.wake, timeout_s=cfg.tool_results_timeout_s,
        max_result_bytes=cfg.max_tool_result_bytes, sweep_interval_s=min(cfg.poll_interval_ms / 1000, 1.0),
    )
    hub.tools = gateway.tool_results = tool_results

    def on_notify(channel: str, payload: str) -> None:
        if channel == QUEUE_CHANNEL:
            dispatcher.on_notify(channel, payload)
            tasks.wake()
        elif channel == EVENTS_CHANNEL:
            broker.notify(channel, payload)
        elif channel == CANCEL_CHANNEL:
            dispatcher.on_cancel_notify(channel, payload)
        elif channel == KEYS_CHANNEL:
            authenticator.on_notify(channel, payload)

    def on_reconnect() -> None:
        dispatcher.wake()
        tasks.wake()
        broker.poke_all()
        authenticator.forget()

    listener = Listener(
        database_url(config),
        [QUEUE_CHANNEL, EVENTS_CHANNEL, CANCEL_CHANNEL, KEYS_CHANNEL],
        on_notify,
        on_reconnect=on_reconnect,
    )
    await listener.start()
    runlog.start()
    # Lifecycle events: relay of other services' outboxes + WatchEvents (runyard.gateway.watch).
    lifecycle_events = LifecycleStream(config, pool)
    await lifecycle_events.start()
    gateway.watch = lifecycle_events.watcher
    server = ServiceServer(
        "gateway",
        cfg.listen,
        SERVICE_NAMES,
        shutdown_grace_s=cfg.shutdown_grace_s,
        max_message_bytes=cfg.max_message_bytes,
        public=True,
        internal_listen=cfg.internal_listen,
        internal_service_names=INTERNAL_SERVICE_NAMES,
    )
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, server.server)
    # Internal listener only: workers, task tools and AdminService, with the internal secret.
    worker_hub_pb2_grpc.add_WorkerHubServiceServicer_to_server(hub, server.internal_server)
    tasks_pb2_grpc.add_TaskServiceServicer_to_server(
        TaskServicer(tasks, store, signer, internal_secret=config.auth.internal_secret), server.internal_server
    )
    server.admin.add_source(GatewayStatus(store, dispatcher))  # `runyard status`: queue depth, workers
    dispatch_task = asyncio.create_task(dispatcher.run(), name="dispatcher")
    tool_results_task = asyncio.create_task(tool_results.run(), name="tool-results-expiry")
    await tasks.start()
    serve_metrics(cfg.metrics_port, cfg.listen.rsplit(":", 1)[0] or "0.0.0.0")
    server.install_signal_handlers()
    await server.start()
    log.info("gateway %s ready (anonymous access: %s)", gateway_id, "on" if config.auth.anonymous else "off")
    await server.stop_requested.wait()

    log.info("gateway shutting down")
    await server.begin_shutdown()
    dispatcher.stopping = True
    dispatcher.wake()
    with contextlib.suppress(asyncio.CancelledError):
        await dispatch_task
    gateway.close_streams()
    await hub.drain()
    await server.inflight.wait_idle(cfg.shutdown_grace_s)
    await server.stop(1.0)
    await hub.close()
    await ToolResults.stop(tool_results_task)
    await tasks.close()
    await router_channel.close()
    await runlog.close()
    await lifecycle_events.close()
    await listener.close()
    await sessions_channel.close()
    await pool.close()
