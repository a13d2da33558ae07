"""The `georeg` command. Exit 0 on success; on failure one line on stderr and a non-zero status
(1 when the work failed, 2 when the command or the config is wrong)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from georeg.config import CONFIG_ENV, GeoregConfig, JwtAuth, config_path, load_config
from georeg.errors import ConfigError, GeoregError, InvalidReference
from georeg.references import ImageReference

EXIT_FAILED = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    # Flows load the config themselves (as they do on a worker): point them at the one named here.
    os.environ[CONFIG_ENV] = str(config_path(arguments.config).resolve())
    # georeg's own loggers (retries, resumed uploads) belong in the flow run's logs too.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "georeg")
    # Without PREFECT_API_URL Prefect starts a temporary server, creating its database the first time;
    # its 20 s default fails on a small, busy machine, for no fault of the command.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        return arguments.command(arguments)
    except (ConfigError, InvalidReference) as error:
        print(f"georeg: {error}", file=sys.stderr)
        return EXIT_USAGE
    except GeoregError as error:
        print(f"georeg: {arguments.command_name} failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("georeg: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="georeg", description="Keep secondary container registries in sync with a primary."
    )
    config_help = f"config file (default: ${CONFIG_ENV}, else ./georeg.yaml)"
    parser.add_argument("--config", help=config_help)
    # The global options once more for every command, so that `georeg replicate --config F REF` works too.
    # SUPPRESS: a command that is not given one leaves the value given before the command in place.
    global_options = argparse.ArgumentParser(add_help=False)
    global_options.add_argument("--config", default=argparse.SUPPRESS, help=config_help)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[global_options])
        sub.set_defaults(command=handler, command_name=name)
        return sub

    replicate = command("replicate", _replicate, "copy one image from the primary to the secondaries")
    replicate.add_argument("image", metavar="REPO[:TAG|@DIGEST]")
    replicate.add_argument("--secondary", metavar="NAME", help="only this secondary (default: all)")

    delete = command("delete", _delete, "remove from the secondaries a tag or digest the primary deleted")
    delete.add_argument("image", metavar="REPO:TAG|REPO@DIGEST")
    delete.add_argument("--secondary", metavar="NAME", help="only this secondary (default: all)")

    token = command("token", _token, "print a JWT for a repository, to debug a registry's token setup")
    token.add_argument("repository", metavar="REPO")
    token.add_argument("--actions", default="pull", help="comma-separated actions (default: pull)")
    token.add_argument(
        "--registry", default="primary", metavar="NAME", help="'primary' or a secondary's name (whose jwt auth to use)"
    )
    backfill = command("backfill", _backfill, "bring the secondaries level with the primary, repository by repository")
    backfill.add_argument("--secondary", metavar="NAME", help="only this secondary (default: all)")
    backfill.add_argument("--dry-run", action="store_true", help="only report what would be copied and removed")

    verify = command("verify", _verify, "check that the secondaries hold what the primary holds")
    verify.add_argument("--secondary", metavar="NAME", help="only this secondary (default: all)")
    verify.add_argument("--deep", action="store_true", help="also check every blob the secondary's manifests name")

    status = command("status", _status, "the sync status of each secondary, from georeg's state database")
    status.add_argument("--json", action="store_true", help="print the status as a JSON document")

    command("limits", _limits, "create or update the per-registry limits in Prefect (at deploy time)")
    automations = command("automations", _automations, "create or replace georeg's automations in Prefect")
    automations.add_argument("action", choices=["apply"])

    serve = command("serve", _serve, "receive the primary's notifications and start replication within seconds")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")

    worker = command(
        "worker",
        _worker,
        "take flow runs of a process work pool, as `prefect worker start` does, with quick retries on a busy server",
    )
    worker.add_argument("--pool", default="georeg", help="the process work pool (default: georeg)")
    worker.add_argument("--name", help="the worker's name (default: one Prefect makes up)")
    worker.add_argument("--limit", type=int, help="flow runs at once (default: no limit)")

    warm = command(
        "warm-engine",
        _warm_engine,
        "start flow runs of a process work pool from warm imports (set GEOREG_WARM_ENGINE for the worker)",
    )
    warm.add_argument("--socket", required=True, metavar="PATH", help="Unix socket to listen on")
    warm.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long runs in flight may take to end "
        "(default: the config's dispatch.shutdown_grace_seconds if there is a config, else 30)",
    )

    keygen = command("keygen", _keygen, "create the key pair all registries trust (GitLab's gitlab-registry.key)")
    keygen.add_argument("key_file", metavar="KEY_FILE", help="private key to write (PEM, mode 0600)")
    keygen.add_argument("cert_file", metavar="CERT_FILE", help="certificate to write: the registries' rootcertbundle")
    keygen.add_argument("--type", choices=["rsa", "ec"], default="rsa", dest="key_type")
    _add_db_commands(commands)
    return parser


def _worker(arguments: argparse.Namespace) -> int:
    from georeg.worker import run_worker

    if arguments.limit is not None and arguments.limit < 1:
        raise ConfigError(f"--limit: must be 1 or more, not {arguments.limit}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(arguments.pool, name=arguments.name, limit=arguments.limit))
    return 0


def _warm_engine(arguments: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from georeg.warm_engine import serve

    # Its own lines only: the flow runs it forks configure Prefect's logging for themselves.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    own = logging.getLogger("georeg.warm_engine")
    own.addHandler(handler)
    own.setLevel(logging.INFO)
    own.propagate = False
    grace = arguments.shutdown_grace_seconds
    if grace is None:
        # A warm engine needs no config of its own, but beside a worker it usually has georeg's.
        grace = load_config().dispatch.shutdown_grace_seconds if config_path(arguments.config).is_file() else 30.0
    if grace < 0:
        raise ConfigError(f"--shutdown-grace-seconds: must be 0 or more, not {grace:g}")
    with contextlib.suppress(KeyboardInterrupt):  # a Ctrl-C before the warm engine has taken SIGINT over
        serve(Path(arguments.socket), grace)
    return 0


def _backfill(arguments: argparse.Namespace) -> int:
    load_config()
    from georeg.flows.backfill import backfill

    with _progress_bar():
        results = asyncio.run(backfill(arguments.secondary, arguments.dry_run))
    for result in results:
        if "skipped" in result:
            print(f"{result['secondary']}: skipped, {result['skipped']}")
            continue
        verb = "would replicate" if result["dry_run"] else "replicated"
        print(
            f"{result['secondary']}: {result['repositories']} repositories, {verb} {result['tags_replicated']} tags, "
            f"confirmed {result['tags_confirmed']}, removed {result['tags_removed']}, {result['tags_unchanged']} "
            f"unchanged, {result['deferred']} deferred; "
            f"{_size(result['bytes_copied'])} sent, {_size(result['bytes_skipped'])} not needed ({result['mode']} mode)"
        )
    return 0


def _verify(arguments: argparse.Namespace) -> int:
    load_config()
    from georeg.flows.verify import verify

    with _progress_bar():
        results = asyncio.run(verify(arguments.secondary, arguments.deep))
    for result in results:
        print(
            f"{result['secondary']}: {result['verified']} of {result['repositories']} repositories verified"
            + (f", {result['blobs_checked']} blobs checked" if arguments.deep else "")
        )
    return 0


def _status(arguments: argparse.Namespace) -> int:
    import json
    import shutil

    from georeg.state import StateStore
    from georeg.status import collect_status, format_status

    config = load_config()

    async def collect() -> dict[str, Any]:
        store = StateStore(config.state.url)
        try:
            await store.ensure_schema(migrate=config.state.migrate_on_start)
            return await collect_status(config, store)
        finally:
            await store.close()

    document = asyncio.run(collect())
    if arguments.json:
        print(json.dumps(document, indent=2))
    else:
        width = max(40, min(shutil.get_terminal_size(fallback=(80, 24)).columns, 120))
        print(format_status(document, width))
    return 0


@contextlib.contextmanager
def _progress_bar() -> Iterator[None]:
    """A progress bar on stderr fed by the flow's progress reports (see georeg.progress)."""
    from rich.progress import Progress

    from georeg.progress import listening

    with Progress(transient=False, console=None) as bar:
        tasks: dict[str, Any] = {}

        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        with listening(update):
            yield


def _limits(arguments: argparse.Namespace) -> int:
    from georeg.limits import apply_limits

    applied = asyncio.run(apply_limits(load_config()))
    for name, value in applied:
        print(f"{name}: {value:g}")
    if not applied:
        print("no limits configured (max_concurrent_copies / requests_per_second per registry)")
    return 0


def _automations(arguments: argparse.Namespace) -> int:
    from georeg.automations import apply_automations

    for name in asyncio.run(apply_automations(load_config())):
        print(f"applied: {name}")
    return 0


def _serve(arguments: argparse.Namespace) -> int:
    from georeg.lifecycle import block_stop_signals, stop_prefect, watch_stop_signals

    # First, before any thread exists: SIGTERM and SIGINT are then taken by one thread (georeg.lifecycle).
    block_stop_signals()
    import uvicorn

    from georeg.receiver import create_app
    from georeg.state import StateStore

    config = load_config()
    app = create_app(config, StateStore(config.state.url))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=arguments.host,
            port=arguments.port,
            log_level="info",
            access_log=False,
            timeout_graceful_shutdown=_REQUEST_GRACE_SECONDS,
        )
    )
    grace = config.dispatch.shutdown_grace_seconds

    def stop(signum: int, first: bool) -> None:
        # uvicorn stops accepting, answers the requests in flight, then runs the app's shutdown, where the
        # flow runs in flight get dispatch.shutdown_grace_seconds; then Prefect's temporary server is stopped.
        name = signal.Signals(signum).name
        if first:
            print(f"georeg: {name}: stopping; flow runs in flight get up to {grace:g} s", file=sys.stderr, flush=True)
            server.should_exit = True
        else:
            print(f"georeg: {name}: already stopping (within {grace:g} s)", file=sys.stderr, flush=True)

    watch_stop_signals(stop)
    print(
        f"georeg: receiving on http://{arguments.host}:{arguments.port}/api/v4/container_registry_event/events "
        f"(dispatch: {config.dispatch.mode})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run()
    finally:
        stop_prefect()  # no process left behind: Prefect's temporary server, if it started one
    if not server.started:  # it could not listen, or the app's start-up failed (uvicorn logged why)
        return EXIT_FAILED
    print("georeg: stopped", file=sys.stderr, flush=True)
    return 0


# A webhook request is small and answered at once; this bounds a slow client's hold on a stopping receiver.
_REQUEST_GRACE_SECONDS = 5


def _keygen(arguments: argparse.Namespace) -> int:
    from pathlib import Path

    from georeg.registry.tokens import generate_key_pair

    key_file, cert_file = Path(arguments.key_file), Path(arguments.cert_file)
    if key_file.exists():
        raise ConfigError(f"{key_file} exists already; georeg never overwrites a key")
    key_id = generate_key_pair(key_file, cert_file, key_type=arguments.key_type)
    print(f"wrote {key_file} and {cert_file} (key ID {key_id})")
    return 0


def _replicate(arguments: argparse.Namespace) -> int:
    reference = ImageReference.parse(arguments.image)
    load_config()  # fail on a bad config before paying for Prefect's start-up
    from georeg.flows.replicate import replicate_image

    results = _run(replicate_image, reference, arguments.secondary)
    for result in results:
        print(
            f"{result['secondary']} ({result['mode']}): {result['image']} = {result['digest']} "
            f"({result['blobs_copied']} blobs copied, {result['blobs_mounted']} mounted, "
            f"{result['blobs_present']} already present; {_size(result['bytes_copied'])} sent "
            f"in {result['seconds']:.2f} s{_rate(result['bytes_copied'], result['seconds'])})"
        )
    return 0


def _delete(arguments: argparse.Namespace) -> int:
    reference = ImageReference.parse(arguments.image, default_tag=None)
    load_config()
    from georeg.flows.delete import delete_image

    for result in _run(delete_image, reference, arguments.secondary):
        restored = f", tags put back: {', '.join(result['restored_tags'])}" if result["restored_tags"] else ""
        print(f"{result['secondary']}: {result['image']} {result['outcome']}{restored}")
    return 0


def _token(arguments: argparse.Namespace) -> int:
    from georeg.registry.auth import Scope
    from georeg.registry.tokens import TokenMinter

    config = load_config()
    auth = _registry_auth(config, arguments.registry)
    actions = tuple(action.strip() for action in arguments.actions.split(",") if action.strip())
    minter = TokenMinter(
        auth.key_file, issuer=auth.issuer, service=auth.service, subject=auth.subject, ttl_seconds=auth.ttl_seconds
    )
    scope = Scope("repository", ImageReference.parse(arguments.repository).repository, actions)
    print(minter.mint([scope.claim()]).token)
    return 0


def _registry_auth(config: GeoregConfig, name: str) -> JwtAuth:
    registry = config.primary if name == "primary" else config.select_secondaries(name)[0]
    if not isinstance(registry.auth, JwtAuth):
        raise ConfigError(f"{name}: auth.type is {registry.auth.type!r}; `georeg token` needs auth.type: jwt")
    return registry.auth


def _run(flow: Callable[..., Any], reference: ImageReference, secondary: str | None) -> list[dict[str, Any]]:
    return asyncio.run(flow(reference.repository, reference.reference, secondary))


def _rate(count: int, seconds: float) -> str:
    return f", {count / seconds / 1_000_000:.0f} MB/s" if count >= 1_000_000 and seconds > 0 else ""


def _size(count: int) -> str:
    for unit in ("bytes", "kB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.2f} GB"


def _add_db_commands(commands: Any) -> None:
    """`georeg db upgrade|current`: the state database's schema, for an operator who migrates by hand."""
    db = commands.add_parser("db", help="the state database's schema (migrations)", description=_db.__doc__)
    actions = db.add_subparsers(required=True, metavar="ACTION")
    for name, help_text in (
        ("upgrade", "upgrade the state database to this georeg's schema (back it up first)"),
        ("current", "show the state database's schema revision and this georeg's"),
    ):
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.set_defaults(command=_db, command_name=f"db {name}", db_action=name)


def _db(arguments: argparse.Namespace) -> int:
    """Upgrade the state database's schema, or show where it stands."""
    from georeg.state import StateStore
    from georeg.state.schema import current, upgrade

    config = load_config()

    async def run() -> str:
        store = StateStore(config.state.url)
        try:
            if arguments.db_action == "current":
                return f"state database: {(await current(store.database)).describe()}"
            before, after = await upgrade(store.database)
            if before.up_to_date:
                return f"state database: already at {after.head}, nothing to do"
            return f"state database: upgraded from {before.describe()} to {after.describe()}"
        finally:
            await store.close()

    print(asyncio.run(run()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
