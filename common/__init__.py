"""Shared foundations: config, run store, manifests. Imports neither `worker` nor `orchestrator`."""
