"""Prefect flows: the procedures georeg runs, as deployments or from the CLI, one module each.

Nothing is imported here, so a flow-run process of `replicate-image` loads `georeg.flows.replicate`
and what it needs, not the backfill, verification and artifact code: import each flow from its module.
"""
