"""The gateway: public API, runs queue, dispatch to workers, run events."""
