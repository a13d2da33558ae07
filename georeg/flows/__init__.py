"""Prefect flows: the procedures georeg runs, as deployments or from the CLI.

Each flow is imported on first use, so a flow-run process of the `replicate-image` deployment
loads `replicate` and what it needs, not the backfill, verification and artifact code.
`georeg.flows.backfill` and `georeg.flows.verify` name the flows, as they always did, even though
modules of the same names exist: the package's attribute lookup answers with the flow.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from georeg.flows.backfill import backfill
    from georeg.flows.delete import delete_image
    from georeg.flows.replicate import replicate_image
    from georeg.flows.verify import verify

_FLOW_MODULES = {
    "backfill": "georeg.flows.backfill",
    "delete_image": "georeg.flows.delete",
    "replicate_image": "georeg.flows.replicate",
    "verify": "georeg.flows.verify",
}

__all__ = ["backfill", "delete_image", "replicate_image", "verify"]


class _FlowsPackage(types.ModuleType):
    def __getattribute__(self, name: str) -> Any:
        module = _FLOW_MODULES.get(name)
        if module is None:
            return super().__getattribute__(name)
        return getattr(importlib.import_module(module), name)


sys.modules[__name__].__class__ = _FlowsPackage
