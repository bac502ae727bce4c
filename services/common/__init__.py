"""Shared plumbing of the four services: config, gRPC server bootstrap,
errors, metrics, database, auth."""
