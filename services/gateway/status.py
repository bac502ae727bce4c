"""The gateway's part of ``AdminService.GetStatus`` (``runyard status``):
queue depth and the workers connected to this gateway."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from runyard._proto.v1 import admin_pb2
from runyard.common import metrics

if TYPE_CHECKING:
    from runyard.gateway.hub import Dispatcher
    from runyard.gateway.runs import RunStore

__all__ = ["GatewayStatus"]

log = logging.getLogger(__name__)


class GatewayStatus:
    """The gateway's part: queue depth (also sampled into ``runyard_queue_depth``)
    and the workers connected to this gateway.

    Args:
        store: the gateway's run store (``queue_depth()``).
        dispatcher: the dispatcher (``workers``: worker id -> connection with
            ``capacity``, ``runs``, ``free`` and ``draining``).
        sample_interval_s: how often ``runyard_queue_depth`` is refreshed.
    """

    def __init__(self, store: RunStore, dispatcher: Dispatcher, *, sample_interval_s: float = 5.0):
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
            running = len(worker.runs)
            response.gateway.workers.add(
                worker_id=worker.worker_id,
                capacity=worker.capacity,
                running=running,
                # Slots not executing a run: running + free = capacity. (Not
                # WorkerConn.free, which also takes out the slots held for a
                # claim in flight, a moment's state: the dispatcher's polling
                # claim, every poll interval, would show as busy slots.)
                free=0 if worker.draining else max(worker.capacity - running, 0),
                draining=worker.draining,
            )
