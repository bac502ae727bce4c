"""Background tasks (DESIGN.md section 7): see :mod:`runyard.gateway.tasks.manager`.

The public names are importable from here; the modules are
``model`` (vocabulary, pure rules), ``store`` (SQL), ``sessions`` (calls to
the sessions service), ``manager`` (state transitions and the API),
``notifications``, ``sweeper`` (the loop) and ``servicer`` (TaskService).
"""

from runyard.gateway.tasks.manager import TaskManager, Transitions
from runyard.gateway.tasks.model import (
    ACTIVE,
    TERMINAL,
    SpawnRequest,
    TaskStatus,
    concurrency_key,
    normalise_notice,
    slot_limit,
)
from runyard.gateway.tasks.notifications import notification_message
from runyard.gateway.tasks.servicer import TaskServicer

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "SpawnRequest",
    "TaskManager",
    "TaskServicer",
    "TaskStatus",
    "Transitions",
    "concurrency_key",
    "normalise_notice",
    "notification_message",
    "slot_limit",
]
