"""``runyard.v1.AdminService``: what one service process reports about itself.

Every :class:`~runyard.common.server.ServiceServer` serves it (``runyard
status`` calls it on each service). The answer always holds the service, the
runyard version, the start time, whether the process drains and how many RPCs
and streams it is handling; a service adds its own part through a
*status source* (:meth:`AdminServicer.add_source`), e.g. the gateway's
:class:`GatewayStatus` (queue depth and connected workers).

Calls must carry the internal secret (``x-runyard-internal``) when the process
has one: ``runyard serve`` passes it with :func:`configure`. AdminService is
served on internal listeners only (the gateway's on ``gateway.internal_listen``,
never its public port): what it tells (worker ids, queue depth) is for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from runyard import __version__
from runyard._proto.v1 import admin_pb2, admin_pb2_grpc
from runyard.common import metrics
from runyard.common.auth import check_internal
from runyard.common.config import Config

if TYPE_CHECKING:
    from runyard.common.server import ServiceServer

__all__ = ["SERVICE_NAME", "AdminServicer", "GatewayStatus", "StatusSource", "configure"]

log = logging.getLogger(__name__)

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name

#: The internal secret AdminService calls must carry ("" = no check), set by :func:`configure`.
_internal_secret = ""


def configure(config: Config) -> None:
    """Take this process's internal secret from ``config`` (``runyard serve`` calls this once)."""
    global _internal_secret
    _internal_secret = config.auth.internal_secret


class StatusSource(Protocol):
    """A service's own part of the status answer."""

    async def fill(self, response: admin_pb2.GetStatusResponse) -> None:
        """Add this service's fields to ``response``."""

    async def run(self) -> None:
        """Background work while the server runs (sampling gauges); may return at once."""


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """``AdminService`` of one :class:`ServiceServer`."""

    def __init__(self, server: ServiceServer):
        self._server = server
        self._started_at = time.time()
        self._sources: list[StatusSource] = []
        self._tasks: list[asyncio.Task[None]] = []

    def add_source(self, source: StatusSource) -> None:
        """Let ``source`` fill its part of every answer (and run its background work)."""
        self._sources.append(source)

    def start(self) -> None:
        """Start the sources' background work (the server is about to serve)."""
        self._started_at = time.time()
        for source in self._sources:
            self._tasks.append(asyncio.create_task(self._run(source), name=f"status-{type(source).__name__}"))

    async def stop(self) -> None:
        """Stop the sources' background work."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    @staticmethod
    async def _run(source: StatusSource) -> None:
        try:
            await source.run()
        except asyncio.CancelledError:
            raise
        except Exception:  # status is best effort; serving goes on
            log.exception("status source %s stopped", type(source).__name__)

    async def GetStatus(
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        """This process's status (see admin.proto)."""
        check_internal(context, _internal_secret)
        server = self._server
        response = admin_pb2.GetStatusResponse(
            service=server.name,
            version=__version__,
            draining=server.interceptor.draining,
            # This call is in flight too; it is not counted.
            rpcs_in_flight=max(server.inflight.count - 1, 0),
            streams_in_flight=server.inflight.streams,
        )
        response.started_at.FromNanoseconds(int(self._started_at * 1e9))
        for source in self._sources:
            await source.fill(response)
        return response


class GatewayStatus:
    """The gateway's part: queue depth (also sampled into ``runyard_queue_depth``)
    and the workers connected to this gateway.

    Args:
        store: the gateway's run store (``queue_depth()``).
        dispatcher: the dispatcher (``workers``: worker id -> connection with
            ``capacity``, ``runs``, ``free`` and ``draining``).
        sample_interval_s: how often ``runyard_queue_depth`` is refreshed.
    """

    def __init__(self, store: Any, dispatcher: Any, *, sample_interval_s: float = 5.0):
        self.store = store
        self.dispatcher = dispatcher
        self.sample_interval_s = sample_interval_s

    async def _queue_depth(self) -> int:
        depth = int(await self.store.queue_depth())
        metrics.QUEUE_DEPTH.set(depth)
        return depth

    async def run(self) -> None:
        """Refresh ``runyard_queue_depth`` every ``sample_interval_s`` seconds."""
        while True:
            try:
                await self._queue_depth()
            except Exception as exc:  # noqa: BLE001 - the database may be briefly away
                log.warning("sampling the queue depth failed: %s", exc)
            await asyncio.sleep(self.sample_interval_s)

    async def fill(self, response: admin_pb2.GetStatusResponse) -> None:
        """Queue depth (read now) and one entry per connected worker."""
        response.gateway.SetInParent()
        response.gateway.queue_depth = await self._queue_depth()
        for worker in sorted(self.dispatcher.workers.values(), key=lambda w: w.worker_id):
            response.gateway.workers.add(
                worker_id=worker.worker_id,
                capacity=worker.capacity,
                running=len(worker.runs),
                free=worker.free,
                draining=worker.draining,
            )
