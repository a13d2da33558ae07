"""Prefect flows: the procedures georeg runs, as deployments or from the CLI."""

from georeg.flows.backfill import backfill
from georeg.flows.delete import delete_image
from georeg.flows.replicate import replicate_image
from georeg.flows.verify import verify

__all__ = ["backfill", "delete_image", "replicate_image", "verify"]
