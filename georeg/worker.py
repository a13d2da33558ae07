"""`georeg worker`: Prefect's process worker, with the API client `georeg serve` uses.

Before a process worker starts a flow run, it writes its labels onto the run. On a Prefect server on
SQLite (its default database) that write meets others in a burst of pushes and the server answers
503; Prefect's client then waits 2 s, 4 s, 8 s before it tries again. In a burst, runs waited up to
15 s that way for their process to start while the server was free again within a fraction of a
second (benchmarks/burst.py). This is the same worker, Prefect's `ProcessWorker`, with every request
it sends going through `georeg.prefect_client.BusyServerRetries`: a 503 is sent again within 50 ms.
"""

from __future__ import annotations

import os

from georeg.prefect_client import SharedPrefectClient


async def run_worker(pool: str, *, name: str | None = None, limit: int | None = None) -> None:
    """Take flow runs of the process work pool `pool` until stopped, as `prefect worker start --pool`
    does: Prefect's settings for workers (polling, prefetch, heartbeat) apply unchanged."""
    from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS, PREFECT_WORKER_PREFETCH_SECONDS
    from prefect.utilities.processutils import setup_signal_handlers_worker
    from prefect.workers.process import ProcessWorker

    # Prefect's own handling: the first SIGTERM or SIGINT stops taking runs and lets those in flight end.
    setup_signal_handlers_worker(os.getpid(), "the georeg worker", print)
    prefect = SharedPrefectClient()
    try:
        # The worker asks Prefect's `get_client()` for its client, which answers with the installed one.
        async with prefect.installed():
            worker = ProcessWorker(
                work_pool_name=pool,
                name=name,
                limit=limit,
                prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
                heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
            )
            await worker.start(printer=print)
    finally:
        await prefect.close()
