"""The gateway's composition root (``runyard serve gateway``).

:func:`build` makes the gateway's parts, each with its collaborators passed
to its constructor, and registers them with the service lifecycle
(:func:`runyard.common.lifecycle.run_service`), which starts them in this
order and closes them in reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from runyard._proto.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    router_pb2_grpc,
    sessions_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
    worker_hub_pb2,
    worker_hub_pb2_grpc,
)
from runyard.common.auth import RunTokenSigner
from runyard.common.config import Config
from runyard.common.db import Listener
from runyard.common.lifecycle import Service, run_service
from runyard.common.runtime import database_url, instance_id
from runyard.common.tls import TlsSettings
from runyard.gateway.auth import Authenticator
from runyard.gateway.events import Broker, RunLog
from runyard.gateway.hub import Dispatcher, Hub
from runyard.gateway.keys import KEYS_CHANNEL, ApiKeyStore
from runyard.gateway.runs import CANCEL_CHANNEL, EVENTS_CHANNEL, QUEUE_CHANNEL, RunStore
from runyard.gateway.service import GatewayServicer
from runyard.gateway.status import GatewayStatus
from runyard.gateway.tasks import TaskManager, TaskServicer
from runyard.gateway.tool_results import ToolResults
from runyard.gateway.watch import LifecycleStream

__all__ = ["build", "serve"]

log = logging.getLogger(__name__)

#: Served (and reflected) on the public listener, gateway.listen.
SERVICE_NAMES = [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name]
#: Served on the internal listener, gateway.internal_listen (plus AdminService).
INTERNAL_SERVICE_NAMES = [
    worker_hub_pb2.DESCRIPTOR.services_by_name["WorkerHubService"].full_name,
    tasks_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
]


async def serve(config: Config, *, tls: TlsSettings | None) -> None:
    """Run the gateway until SIGTERM/SIGINT, then shut down gracefully.

    Shutdown: health NOT_SERVING and new calls refused; the dispatcher stops
    claiming; client streams end with UNAVAILABLE (DRAINING) naming the
    ``after_seq`` to resume from with JoinRun; workers are told to re-attach
    elsewhere; in-flight unary calls get ``shutdown_grace_s`` to finish.

    Args:
        config: the checked configuration.
        tls: TLS of both listeners and of the internal channels; None = plaintext.
    """
    await run_service("gateway", config, build, tls=tls)


async def build(service: Service) -> None:
    """Build, start and register the gateway's parts (see :func:`serve`).

    Raises:
        ValueError: ``auth.run_token_private_key`` is missing or not an Ed25519 key.
    """
    config = service.config
    cfg = config.gateway
    gateway_id = instance_id("gateway")
    signer = RunTokenSigner(config.auth.run_token_private_key, config.auth.run_token_ttl_s)
    pool = await service.open_database("gateway")
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
    sessions = sessions_pb2_grpc.SessionServiceStub(
        service.channel(config.endpoints.sessions, max_message_bytes=cfg.max_message_bytes)
    )
    # The router's GetProviderStatus, for background tasks' retries.
    router = router_pb2_grpc.RouterServiceStub(service.channel(config.endpoints.router))
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
    # Background tasks (runyard.gateway.tasks): the API, the notification hook, the loop.
    tasks = TaskManager(config, pool, store, dispatcher, sessions, gateway_id=gateway_id, router=router)
    # The one cycle: the tasks wake and cancel through the dispatcher, which
    # hands each claimed run to the tasks' notification hook first.
    dispatcher.prepare = tasks.prepare
    # Client-side tools (runyard.gateway.tool_results): runs waiting for the caller's results.
    tool_results = ToolResults(
        store,
        runlog,
        dispatcher.wake,
        timeout_s=cfg.tool_results_timeout_s,
        max_result_bytes=cfg.max_tool_result_bytes,
        sweep_interval_s=min(cfg.poll_interval_ms / 1000, 1.0),
    )
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
        tools=tool_results,
        max_message_bytes=cfg.max_message_bytes,
    )

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

    # One LISTEN connection for the whole gateway (see Listener: every
    # listening backend costs the server on each NOTIFY in the database).
    listener = Listener(
        database_url(config),
        [QUEUE_CHANNEL, EVENTS_CHANNEL, CANCEL_CHANNEL, KEYS_CHANNEL],
        on_notify,
        on_reconnect=on_reconnect,
    )
    # Lifecycle events: relay of other services' outboxes + WatchEvents (runyard.gateway.watch).
    lifecycle_events = LifecycleStream(config, pool, service.channels, listener)
    service.on_close(lifecycle_events.close)
    await listener.start()
    service.on_close(listener.close)
    runlog.start()
    service.on_close(runlog.close)
    await lifecycle_events.start()
    gateway = GatewayServicer(
        config,
        store,
        broker,
        dispatcher,
        sessions,
        authenticator,
        runlog,
        tasks=tasks,
        tool_results=tool_results,
        watch=lifecycle_events.watcher,
    )
    server = service.serve(
        SERVICE_NAMES,
        max_message_bytes=cfg.max_message_bytes,
        public=True,
        internal_listen=cfg.internal_listen,
        internal_service_names=INTERNAL_SERVICE_NAMES,
    )
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, server.server)
    # Internal listener only: workers, task tools and AdminService, with the internal secret.
    worker_hub_pb2_grpc.add_WorkerHubServiceServicer_to_server(hub, server.internal_server)
    task_servicer = TaskServicer(tasks, store, signer, internal_secret=config.auth.internal_secret)
    tasks_pb2_grpc.add_TaskServiceServicer_to_server(task_servicer, server.internal_server)
    server.admin.add_source(GatewayStatus(store, dispatcher))  # `runyard status`: queue depth, workers
    dispatch_task = service.task(dispatcher.run(), name="dispatcher")
    service.task(tool_results.run(), name="tool-results-expiry", stop=ToolResults.stop)
    await tasks.start()
    service.on_close(tasks.close)

    async def ready() -> None:
        anonymous = "on" if config.auth.anonymous else "off"
        log.info("gateway %s ready (anonymous access: %s)", gateway_id, anonymous)

    async def drain() -> None:
        dispatcher.stopping = True
        dispatcher.wake()
        with contextlib.suppress(asyncio.CancelledError):
            await dispatch_task
        gateway.close_streams()
        await hub.drain()
        await server.inflight.wait_idle(cfg.shutdown_grace_s)
        await server.stop(1.0)
        await hub.close()

    service.on_serving(ready)
    service.on_drain(drain)
