"""The `georeg` command. Exit 0 on success; on failure one line on stderr and a non-zero status
(1 when the work failed, 2 when the command or the config is wrong)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
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
    parser.add_argument("--config", help=f"config file (default: ${CONFIG_ENV}, else ./georeg.yaml)")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
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
    serve = command("serve", _serve, "receive the primary's notifications and start replication within seconds")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")

    keygen = command("keygen", _keygen, "create the key pair all registries trust (GitLab's gitlab-registry.key)")
    keygen.add_argument("key_file", metavar="KEY_FILE", help="private key to write (PEM, mode 0600)")
    keygen.add_argument("cert_file", metavar="CERT_FILE", help="certificate to write: the registries' rootcertbundle")
    keygen.add_argument("--type", choices=["rsa", "ec"], default="rsa", dest="key_type")
    return parser


def _serve(arguments: argparse.Namespace) -> int:
    import uvicorn

    from georeg.receiver import create_app
    from georeg.state import StateStore

    config = load_config()
    app = create_app(config, StateStore(config.state.url))
    print(
        f"georeg: receiving on http://{arguments.host}:{arguments.port}/api/v4/container_registry_event/events "
        f"(dispatch: {config.dispatch.mode})",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(app, host=arguments.host, port=arguments.port, log_level="info", access_log=False)
    return 0


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
    from georeg.flows import replicate_image

    results = _run(replicate_image, reference, arguments.secondary)
    for result in results:
        print(
            f"{result['secondary']}: {result['image']} = {result['digest']} "
            f"({result['blobs_copied']} blobs copied, {result['blobs_mounted']} mounted, "
            f"{result['blobs_present']} already present; {_size(result['bytes_copied'])} sent "
            f"in {result['seconds']:.2f} s{_rate(result['bytes_copied'], result['seconds'])})"
        )
    return 0


def _delete(arguments: argparse.Namespace) -> int:
    reference = ImageReference.parse(arguments.image, default_tag=None)
    load_config()
    from georeg.flows import delete_image

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


if __name__ == "__main__":
    sys.exit(main())
