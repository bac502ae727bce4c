"""Background tasks (DESIGN.md section 7); see :mod:`runyard.gateway.tasks.manager`."""

from runyard.gateway.tasks.manager import (
    ACTIVE,
    TERMINAL,
    SpawnRequest,
    TaskManager,
    TaskServicer,
    concurrency_key,
    normalise_notice,
    notification_message,
    router_stub,
    slot_limit,
)

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "SpawnRequest",
    "TaskManager",
    "TaskServicer",
    "concurrency_key",
    "normalise_notice",
    "notification_message",
    "router_stub",
    "slot_limit",
]
