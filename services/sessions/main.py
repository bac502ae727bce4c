"""The sessions service's composition root (``runyard serve sessions``).

Start: hook configuration is loaded and validated first (a bad handler stops
the service with a ``ConfigError`` naming its config path, before anything
else starts); then migrations, the instance lease, crash recovery of lapsed
instances, the sweeps, and the gRPC server.

Stop (SIGTERM/SIGINT, or SIGUSR1 for an expected restart): health
NOT_SERVING and new calls refused; in-flight calls finish (bounded by
``sessions.shutdown_grace_s``); the drain ends every activation this instance
owns, durably, then gives hook handlers ``sessions.drain_timeout_ms`` in
total (see :mod:`runyard.sessions.lifecycle`); then the process exits, even
if a handler never returns.

The order of start and stop around these steps is the service lifecycle's
(:func:`runyard.common.lifecycle.run_service`).
"""

from __future__ import annotations

import logging
import os

from runyard._proto.v1 import sessions_pb2, sessions_pb2_grpc
from runyard.common.auth import run_token_verifier
from runyard.common.config import Config
from runyard.common.hooks import HookRunner, load_handlers
from runyard.common.lifecycle import Service, run_service
from runyard.common.runtime import instance_id
from runyard.common.tls import TlsSettings
from runyard.sessions.lifecycle import Lifecycle
from runyard.sessions.maintenance import Maintenance
from runyard.sessions.service import SessionServicer
from runyard.sessions.store import SessionStore

__all__ = ["build", "serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = sessions_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name


async def serve(config: Config, *, tls: TlsSettings | None) -> None:
    """Run the sessions service until SIGTERM/SIGINT/SIGUSR1, then drain.

    Args:
        config: the checked configuration.
        tls: TLS of the listener; None = plaintext.

    Raises:
        ConfigError: a hook handler does not import or is misconfigured.
    """
    await run_service("sessions", config, build, tls=tls)


async def build(service: Service) -> None:
    """Build, start and register the sessions service's parts (see the module docstring).

    Raises:
        ConfigError: a hook handler does not import or is misconfigured.
        ValueError: no run-token public key.
    """
    config = service.config
    cfg = config.sessions
    handlers = load_handlers(config)
    signer = run_token_verifier(config)  # the public key only: this service never signs
    hooks = HookRunner(handlers, queue_size=config.hooks.queue_size)

    def exit_if_stuck(error: BaseException | None) -> None:
        # Last of all: a handler that ignored cancellation would keep
        # asyncio.run() waiting forever. Its events were durable before it was called.
        if hooks.stuck:
            log.warning("%d hook call(s) ignored cancellation; exiting without waiting for them", hooks.stuck)
            logging.shutdown()
            os._exit(1 if error is not None else 0)

    service.on_exit(exit_if_stuck)
    pool = await service.open_database("sessions")
    store = SessionStore(
        pool,
        instance_id=instance_id("sessions"),
        max_snapshot_bytes=cfg.max_snapshot_bytes,
        archive_on_reset=cfg.archive_on_reset,
        # Well inside the idle timeout (a tenth of it, at most a minute), so a
        # session in use never looks idle; pruning works in days.
        touch_interval_s=min(60.0, cfg.idle_timeout_s / 10) if cfg.idle_timeout_s > 0 else 60.0,
    )
    hooks.start()
    service.on_close(hooks.close)
    store.listeners.append(hooks.dispatch)
    if handlers:
        listed = ", ".join(f"{h.name} ({', '.join(sorted(h.events))})" for h in handlers)
        log.info("hook handlers: %s", listed)
    maintenance = Maintenance(store, config.maintenance)
    lifecycle = Lifecycle(store, cfg, hooks, maintenance)
    server = service.serve([SERVICE_NAME])
    servicer = SessionServicer(
        store, signer, config.auth.internal_secret, lifecycle=lifecycle, maintenance=maintenance
    )
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(servicer, server.server)
    await lifecycle.start()
    service.on_close(lifecycle.stop_background)  # the drain stopped it already, unless start-up failed

    async def ready() -> None:
        log.info("sessions instance %s ready (on stop: %s)", store.instance_id, lifecycle.mode)

    async def drain() -> None:
        try:
            await lifecycle.stop_background()
            await server.stop()  # in-flight calls get sessions.shutdown_grace_s
            await lifecycle.drain(restart_signal=server.restart_expected)
        except BaseException:
            # Activations not ended here are ended by the next instance's crash
            # recovery once this one's lease lapses.
            log.exception("sessions drain failed")
            raise

    service.on_serving(ready)
    service.on_drain(drain)
