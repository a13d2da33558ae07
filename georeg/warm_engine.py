"""Flow runs that start in a fraction of a second on a process work pool: a warm engine forks them.

A process worker starts every flow run as a new Python process, and importing Prefect and georeg
costs that process 2 to 3 s before the flow's first request. `georeg warm-engine` is a long-running
process on the worker's machine that has made those imports once; the job command in
`prefect.yaml`, `python -m georeg.warm_engine`, hands the flow run to it through a Unix socket and
the warm engine forks a child that runs `prefect.engine` for it. To the worker and to Prefect nothing
changes: the job command is the flow run's process, its output and exit code are the run's, and a
signal sent to it reaches the run.

The job command falls back to `python -m prefect.engine` itself when `GEOREG_WARM_ENGINE` is unset
or no warm engine answers there, so a worker without one works as before.

The protocol, one connection per flow run: the job command sends one JSON line (its environment,
working directory and arguments) with its stdin, stdout and stderr attached (SCM_RIGHTS); the warm
engine answers `{"pid": N}` once the child runs, then `{"exit": CODE}` when it has ended. A job
command that goes away before that (the worker killed it) has its child sent SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import runpy
import selectors
import signal
import socket
import stat
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from georeg.engine_settings import SettingsCache

SOCKET_ENV = "GEOREG_WARM_ENGINE"
# What a flow-run process imports: the engine, the event flows (prefect.yaml names them as modules; the
# engine loads the other flows from their files), the state database they record outcomes in (SQLAlchemy
# and its drivers: 1.3 s of a run's CPU otherwise), and what Prefect imports at a run's first task.
PRELOAD = (
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.utilities.visualization",
    "georeg.flows.replicate",
    "georeg.flows.delete",
    "georeg.state",
    "sqlalchemy.dialects.sqlite.aiosqlite",
    "sqlalchemy.dialects.postgresql.asyncpg",
)
_REAP_INTERVAL_S = 0.05
_MAX_REQUEST_BYTES = 1 << 20
_REQUEST_TIMEOUT_S = 5.0
_TERMINATE_WAIT_S = 10.0  # after the grace period, how long a run told to stop may take before SIGKILL

logger = logging.getLogger("georeg.warm_engine")


# --- the job command ------------------------------------------------------------------------------


def launch(arguments: list[str]) -> int:
    """Run the flow run in the warm engine if one answers, else become `python -m prefect.engine`."""
    path = os.environ.get(SOCKET_ENV)
    forwarded = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    # Held from before the hand-over until they can be forwarded: none may end this process alone.
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    connection = _connect(path) if path else None
    started = _hand_over(connection, arguments) if connection else None
    if connection is None or started is None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)  # an exec keeps the mask
        os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *arguments])
    child = started

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in forwarded:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
    reply = _read_line(connection)
    if reply is None:  # the warm engine went away: the run's outcome is unknown here
        forward(signal.SIGTERM, None)
        print(f"georeg: the warm engine at {path} stopped during the flow run", file=sys.stderr)
        return 1
    return int(reply.get("exit", 1))


def _connect(path: str) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    return connection


def _hand_over(connection: socket.socket, arguments: list[str]) -> int | None:
    """Send the run; the child's pid once it runs, None if the warm engine could not start it."""
    request = {"env": dict(os.environ), "cwd": os.getcwd(), "args": arguments}
    try:
        socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
        reply = _read_line(connection)
    except OSError:
        reply = None
    if reply is None or "pid" not in reply:
        connection.close()
        return None
    return int(reply["pid"])


def _read_line(connection: socket.socket) -> dict[str, Any] | None:
    line = b""
    while not line.endswith(b"\n"):
        try:
            chunk = connection.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            return None
        line += chunk
    return json.loads(line)


# --- the warm engine ------------------------------------------------------------------------------


def serve(path: Path, grace_seconds: float = 30.0) -> None:
    """Accept flow runs on the Unix socket at `path` until SIGTERM or SIGINT; each runs in a forked child.

    On the signal it stops accepting at once (the socket goes, and a job command that finds none runs
    the engine itself), gives the runs in flight up to `grace_seconds` to end, then ends the rest with
    SIGTERM (SIGKILL after _TERMINATE_WAIT_S), reporting every exit to its job command. A second signal
    cuts the wait short. No process of its own is left behind.

    This process never starts a thread or an event loop, so that a fork copies nothing half-done."""
    for module in PRELOAD:
        __import__(module)
    from prefect.logging.configuration import setup_logging

    from georeg.registry.tls import default_tls_context

    default_tls_context()  # loading the CA bundle costs each run 0.1 s otherwise

    setup_logging()  # as for this process's environment: a run whose logging settings are the same keeps it
    own_logging = _logging_settings(os.environ)
    settings = SettingsCache()
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.stat().st_mode):
            path.unlink()  # left by a warm engine that was killed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o077)  # only this user may hand runs over
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_mask)
    listener.listen(64)
    stop_signals: list[int] = []

    def note_stop(signum: int, _frame: Any) -> None:
        stop_signals.append(signum)  # acted on by the loop below, between two selects

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, note_stop)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    deadline: float | None = None
    logger.info("warm engine ready at %s (pid %d)", path, os.getpid())
    try:
        while True:
            if stop_signals and deadline is None:
                selector.unregister(listener)
                listener.close()
                _remove_socket(path)
                deadline = time.monotonic() + grace_seconds
                logger.info(
                    "%s: stopping; %d flow run(s) in flight get up to %g s",
                    signal.Signals(stop_signals[0]).name,
                    len(children),
                    grace_seconds,
                )
            if deadline is not None and (not children or time.monotonic() >= deadline or len(stop_signals) > 1):
                break
            for key, _ in selector.select(timeout=_REAP_INTERVAL_S):
                if key.fileobj is listener:
                    _accept(listener, selector, children, settings, own_logging)
                else:  # a job command closed its end before its run ended: it was told to stop
                    _stop_child_of(key.fileobj, selector)  # type: ignore[arg-type]
            _reap(selector, children)
    finally:
        _end_children(selector, children)
        listener.close()
        if deadline is None:
            _remove_socket(path)
    logger.info("warm engine stopped")


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _end_children(selector: selectors.BaseSelector, children: dict[int, socket.socket]) -> None:
    """SIGTERM to the runs still going (their engines record them as crashed), SIGKILL to those that
    outlive _TERMINATE_WAIT_S; each exit is reported to its job command, as ever."""
    if children:
        logger.warning("ending %d flow run(s) not finished within the grace period", len(children))
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _TERMINATE_WAIT_S
    while children and time.monotonic() < deadline:
        selector.select(timeout=_REAP_INTERVAL_S)  # a pause that a child's exit does not need to wait out
        _reap(selector, children)
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while children:
        before = len(children)
        _reap(selector, children)
        if len(children) == before:
            time.sleep(_REAP_INTERVAL_S)  # SIGKILL is not instant, and _reap never blocks


def _accept(
    listener: socket.socket,
    selector: selectors.BaseSelector,
    children: dict[int, socket.socket],
    settings: SettingsCache,
    own_logging: dict[str, str],
) -> None:
    connection, _ = listener.accept()
    connection.settimeout(_REQUEST_TIMEOUT_S)  # a peer that sends nothing must not hold up every other run
    try:
        request, descriptors = _receive(connection)
        connection.settimeout(None)
    except (OSError, ValueError) as error:
        logger.warning("refused a flow run: %s", error)
        connection.close()
        return
    try:
        pid = os.fork()
    except OSError as error:  # the job command, told nothing, runs the engine itself
        logger.warning("could not fork a flow run: %s", error)
        for descriptor in descriptors:
            os.close(descriptor)
        connection.close()
        return
    if pid == 0:
        # The child keeps no socket of the warm engine's, so that the engine's end closing is seen at once.
        for own in (listener, connection, *children.values()):
            own.close()
        _run_engine(request, descriptors, settings, own_logging)
    for descriptor in descriptors:
        os.close(descriptor)
    logger.info("flow run %s started as pid %d", request["env"].get("PREFECT__FLOW_RUN_ID", "(no id)"), pid)
    try:
        connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError:  # the job command is gone already; so should its run be
        os.kill(pid, signal.SIGTERM)
    children[pid] = connection
    selector.register(connection, selectors.EVENT_READ, pid)
    settings.learn(request["env"], request["cwd"])  # while the child runs: the next run like it starts sooner


def _receive(connection: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, descriptors, _flags, _address = socket.recv_fds(connection, 65536, 3)
    while not data.endswith(b"\n"):
        if len(data) > _MAX_REQUEST_BYTES:
            raise ValueError("the request is too large")
        chunk = connection.recv(65536)
        if not chunk:
            raise ValueError("the job command closed the connection mid-request")
        data += chunk
    if len(descriptors) != 3:
        for descriptor in descriptors:
            os.close(descriptor)
        raise ValueError(f"expected stdin, stdout and stderr, got {len(descriptors)} descriptors")
    request = json.loads(data)
    if not isinstance(request, dict) or not {"env", "cwd", "args"} <= request.keys():
        raise ValueError("the request lacks env, cwd or args")
    return request, list(descriptors)


def _run_engine(
    request: dict[str, Any], descriptors: list[int], settings: SettingsCache, own_logging: dict[str, str]
) -> NoReturn:
    """In the child: become the flow run's process, as `python -m prefect.engine` would be."""
    code = 1
    try:
        for target, descriptor in zip((0, 1, 2), descriptors, strict=True):
            os.dup2(descriptor, target)
            os.close(descriptor)
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        import prefect.context
        from prefect.logging.configuration import setup_logging

        known = settings.get(request["env"], request["cwd"])
        if known is None:
            prefect.context.refresh_global_settings_context()  # the run's settings, not the warm engine's
        else:
            prefect.context.GLOBAL_SETTINGS_CONTEXT = known  # what that refresh would have built
        if _logging_settings(os.environ) != own_logging:  # 0.1 s, saved when prefect.yaml's match ours
            setup_logging(incremental=False)
        sys.argv = ["prefect.engine", *request["args"]]
        # One synchronous API client for the run: the engine otherwise makes three, each loading the CA
        # bundle (0.05 s) and opening its own connection, before the flow starts.
        with prefect.context.SyncClientContext.get_or_create():
            runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        # What a normal interpreter exit would do: Prefect sends its last logs and events at exit.
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _logging_settings(environment: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in environment.items() if key.startswith("PREFECT_LOGGING_")}


def _stop_child_of(connection: socket.socket, selector: selectors.BaseSelector) -> None:
    pid = selector.get_key(connection).data
    selector.unregister(connection)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def _reap(selector: selectors.BaseSelector, children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        connection = children.pop(pid, None)
        if connection is None:
            continue
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(connection)
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
        with contextlib.suppress(OSError):
            connection.sendall(json.dumps({"exit": code}).encode() + b"\n")
        connection.close()


if __name__ == "__main__":
    sys.exit(launch(sys.argv[1:]))
