"""A PNG of a generated page, rendered by headless Chromium's command line (no Python browser driver).

Best effort: a preview is nice to have, so a missing or failing browser is logged and reported
as False, never raised into the generation.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from loguru import logger

#: Tried in order when CHROMIUM is not set; Debian's package is /usr/bin/chromium.
_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 30.0
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find_chromium() -> str | None:
    """The Chromium executable: $CHROMIUM if set, else the first known name on PATH."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return configured if Path(configured).is_file() else shutil.which(configured)
    return next((found for name in _CANDIDATES if (found := shutil.which(name))), None)


def _kill_leftovers(group: int) -> None:
    """Chromium helpers (crashpad, zygote) may outlive the browser; they are in our new session only."""
    try:
        os.killpg(group, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 1600, timeout_s: float = TIMEOUT_S) -> bool:
    """Render the local HTML file `page` into `png` (width x height pixels); False, logged, on any failure."""
    chromium = find_chromium()
    if chromium is None:
        logger.warning("screenshot of {} skipped: chromium not found (apt-get install -y chromium)", page)
        return False
    if not page.is_file():
        logger.warning("screenshot skipped: {} is not a file", page)
        return False
    try:
        png.parent.mkdir(parents=True, exist_ok=True)
        # A throwaway profile: a shared or locked one makes Chromium hand off to another process and exit.
        with tempfile.TemporaryDirectory(prefix="sitegen-chromium-") as profile:
            partial = png.with_name(png.name + ".partial.png")
            partial.unlink(missing_ok=True)
            # Own session, so a timeout kills the renderer and GPU children too, not only the launcher.
            with subprocess.Popen(
                [
                    chromium,
                    "--headless",
                    "--no-sandbox",  # running as root (containers) refuses to start with the sandbox
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--no-first-run",
                    "--hide-scrollbars",
                    f"--user-data-dir={profile}",
                    f"--screenshot={partial}",
                    f"--window-size={width},{height}",
                    page.resolve().as_uri(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            ) as proc:
                try:
                    _, stderr = proc.communicate(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _kill_leftovers(proc.pid)
                    proc.communicate()
                    logger.warning("screenshot of {} failed: chromium took over {} s", page, timeout_s)
                    partial.unlink(missing_ok=True)
                    return False
                finally:
                    _kill_leftovers(proc.pid)
            if proc.returncode != 0 or not partial.is_file() or partial.read_bytes()[:8] != _PNG_MAGIC:
                tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
                logger.warning(
                    "screenshot of {} failed: chromium exited {} ({})", page, proc.returncode, " | ".join(tail)
                )
                partial.unlink(missing_ok=True)
                return False
            # Renamed into place so a reader never sees a half-written PNG.
            partial.replace(png)
    except OSError as exc:
        logger.warning("screenshot of {} failed: {}", page, exc)
        return False
    return True
