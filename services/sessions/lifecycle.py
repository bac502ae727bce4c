"""Activation lifecycle of one sessions instance: lease, sweeps, drain.

* **Lease**: the instance registers in ``sessions.instances`` before it
  serves and renews its lease every third of ``sessions.instance_lease_s``.
* **Sweeps** (every ``sessions.sweep_interval_s``, and once at start):
  crash recovery ends with CRASH_RECOVERED the activations of instances whose
  lease lapsed (``kill -9``, lost host); idle expiry ends with IDLE this
  instance's activations whose session saw no run for
  ``sessions.idle_timeout_s``; the scheduled maintenance pass runs when due.
* **Drain** (:meth:`Lifecycle.drain`, on SIGTERM/SIGINT after the gRPC server
  stopped taking calls): every activation this instance owns ends with
  SHUTDOWN, or RESTART when a restart is expected, written durably with
  set-based SQL first; then the in-process hook handlers get one total bound,
  ``sessions.drain_timeout_ms``, and every handler still busy after it is
  reported (log and ``runyard_drain_timed_out_handlers_total``).

A restart is expected when the operator said so: SIGUSR1, ``runyard serve
sessions --restart-expected`` (or ``runyard up --restart-expected``),
``sessions.shutdown_mode = "restart"``, or the ``SetShutdownMode`` RPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import asyncpg

from runyard.common import metrics
from runyard.common.config import SessionsConfig
from runyard.common.hooks import HookRunner
from runyard.sessions.flags import RESTART_ENV, RestartExpectedAction
from runyard.sessions.maintenance import Maintenance
from runyard.sessions.store import SessionStore

__all__ = ["RESTART_ENV", "DrainReport", "Lifecycle", "RestartExpectedAction"]

log = logging.getLogger(__name__)

_DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(slots=True)
class DrainReport:
    """What a drain did: activations ended (``reason``), how long the durable
    write and the hooks took (seconds), and the handlers that timed out."""

    reason: str
    ended: int = 0
    durable_s: float = 0.0
    hooks_s: float = 0.0
    timed_out: list[str] = field(default_factory=list)


class Lifecycle:
    """Lease, sweeps and drain of one sessions instance.

    Args:
        store: the instance's store (its ``instance_id`` owns activations).
        config: the ``sessions`` section.
        hooks: in-process handlers (awaited, bounded, during the drain).
        maintenance: the scheduled pass (None = not scheduled).
    """

    def __init__(
        self,
        store: SessionStore,
        config: SessionsConfig,
        hooks: HookRunner,
        maintenance: Maintenance | None = None,
    ):
        self.store = store
        self.config = config
        self.hooks = hooks
        self.maintenance = maintenance
        #: "shutdown" or "restart": how activations end when this instance stops.
        self.mode = config.shutdown_mode
        self._tasks: list[asyncio.Task[None]] = []
        self._maintenance_task: asyncio.Task[None] | None = None

    def expect_restart(self, expected: bool = True) -> None:
        """Say how this instance's activations end when it stops."""
        self.mode = "restart" if expected else "shutdown"
        log.info("on stop, active sessions will end with %s", self.mode.upper())

    async def start(self) -> None:
        """Register the lease, recover crashed instances' activations, start the sweeps."""
        await self.store.register_instance(self.config.instance_lease_s)
        await self._recover()
        await self.store.count_owned()
        self._tasks = [
            asyncio.create_task(self._heartbeat(), name="sessions-lease"),
            asyncio.create_task(self._sweep(), name="sessions-sweep"),
        ]

    async def _heartbeat(self) -> None:
        interval = self.config.instance_lease_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                if not await self.store.renew_lease(self.config.instance_lease_s):
                    log.warning(
                        "this instance's lease had lapsed (sessions.instance_lease_s = %.1f s); "
                        "activations it owned may have been ended as CRASH_RECOVERED by another instance",
                        self.config.instance_lease_s,
                    )
            except _DB_ERRORS as exc:
                log.warning("renewing the instance lease failed: %s", exc)
            except Exception:
                log.exception("renewing the instance lease failed")

    async def _recover(self) -> None:
        recovered = await self.store.recover_crashed()
        if recovered:
            log.info(
                "crash recovery: ended %d activation(s) of lapsed instances (CRASH_RECOVERED)", recovered
            )

    async def sweep_once(self) -> None:
        """One round of crash recovery, idle expiry and (if due) maintenance."""
        await self._recover()
        if self.config.idle_timeout_s > 0:
            idle = await self.store.expire_idle(self.config.idle_timeout_s)
            if idle:
                log.info("idle expiry: ended %d activation(s) (IDLE)", idle)
        await self.store.count_owned()
        maintenance = self.maintenance
        if (
            maintenance is not None
            and maintenance.config.enabled
            and (self._maintenance_task is None or self._maintenance_task.done())
            and await maintenance.claim_schedule()
        ):
            self._maintenance_task = asyncio.create_task(
                self._maintain(maintenance), name="sessions-maintenance"
            )

    async def _maintain(self, maintenance: Maintenance) -> None:
        try:
            async for _ in maintenance.run():
                pass
            await self.store.forget_instances()
        except _DB_ERRORS as exc:
            log.warning("scheduled maintenance failed: %s", exc)
        except Exception:
            log.exception("scheduled maintenance failed")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            try:
                await self.sweep_once()
            except _DB_ERRORS as exc:
                log.warning("session sweep failed: %s", exc)
            except Exception:
                # A bug must not stop crash recovery and idle expiry for good.
                log.exception("session sweep failed")

    async def stop_background(self) -> None:
        """Stop the lease renewal, sweeps and a running maintenance pass."""
        tasks = [*self._tasks, *([self._maintenance_task] if self._maintenance_task else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            # Never raises: whatever a task died of must not stop the drain.
            await asyncio.wait(tasks)
        self._tasks = []
        self._maintenance_task = None

    async def drain(self, restart_signal: bool = False) -> DrainReport:
        """End every activation this instance owns, durably, then give the
        hook handlers at most ``drain_timeout_ms`` in total.

        Args:
            restart_signal: SIGUSR1 was received (a restart is expected).

        Returns:
            The :class:`DrainReport` (also logged).
        """
        mode = "restart" if restart_signal else self.mode
        report = DrainReport("RESTART" if mode == "restart" else "SHUTDOWN")
        started = time.monotonic()
        report.ended = await self.store.end_owned(report.reason)
        await self.store.stop_instance(mode)
        report.durable_s = time.monotonic() - started
        log.info(
            "drain: %d activation(s) ended with %s, recorded durably in %.0f ms",
            report.ended,
            report.reason,
            report.durable_s * 1000,
        )
        hooks_started = time.monotonic()
        late = await self.hooks.drain(self.config.drain_timeout_ms / 1000)
        report.hooks_s = time.monotonic() - hooks_started
        report.timed_out = [handler.name for handler in late]
        metrics.DRAIN_DURATION_SECONDS.observe(time.monotonic() - started)
        if report.timed_out:
            log.warning(
                "drain: hook handler(s) timed out after %d ms: %s",
                self.config.drain_timeout_ms,
                ", ".join(report.timed_out),
            )
        else:
            log.info("drain: hook handlers finished in %.0f ms", report.hooks_s * 1000)
        return report
