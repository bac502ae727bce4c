"""The sessions service: conversation state, snapshots, lifecycle events."""
