"""Entry point of the sessions service (``runyard serve sessions``).

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
"""

from __future__ import annotations

import logging
import os

from runyard._proto.v1 import sessions_pb2, sessions_pb2_grpc
from runyard.common.auth import run_token_verifier
from runyard.common.config import Config
from runyard.common.hooks import HookRunner, load_handlers
from runyard.common.metrics import serve_metrics
from runyard.common.runtime import instance_id, open_database
from runyard.common.server import ServiceServer
from runyard.sessions.lifecycle import Lifecycle
from runyard.sessions.maintenance import Maintenance
from runyard.sessions.service import SessionServicer
from runyard.sessions.store import SessionStore

__all__ = ["serve"]

log = logging.getLogger(__name__)

SERVICE_NAME = sessions_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name


async def serve(config: Config) -> None:
    """Run the sessions service until SIGTERM/SIGINT/SIGUSR1, then drain.

    Raises:
        ConfigError: a hook handler does not import or is misconfigured.
    """
    cfg = config.sessions
    handlers = load_handlers(config)
    signer = run_token_verifier(config)  # the public key only: this service never signs
    pool = await open_database(config, "sessions")
    store = SessionStore(
        pool,
        instance_id=instance_id("sessions"),
        max_snapshot_bytes=cfg.max_snapshot_bytes,
        archive_on_reset=cfg.archive_on_reset,
        # Well inside the idle timeout (a tenth of it, at most a minute), so a
        # session in use never looks idle; pruning works in days.
        touch_interval_s=min(60.0, cfg.idle_timeout_s / 10) if cfg.idle_timeout_s > 0 else 60.0,
    )
    hooks = HookRunner(handlers, queue_size=config.hooks.queue_size)
    hooks.start()
    store.listeners.append(hooks.dispatch)
    if handlers:
        log.info("hook handlers: %s", ", ".join(f"{h.name} ({', '.join(sorted(h.events))})" for h in handlers))
    maintenance = Maintenance(store, config.maintenance)
    lifecycle = Lifecycle(store, cfg, hooks, maintenance)
    server = ServiceServer(
        "sessions", cfg.listen, [SERVICE_NAME], shutdown_grace_s=cfg.shutdown_grace_s
    )
    sessions_pb2_grpc.add_SessionServiceServicer_to_server(
        SessionServicer(store, signer, config.auth.internal_secret, lifecycle=lifecycle, maintenance=maintenance),
        server.server,
    )
    await lifecycle.start()
    serve_metrics(cfg.metrics_port, cfg.listen.rsplit(":", 1)[0] or "0.0.0.0")
    server.install_signal_handlers()
    await server.start()
    log.info("sessions instance %s ready (on stop: %s)", store.instance_id, lifecycle.mode)
    await server.stop_requested.wait()

    log.info("sessions shutting down")
    failed = False
    try:
        await server.begin_shutdown()
        await lifecycle.stop_background()
        await server.stop()
        await lifecycle.drain(restart_signal=server.restart_expected)
    except BaseException:
        # Activations not ended here are ended by the next instance's crash
        # recovery once this one's lease lapses.
        failed = True
        log.exception("sessions drain failed")
        raise
    finally:
        await hooks.close()
        await pool.close()
        if hooks.stuck:
            # A handler ignored cancellation; asyncio.run() would wait for it
            # forever. Its events were durable before it was called.
            log.warning("%d hook call(s) ignored cancellation; exiting without waiting for them", hooks.stuck)
            logging.shutdown()
            os._exit(1 if failed else 0)
