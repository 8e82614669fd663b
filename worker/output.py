"""Writing a generated site to `<output.dir>/<order_id>/`: built aside, then swapped in whole.

Every path is checked twice (by the model's schema and here, after resolving) so nothing is
ever written outside the order's directory, whatever the model answered.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

from worker.models import check_relative_path
from worker.store import OutputFile


class UnsafePath(ValueError):
    pass


def order_dir(root: Path, order_id: int) -> Path:
    return root.resolve() / str(order_id)


def safe_join(base: Path, relative: str) -> Path:
    """`base / relative`, refused unless it stays inside `base` once resolved."""
    check_relative_path(relative)
    candidate = (base / relative).resolve()
    if not candidate.is_relative_to(base.resolve()):
        raise UnsafePath(f"file path {relative!r} resolves outside the site directory")
    return candidate


def _clear_leftovers(root: Path, order_id: int) -> None:
    # Only one generation of an order runs at a time, so any build or old copy of this order
    # that is still here was left by a crash.
    for leftover in root.glob(f".{order_id}.*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_site(root: Path, order_id: int, files: list[OutputFile]) -> Path:
    """Write the files as the order's site, replacing the previous one in one step; returns its path."""
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(root, order_id)
    target = order_dir(root, order_id)
    staging = Path(tempfile.mkdtemp(prefix=f".{order_id}.build-", dir=root))
    try:
        for file in files:
            destination = safe_join(staging, file.path)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(file.content)
        for directory, _, _ in os.walk(staging):
            os.chmod(directory, 0o755)
        if target.exists() or target.is_symlink():
            old = root / f".{order_id}.old-{uuid.uuid4().hex}"
            os.rename(target, old)
            os.rename(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def site_is_complete(root: Path, order_id: int) -> bool:
    return (order_dir(root, order_id) / "manifest.json").is_file()
