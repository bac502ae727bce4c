"""The router: model choice, fallback chains, error classification."""
