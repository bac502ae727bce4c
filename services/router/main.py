"""Entry point of the router service (``runyard serve router``)."""

from __future__ import annotations

import asyncio
import logging

from runyard._proto.v1 import router_pb2, router_pb2_grpc
from runyard.common.auth import run_token_verifier
from runyard.common.config import Config
from runyard.common.metrics import serve_metrics
from runyard.common.outbox import Outbox, OutboxTrimmer
from runyard.common.runtime import database_url, instance_id, open_database
from runyard.common.server import ServiceServer
from runyard.router.cooldowns import CooldownStore
from runyard.router.engine import Router
from runyard.router.service import RouterServicer

__all__ = ["EVENTS_CHANNEL", "serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
#: NOTIFY channel announcing newly sequenced router outbox events.
EVENTS_CHANNEL = "runyard_router_events"


async def serve(config: Config) -> None:
    """Run the router until SIGTERM/SIGINT, then shut down gracefully.

    Opens the database (``router`` schema: shared cooldowns and the event
    outbox), loads the cooldown state, serves ``RouterService``, and on
    shutdown writes pending cooldowns and events before closing.
    """
    cfg = config.router
    signer = run_token_verifier(config)  # the public key only: this service never signs
    pool = await open_database(config, "router")
    outbox = Outbox("router", EVENTS_CHANNEL)
    store = CooldownStore(cfg, pool, database_url=database_url(config), outbox=outbox)
    router = Router(config, store, instance_id=instance_id("router"))
    await router.start()
    # model.failover events are relayed by the gateway within seconds; older
    # ones go after maintenance.event_retention_s like every other outbox.
    trimmer = OutboxTrimmer(outbox, pool, retention_s=config.maintenance.event_retention_s)
    background = asyncio.create_task(trimmer.run(), name="outbox-trim")
    server = ServiceServer("router", cfg.listen, [SERVICE_NAME], shutdown_grace_s=cfg.shutdown_grace_s)
    router_pb2_grpc.add_RouterServiceServicer_to_server(
        RouterServicer(router, signer, config.auth.internal_secret, outbox), server.server
    )
    serve_metrics(cfg.metrics_port, cfg.listen.rsplit(":", 1)[0] or "0.0.0.0")
    server.install_signal_handlers()
    await server.start()
    await server.stop_requested.wait()
    log.info("router shutting down")
    await server.begin_shutdown()
    await server.stop()
    await router.aclose()
    await trimmer.stop(background)
    await pool.close()
