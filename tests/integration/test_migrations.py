"""What migrations change beyond tables: 0004 compresses the large columns with lz4 where the server can."""

from __future__ import annotations

import glob
import subprocess
from pathlib import Path

import asyncpg
import pytest

from worker.local.services import LocalServices
from worker.migrate import migrate

ROOT = Path(__file__).resolve().parents[2]
LARGE = {("site_generation_phases", "output"), ("site_files", "content")}


async def has_lz4(conn: asyncpg.Connection) -> bool:
    values = await conn.fetchval("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
    return "lz4" in (values or [])


async def assert_large_columns_compressed_with_the_fastest_method(conn: asyncpg.Connection) -> None:
    lz4 = await has_lz4(conn)
    rows = await conn.fetch(
        "SELECT attrelid::regclass::text AS tab, attname, attcompression::text FROM pg_attribute"
        " WHERE attrelid IN ('site_generation_phases'::regclass, 'site_files'::regclass) AND attcompression <> ''"
    )
    assert {(r["tab"], r["attname"]) for r in rows} == (LARGE if lz4 else set())
    assert all(r["attcompression"] == "l" for r in rows)

    # A page's worth of HTML, stored the way the assemble phase stores it.
    await conn.execute("INSERT INTO site_orders (id, brief) VALUES (4001, '{}')")
    generation = await conn.fetchval(
        "INSERT INTO site_generations (order_id, status) VALUES (4001, 'running') RETURNING id"
    )
    html = ("<section><h2>Our bakery</h2><p>Sourdough bread, baked every morning.</p></section>\n" * 200).encode()
    await conn.execute(
        "INSERT INTO site_files (generation_id, path, content, sha256, bytes, media_type)"
        " VALUES ($1, 'index.html', $2, 'x', $3, 'text/html')",
        generation,
        html,
        len(html),
    )
    stored = await conn.fetchrow(
        "SELECT pg_column_compression(content) AS method, content FROM site_files WHERE generation_id = $1", generation
    )
    assert stored["method"] == ("lz4" if lz4 else "pglz")
    assert stored["content"] == html


async def test_the_session_server_gets_lz4_exactly_when_it_has_it(db: asyncpg.Connection) -> None:
    await assert_large_columns_compressed_with_the_fastest_method(db)


def system_postgres_with_lz4() -> str | None:
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        config = Path(bindir) / "pg_config"
        if (Path(bindir) / "postgres").exists() and config.exists():
            configure = subprocess.run([str(config), "--configure"], capture_output=True, text=True, check=False)
            if "--with-lz4" in configure.stdout:
                return bindir
    return None


async def test_a_server_built_with_lz4_compresses_the_large_columns_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = system_postgres_with_lz4()
    if bindir is None:
        pytest.skip("no PostgreSQL built --with-lz4 under /usr/lib/postgresql (Debian's postgresql package is)")
    monkeypatch.setenv("PGBIN", bindir)
    with LocalServices(redis=False) as services:
        await migrate(services.database_url, ROOT / "migrations")
        conn = await asyncpg.connect(services.database_url)
        try:
            assert await has_lz4(conn)
            await assert_large_columns_compressed_with_the_fastest_method(conn)
        finally:
            await conn.close()
