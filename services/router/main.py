"""The router's composition root (``runyard serve router``)."""

from __future__ import annotations

import logging

from runyard._proto.v1 import router_pb2, router_pb2_grpc
from runyard.common.auth import run_token_verifier
from runyard.common.config import Config
from runyard.common.lifecycle import Service, run_service
from runyard.common.outbox import Outbox, OutboxTrimmer
from runyard.common.runtime import database_url, instance_id
from runyard.common.tls import TlsSettings
from runyard.router.cooldowns import CooldownStore
from runyard.router.engine import Router
from runyard.router.service import RouterServicer

__all__ = ["EVENTS_CHANNEL", "build", "serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
#: NOTIFY channel announcing newly sequenced router outbox events.
EVENTS_CHANNEL = "runyard_router_events"


async def serve(config: Config, *, tls: TlsSettings | None) -> None:
    """Run the router until SIGTERM/SIGINT, then shut down gracefully.

    Opens the database (``router`` schema: shared cooldowns and the event
    outbox), loads the cooldown state, serves ``RouterService``, and on
    shutdown lets in-flight calls finish (``router.shutdown_grace_s``), then
    writes pending cooldowns and events before closing.

    Args:
        config: the checked configuration.
        tls: TLS of the listener; None = plaintext.
    """
    await run_service("router", config, build, tls=tls)


async def build(service: Service) -> None:
    """Build, start and register the router's parts (see :func:`serve`).

    Raises:
        ValueError: no run-token public key.
    """
    config = service.config
    signer = run_token_verifier(config)  # the public key only: this service never signs
    pool = await service.open_database("router")
    outbox = Outbox("router", EVENTS_CHANNEL)
    store = CooldownStore(config.router, pool, database_url=database_url(config), outbox=outbox)
    router = Router(config, store, instance_id=instance_id("router"))
    await router.start()
    service.on_close(router.aclose)
    # model.failover events are relayed by the gateway within seconds; older
    # ones go after maintenance.event_retention_s like every other outbox.
    trimmer = OutboxTrimmer(outbox, pool, retention_s=config.maintenance.event_retention_s)
    service.task(trimmer.run(), name="outbox-trim", stop=trimmer.stop)
    server = service.serve([SERVICE_NAME])
    router_pb2_grpc.add_RouterServiceServicer_to_server(
        RouterServicer(router, signer, config.auth.internal_secret, outbox), server.server
    )

    async def drain() -> None:
        await server.stop()  # in-flight calls get router.shutdown_grace_s

    service.on_drain(drain)
