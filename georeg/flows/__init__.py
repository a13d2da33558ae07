"""Prefect flows: the procedures georeg runs, as deployments or from the CLI."""

from georeg.flows.delete import delete_image
from georeg.flows.replicate import replicate_image

__all__ = ["delete_image", "replicate_image"]
