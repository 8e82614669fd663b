"""Schema migrations: `migrations/*.sql` applied in name order, each once, recorded in `schema_migrations`.

Replicas starting together each call `migrate`; a session-level advisory lock on a dedicated
connection makes them take turns, so every file is applied exactly once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import asyncpg
from loguru import logger

#: Two-key advisory lock space (the per-order locks use the single-key space, which does not overlap).
MIGRATION_LOCK = (0x517E, 1)

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


class MigrationError(RuntimeError):
    pass


def migration_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.sql"))
    if not files:
        raise MigrationError(f"no migrations found in {directory} (setting database.migrations_dir)")
    return files


async def migrate(dsn: str, directory: Path) -> list[str]:
    """Apply the migrations not applied yet; returns the versions applied by this call."""
    files = migration_files(directory)
    applied_now: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1, $2)", *MIGRATION_LOCK)
        try:
            await conn.execute(_CREATE_TABLE)
            done = {
                r["version"]: r["checksum"] for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
            }
            for path in files:
                sql = path.read_text()
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if path.stem in done:
                    if done[path.stem] != checksum:
                        logger.warning("migration {} changed after it was applied; it is not applied again", path.name)
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)", path.stem, checksum
                    )
                applied_now.append(path.stem)
                logger.info("applied migration {}", path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", *MIGRATION_LOCK)
    finally:
        await conn.close()
    return applied_now


async def pending_migrations(dsn: str, directory: Path) -> list[str]:
    """Versions present on disk but not applied (for health checks and `sitegen check`)."""
    conn = await asyncpg.connect(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")} if exists else set()
    finally:
        await conn.close()
    return [p.stem for p in migration_files(directory) if p.stem not in done]
