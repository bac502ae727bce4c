"""``runyard.v1.AdminService``: what one service process reports about itself.

Every :class:`~runyard.common.server.ServiceServer` serves it (``runyard
status`` calls it on each service). The answer always holds the service, the
runyard version, the start time, whether the process drains and how many RPCs
and streams it is handling; a service adds its own part through a
*status source* (:meth:`AdminServicer.add_source`), e.g. the gateway's
:class:`runyard.gateway.status.GatewayStatus` (queue depth and connected workers).

Calls must carry the internal secret (``x-runyard-internal``) when the server
has one (``ServiceServer.internal_secret``). AdminService is
served on internal listeners only (the gateway's on ``gateway.internal_listen``,
never its public port): what it tells (worker ids, queue depth) is for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Protocol

from runyard._proto.v1 import admin_pb2, admin_pb2_grpc
from runyard._version import __version__
from runyard.common.auth import check_internal
from runyard.common.grpctypes import ServicerContext

if TYPE_CHECKING:
    from runyard.common.server import ServiceServer

__all__ = ["SERVICE_NAME", "AdminServicer", "StatusSource"]

log = logging.getLogger(__name__)

SERVICE_NAME = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name


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
        self, request: admin_pb2.GetStatusRequest, context: ServicerContext
    ) -> admin_pb2.GetStatusResponse:
        """This process's status (see admin.proto)."""
        check_internal(context, self._server.internal_secret)
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
