"""The worker: executes runs assigned by the gateway."""
