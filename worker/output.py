"""Writing a generated site to `<output.dir>/<order_id>/`: built aside, then swapped in whole.

Every path is checked twice (by the model's schema and here, before joining it to a staging
directory that only this write uses) so nothing is ever written outside the order's
directory, whatever the model answered.
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import shutil
import time
from pathlib import Path

from loguru import logger

from worker.models import OutputFile, check_relative_path


def order_dir(root: Path, order_id: int) -> Path:
    return root.resolve() / str(order_id)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


#: Read once at import, while nothing else runs: a umask that strips bits from 0o755 means
#: folders need a chmod to stay world-readable (web servers read them as another user).
_CHMOD_FOLDERS = (0o755 & ~_umask()) != 0o755


def _write_file(path: Path, content: bytes) -> None:
    # os-level: a site is several files per generation, and io's file objects cost more than the write.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _make_staging(root: Path, staging: Path) -> None:
    """Create the build folder, creating the output folder the first time and clearing a crash's leftover.

    Only one generation of an order runs at a time, so a build folder of this order that is already
    here was left by a crash. Tried first and fixed up on failure: the usual case costs one mkdir.
    """
    try:
        staging.mkdir(mode=0o755)
    except FileNotFoundError:
        root.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=0o755)
    except FileExistsError:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o755)


def write_site(root: Path, order_id: int, files: list[OutputFile]) -> Path:
    """Write the files as the order's site, replacing the previous one in one step; returns its path.

    `root` should be absolute (the runner resolves `output.dir` once); a relative one is resolved here.
    """
    if not root.is_absolute():
        root = root.resolve()
    target = root / str(order_id)
    # Fixed names keep this independent of how many sites exist.
    staging, old = root / f".{order_id}.build", root / f".{order_id}.old"
    _make_staging(root, staging)
    try:
        folders = {staging}
        for file in files:
            # The staging dir is new and ours and the path is checked relative (no '..', no
            # absolute, no backslash), so the join cannot leave it: no resolve() per file.
            destination = staging / check_relative_path(file.path)
            if destination.parent not in folders:
                for folder in reversed(destination.relative_to(staging).parents[:-1]):
                    (staging / folder).mkdir(mode=0o755, exist_ok=True)
                    folders.add(staging / folder)
            _write_file(destination, file.content)
        if _CHMOD_FOLDERS:
            for folder in folders:
                os.chmod(folder, 0o755)
        try:
            os.rename(staging, target)  # a new order: nothing to replace (the usual case, one call)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            _swap(staging, target, old)
        else:
            if os.path.lexists(old):  # the previous site, left by a crash in the middle of a swap
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _swap(staging: Path, target: Path, old: Path) -> None:
    """Replace the order's current site with the staging folder; the previous one is kept until then."""
    if os.path.lexists(old):  # left by a crash in the middle of an earlier swap
        shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old, target)  # put the previous site back rather than lose it
        raise
    shutil.rmtree(old, ignore_errors=True)


def site_is_complete(root: Path, order_id: int) -> bool:
    return (order_dir(root, order_id) / "manifest.json").is_file()


#: After a write that held the event loop too long, sites are written in a thread for this long.
THREAD_WRITES_FOR_S = 300.0
INLINE_WRITE_SETTING = "output.inline_write_max_ms"


class SiteWriter:
    """Writes sites on the event loop while that is quick, and in a thread while it is not.

    A thread costs more CPU than the write itself: each of the write's system calls releases the
    GIL, and on a busy replica the event loop takes it every time, so each one is a handoff
    between threads. At 100 sites/s that was 1.3 ms of CPU per site, more than the write. A site
    is a handful of small files, which a local disk takes in well under a millisecond, so it is
    written inline. A write that holds the loop longer than `max_s` (a slow or network disk)
    sends the next writes to a thread for THREAD_WRITES_FOR_S, then the loop is tried again.
    `max_s` 0: always in a thread.
    """

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self._thread_until = 0.0 if max_s > 0 else math.inf

    @property
    def in_thread(self) -> bool:
        """Whether the next write goes to a thread."""
        return time.monotonic() < self._thread_until

    async def write(self, root: Path, order_id: int, files: list[OutputFile]) -> Path:
        """`write_site`, on the loop or in a thread (see the class)."""
        if self.in_thread:
            return await asyncio.to_thread(write_site, root, order_id, files)
        started = time.monotonic()
        try:
            return write_site(root, order_id, files)
        finally:
            took = time.monotonic() - started
            if took > self.max_s:
                self._thread_until = time.monotonic() + THREAD_WRITES_FOR_S
                logger.warning(
                    "writing the site of order {} held the event loop {:.0f} ms (over {} = {:g}); "
                    "sites are written in a thread for the next {:.0f} s",
                    order_id,
                    took * 1000,
                    INLINE_WRITE_SETTING,
                    self.max_s * 1000,
                    THREAD_WRITES_FOR_S,
                )
