"""What a flow-run process imports: a deployment's flow run starts a new Python process, and every
module it imports is paid for on every run."""

from __future__ import annotations

import subprocess
import sys

from tests.support.services import REPOSITORY_ROOT

NOT_FOR_REPLICATE = {
    "georeg.flows.backfill",
    "georeg.flows.verify",
    "georeg.tasks.repositories",
    "georeg.batches",
    "georeg.repository_sync",
    "georeg.state",  # opened after the copy, when the outcome is recorded
    "sqlalchemy",
    "prefect.artifacts",
    "boto3",
    "google.cloud.storage",
    "azure.storage.blob",
    "swiftclient",
    "oss2",
}


def imported_by(statement: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"import sys; {statement}; print(' '.join(sys.modules))"],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return set(done.stdout.split())


def test_loading_the_replicate_entrypoint_imports_only_what_replicate_needs():
    modules = imported_by("import georeg.flows.replicate")
    assert "georeg.flows.replicate" in modules
    assert modules & NOT_FOR_REPLICATE == set()


def test_the_flows_package_imports_no_flow():
    modules = imported_by("import georeg.flows, georeg.tasks")
    assert {name for name in modules if name.startswith(("georeg.flows.", "georeg.tasks."))} == set()
