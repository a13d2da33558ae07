"""Prefect's settings for the flow runs a warm engine forks, built once per kind of environment."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("georeg.warm_engine")


class SettingsCache:
    """Prefect's settings for each kind of environment the runs came with, built in the warm engine.

    Building them in a run (pydantic-settings reading the environment, the profiles file, and the
    settings files in the working directory) costs it 0.3 s. They depend on the PREFECT_ variables (a
    worker passes its own settings to every run; the per-run values are PREFECT__ ones, which are no
    settings) and on those files; a process worker gives each run a new, empty working directory. A
    change to the profiles file needs a restart, as it does for a worker.
    """

    SETTINGS_FILES = (".env", "prefect.toml", "pyproject.toml")  # read from the working directory

    _LIMIT = 16  # kinds of environment; a worker has one

    def __init__(self) -> None:
        self._contexts: dict[tuple[Any, ...], Any] = {}

    def get(self, environment: Mapping[str, str], cwd: str) -> Any:
        """The settings context for this environment, or None if it was not built yet."""
        return self._contexts.get(self._key(environment, cwd))

    def learn(self, environment: Mapping[str, str], cwd: str) -> None:
        key = self._key(environment, cwd)
        if key in self._contexts or len(self._contexts) >= self._LIMIT:
            return
        import prefect.context

        own_environment, own_cwd = dict(os.environ), os.getcwd()
        try:
            os.environ.clear()
            os.environ.update(environment)
            os.chdir(cwd)
            self._contexts[key] = prefect.context.root_settings_context()
            logger.info("Prefect's settings for runs like this one are ready (%d kinds)", len(self._contexts))
        except Exception as error:  # the run builds its own, as without this cache
            logger.warning("could not build Prefect's settings for a run's environment: %s", error)
        finally:
            os.environ.clear()
            os.environ.update(own_environment)
            os.chdir(own_cwd)

    @classmethod
    def _key(cls, environment: Mapping[str, str], cwd: str) -> tuple[Any, ...]:
        settings = (item for item in environment.items() if item[0].startswith("PREFECT_"))
        variables = frozenset((name, value) for name, value in settings if not name.startswith("PREFECT__"))
        return variables, *(_identity(Path(cwd, name)) for name in cls.SETTINGS_FILES)


def _identity(path: Path) -> tuple[str, int, int] | None:
    """A file as it is now (None if absent): another one, or the same one changed, compares different."""
    try:
        status = path.stat()
    except OSError:
        return None
    return str(path), status.st_mtime_ns, status.st_size
