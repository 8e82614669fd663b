"""Writing a generated site to `<output.dir>/<order_id>/`: built aside, then swapped in whole, in one step.

Every path is checked twice (by the model's schema and here, before joining it to a build folder
that only this write uses) so nothing is ever written outside the order's directory, whatever the
model answered.

Each write builds in a folder of its own beside the site, `.<order_id>.build-<owner>-<pid>-<n>`
(`owner`: this machine's boot and PID namespace, so a leftover's owner can be told dead), then:
- a new order: one `rename(2)` of the build folder to `<order_id>`;
- a rewrite: one `renameat2(RENAME_EXCHANGE)` swaps the build folder and `<order_id>`, then the
  previous site (now under the build folder's name) is removed.
`<order_id>/` is at every instant either the previous site or the new one, never missing and never
half-written, and a crash at any step leaves one of the two in place. Two writers of one order
(a replica whose claim was taken over, a thread still writing after a cancel) build apart and each
swap is whole: the last one wins.

Why RENAME_EXCHANGE rather than a symlink flip (`<order_id>` a symlink to a per-generation folder):
`<order_id>` stays a real directory, as the public contract, existing sites, tools and tests read
it (no migration of existing sites, which could not be swapped for a symlink atomically anyway);
web servers configured not to follow symlinks (nginx `disable_symlinks`, Apache without
`FollowSymLinks`) keep serving it; and nothing but `<order_id>` stays in the output folder, where a
flip leaves a second, per-generation folder per order for good. A new order still costs one
rename. Its limit: RENAME_EXCHANGE is Linux's (3.15+; ext4, xfs, btrfs, tmpfs, overlayfs). Where the
system or file system refuses it (NFS, macOS), the swap falls back to two renames with the previous
site set aside as `.<order_id>.old-...` (a warning is logged once): between them, for two system
calls, `<order_id>` does not exist, and `clean_leftovers` puts back a set-aside site that a crash
left without its replacement.

`clean_leftovers`, called at the worker's startup, removes what crashed writes left behind, only
when it is clearly dead (several replicas may share the output folder): its owner process is gone
(same machine and PID namespace), or it is older than `LEFTOVER_MAX_AGE_S`.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import itertools
import math
import os
import re
import shutil
import time
from collections.abc import Callable
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


def _owner() -> str:
    """This machine's boot and PID namespace, hashed: processes that share it can see each other's PIDs."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return _UNKNOWN_OWNER  # no /proc: a leftover's owner cannot be checked, only its age
    return hashlib.sha256(f"{boot}|{namespace}".encode()).hexdigest()[:8]


_UNKNOWN_OWNER = "0" * 8
_OWNER = _owner()
_WRITES = itertools.count()
#: A build or set-aside folder: `.<order>.build-<owner>-<pid>-<n>`, `.<order>.old-...`; also the
#: fixed `.<order>.build` / `.<order>.old` of earlier versions.
_LEFTOVER = re.compile(r"\.(?P<order>[0-9]+)\.(?P<kind>build|old)(?:-(?P<owner>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9]+)?")
#: A leftover this old is dead whoever owned it: a write takes milliseconds (a slow disk, seconds).
LEFTOVER_MAX_AGE_S = 900.0


def _build_folder(root: Path, order_id: int) -> Path:
    return root / f".{order_id}.build-{_OWNER}-{os.getpid()}-{next(_WRITES)}"


# --------------------------------------------------------------------------- the one-step swap

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2() -> Callable[..., int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28+, musl 1.2.3+; Linux only
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()
_warned_no_exchange = False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (ctypes releases the GIL); False where it is not supported."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


#: Another writer of the same order can get in between the steps of a swap this many times before giving up.
_SWAP_TRIES = 20


def _swap_in(build: Path, target: Path) -> None:
    """Make `build` the site at `target` in one step; what it replaced is removed."""
    for _ in range(_SWAP_TRIES):
        try:
            os.rename(build, target)  # a new order: nothing to replace (the usual case, one call)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        try:
            exchanged = _exchange(build, target)
        except FileNotFoundError:
            continue  # the site went meanwhile (a fallback writer between its renames): rename again
        if exchanged:
            shutil.rmtree(build, ignore_errors=True)  # the previous site, now under the build folder's name
            return
        if _swap_by_two_renames(build, target):
            return
    raise OSError(errno.EBUSY, f"could not swap in the site: {target} kept being replaced by other writers")


def _swap_by_two_renames(build: Path, target: Path) -> bool:
    """The fallback where RENAME_EXCHANGE is not supported: `target` is missing between the two renames.

    False: another writer got in between; the caller tries again.
    """
    global _warned_no_exchange
    if not _warned_no_exchange:
        _warned_no_exchange = True
        logger.warning(
            "the output folder {} does not support renameat2(RENAME_EXCHANGE): sites are swapped in two "
            "renames, and are missing for that moment",
            target.parent,
        )
    old = build.with_name(build.name.replace(".build-", ".old-", 1))
    try:
        os.rename(target, old)
    except FileNotFoundError:
        return False
    try:
        os.rename(build, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            try:
                os.rename(old, target)  # put the previous site back rather than lose it
            except OSError:
                pass  # another writer's site is there: clean_leftovers removes `old`
            raise
        shutil.rmtree(old, ignore_errors=True)  # another writer's newer site took the place meanwhile
        return False
    shutil.rmtree(old, ignore_errors=True)
    return True


# --------------------------------------------------------------------------- writing


def _write_file(path: Path, content: bytes) -> None:
    # os-level: a site is several files per generation, and io's file objects cost more than the write.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _make_build_folder(root: Path, build: Path) -> None:
    """Create the build folder, creating the output folder the first time.

    Tried first and fixed up on failure: the usual case costs one mkdir. The name is this write's own;
    one that is already there was left by a dead process that had the same PID.
    """
    try:
        build.mkdir(mode=0o755)
    except FileNotFoundError:
        root.mkdir(parents=True, exist_ok=True)
        build.mkdir(mode=0o755)
    except FileExistsError:
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(mode=0o755)


def write_site(root: Path, order_id: int, files: list[OutputFile]) -> Path:
    """Write the files as the order's site, replacing the previous one in one step; returns its path.

    `root` should be absolute (the runner resolves `output.dir` once); a relative one is resolved here.
    """
    if not root.is_absolute():
        root = root.resolve()
    target = root / str(order_id)
    # Named per write, not listed: the cost is independent of how many sites exist.
    build = _build_folder(root, order_id)
    _make_build_folder(root, build)
    try:
        folders = {build}
        for file in files:
            # The build folder is new and ours and the path is checked relative (no '..', no
            # absolute, no backslash), so the join cannot leave it: no resolve() per file.
            destination = build / check_relative_path(file.path)
            if destination.parent not in folders:
                for folder in reversed(destination.relative_to(build).parents[:-1]):
                    (build / folder).mkdir(mode=0o755, exist_ok=True)
                    folders.add(build / folder)
            _write_file(destination, file.content)
        if _CHMOD_FOLDERS:
            for folder in folders:
                os.chmod(folder, 0o755)
        _swap_in(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------- leftovers of crashes


def _owner_is_dead(owner: str | None, pid: str | None) -> bool:
    """Whether the process that named a leftover is gone; False when that cannot be told from here."""
    if owner is None or pid is None or owner != _OWNER or _OWNER == _UNKNOWN_OWNER:
        return False
    if int(pid) == os.getpid():  # this process may be writing it in a thread; else its age tells
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def clean_leftovers(root: Path, *, max_age_s: float = LEFTOVER_MAX_AGE_S) -> int:
    """Remove the build and set-aside folders that crashed writes left in `root`; returns how many.

    Only what is clearly dead: its owner process is gone, or it is older than `max_age_s` (the
    output folder may be shared by replicas writing right now). A set-aside previous site whose
    order has no site (a crash between the fallback swap's two renames) is put back instead.
    """
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return 0
    now = time.time()
    cleaned = 0
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # its writer just finished with it
        age = now - info.st_mtime  # a write adds entries to it all along: it is as old as its last one
        if not (_owner_is_dead(match["owner"], match["pid"]) or age > max_age_s):
            continue
        target = Path(root) / match["order"]
        if match["kind"] == "old" and not os.path.lexists(target):
            try:
                os.rename(entry.path, target)
            except OSError:
                pass
            else:
                logger.warning("output: put back {} as {}, left aside by a crashed write", entry.name, target)
                cleaned += 1
                continue
        shutil.rmtree(entry.path, ignore_errors=True)
        logger.info("output: removed {}, left by a crashed write", entry.name)
        cleaned += 1
    return cleaned


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
