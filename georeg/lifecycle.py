"""Stopping a long-running georeg process cleanly on SIGTERM or SIGINT, leaving no process behind.

Why signals are taken by a thread of their own in `georeg serve`: Prefect's flow engine replaces the
SIGTERM handler while a flow runs in the main thread (its handler raises TerminationSignal wherever the
main thread happens to be), so with inline runs in flight a SIGTERM would tear the event loop down
instead of shutting down. With SIGTERM and SIGINT blocked in every thread and taken by `sigwait` in one,
no handler of anyone's ever runs, and the shutdown goes as georeg means it to.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

T = TypeVar("T")


def block_stop_signals() -> None:
    """Block SIGTERM and SIGINT in this thread and in every thread started after it (they inherit it).
    Call it before any thread starts, or a signal may still be delivered to an older thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def watch_stop_signals(on_signal: Callable[[int, bool], None]) -> threading.Thread:
    """Take the stop signals in a daemon thread: `on_signal(signum, first)` for each, `first` for the first."""

    def watch() -> None:
        first = True
        while True:
            signum = signal.sigwait(STOP_SIGNALS)
            on_signal(signum, first)
            first = False

    thread = threading.Thread(target=watch, name="georeg-stop-signals", daemon=True)
    thread.start()
    return thread


def run_unblocked(function: Callable[[], T]) -> T:
    """Run `function` in a new thread with the stop signals unblocked, and return its result.

    A process started from a thread inherits that thread's signal mask: Prefect's temporary server,
    started from a thread that blocks SIGTERM, would ignore the SIGTERM that is meant to stop it."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        try:
            result.append(function())
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    thread = threading.Thread(target=run, name="georeg-unblocked")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def stop_prefect(timeout: float = 10.0) -> None:
    """Send Prefect's last logs and events, then stop its temporary server: in that order, or the sending
    retries against a server that is gone and holds up the exit."""
    services = sys.modules.get("prefect._internal.concurrency.services")
    if services is not None:
        services.QueueService.drain_all(timeout=timeout)
    stop_temporary_prefect_server()


def stop_temporary_prefect_server() -> None:
    """Stop the server Prefect started in a subprocess because PREFECT_API_URL is unset (if it did).

    Prefect stops it from an atexit hook, which never runs when the process ends by a signal: the
    server was left running, an orphan, after `georeg serve` got a SIGTERM."""
    server_module = sys.modules.get("prefect.server.api.server")
    if server_module is None:  # never imported: no temporary server was started
        return
    for server in list(server_module.SubprocessASGIServer._instances.values()):
        server.stop()
