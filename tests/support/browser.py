"""Headless Chromium (Debian's `chromium`), to check pages as a person's browser renders them: the Prefect
UI is a single-page app, so what it shows exists only after its scripts have run and asked the API."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# Virtual time lets the page's timers and animations run ahead; the API requests still take real time.
_VIRTUAL_TIME_BUDGET_MS = 15_000
_TAG = re.compile(r"<[^>]+>")


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        raise AssertionError("chromium is not installed: run ./scripts/setup, which installs Debian's chromium")
    return found


def _run(url: str, *arguments: str, timeout: float = 120) -> str:
    # A profile of its own per call: a shared one is locked by any other Chromium running on the machine.
    with tempfile.TemporaryDirectory(prefix="georeg-chromium-") as profile:
        done = subprocess.run(
            [
                chromium(),
                "--headless=new",
                "--no-sandbox",  # the tests may run as root, where Chromium's sandbox refuses to start
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--virtual-time-budget={_VIRTUAL_TIME_BUDGET_MS}",
                "--window-size=1400,1000",
                *arguments,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise AssertionError(f"chromium failed on {url} ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def rendered_text(url: str) -> str:
    """The text of the page at `url` once its scripts have rendered it: each tag becomes a space (so
    "<b>a</b>: b" reads "a : b"), and white space is folded."""
    return " ".join(html.unescape(_TAG.sub(" ", _run(url, "--dump-dom"))).split())


def wait_for_text(url: str, *expected: str, deadline: float = 120) -> str:
    """Render `url` until its text holds every one of `expected` (a busy machine may answer slowly)."""
    end, text = time.monotonic() + deadline, ""
    while time.monotonic() < end:
        text = rendered_text(url)
        if all(part in text for part in expected):
            return text
    missing = [part for part in expected if part not in text]
    raise AssertionError(f"{url} never showed {missing}; it rendered:\n{text[:3000]}")


def screenshot(url: str, path: Path) -> Path:
    """A PNG of the page at `url`, 1400x1000."""
    _run(url, f"--screenshot={path}")
    return path
