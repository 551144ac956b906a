"""Prefect tasks: thin wrappers of medpipe library calls (retries, timeouts, logging, artifacts).

No image logic lives here; every task calls one library function and returns a small JSON-safe
record. Heavy arrays stay in Zarr on disk.
"""
