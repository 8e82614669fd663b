"""Writing a generated site to `<output.dir>/<order_id>/`: built aside, then swapped in whole.

Every path is checked twice (by the model's schema and here, before joining it to a staging
directory that only this write uses) so nothing is ever written outside the order's
directory, whatever the model answered.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from worker.models import check_relative_path
from worker.store import OutputFile


def order_dir(root: Path, order_id: int) -> Path:
    return root.resolve() / str(order_id)


def _work_dir(root: Path, order_id: int) -> Path:
    """Where an order's site is built and its old copy dropped: beside the site, on the same filesystem."""
    return root / f".{order_id}.work"


def write_site(root: Path, order_id: int, files: list[OutputFile]) -> Path:
    """Write the files as the order's site, replacing the previous one in one step; returns its path."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    target = order_dir(root, order_id)
    work = _work_dir(root, order_id)
    # Only one generation of an order runs at a time, so anything already in its work dir was
    # left by a crash. Looking only there keeps this independent of how many sites exist.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o755)
    staging = work / "build"
    try:
        staging.mkdir(mode=0o755)
        folders = {staging}
        for file in files:
            # The staging dir is new and ours and the path is checked relative (no '..', no
            # absolute, no backslash), so the join cannot leave it: no resolve() per file.
            destination = staging / check_relative_path(file.path)
            if destination.parent not in folders:
                for folder in reversed(destination.relative_to(staging).parents[:-1]):
                    (staging / folder).mkdir(mode=0o755, exist_ok=True)
                    folders.add(staging / folder)
            destination.write_bytes(file.content)
        for folder in folders:
            os.chmod(folder, 0o755)  # mkdir's mode is filtered by the umask; sites must be world-readable
        old = work / "old"
        if target.exists() or target.is_symlink():
            os.rename(target, old)
        try:
            os.rename(staging, target)
        except OSError:
            if old.exists() or old.is_symlink():
                os.rename(old, target)  # put the previous site back rather than lose it
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def site_is_complete(root: Path, order_id: int) -> bool:
    return (order_dir(root, order_id) / "manifest.json").is_file()
