"""Prefect tasks: one retryable unit of work each, thin wrappers over georeg's plain async functions.

Nothing is imported here, so a replicate or delete flow run does not load the backfill's tasks.
"""
