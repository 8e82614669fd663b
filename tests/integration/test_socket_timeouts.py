"""Every Redis and PostgreSQL connection the worker opens gives up on a silent peer, and keeps idle ones alive.

Regression: issue 21 defect 3. Each server sits behind a FaultProxy that is then blackholed (bytes accepted and
dropped, nothing closed): before the fix a Redis command waited on its socket for ever (arq sets only a connect
timeout) and a PostgreSQL connection's opening waited 60 s (asyncpg's default), with no setting for either.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import redis.exceptions

from tests.faults.proxy import FaultProxy
from worker import client
from worker.local.services import LocalServices
from worker.settings import Settings
from worker.store import create_pool

#: The timeouts set here: short, yet long enough for a loaded CI machine's Redis to answer a healthy connection.
BOUND_S = 2.0
#: Far above them: reached only if the call has no bound of its own.
OUTER_S = 20


def _proxy(url: str, name: str) -> Iterator[FaultProxy]:
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    with FaultProxy(parts.hostname, parts.port, name=name) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy(services: LocalServices) -> Iterator[FaultProxy]:
    yield from _proxy(services.redis_url, "redis")


@pytest.fixture
def pg_proxy(services: LocalServices) -> Iterator[FaultProxy]:
    yield from _proxy(services.database_url, "pg")


async def test_a_redis_command_on_a_silent_connection_gives_up_within_the_socket_timeout(
    services: LocalServices, redis_proxy: FaultProxy
) -> None:
    """Regression: issue 21 defect 3: the worker's Redis pool (`client.connect`, and arq's pool once `bound`)."""
    pool = await client.connect(
        redis_proxy.url(services.redis_url), socket_timeout_s=BOUND_S, connect_timeout_s=BOUND_S
    )
    try:
        kwargs = pool.connection_pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_keepalive"]) == (BOUND_S, True)
        assert await pool.set("partition:probe", "1")  # the connection arq opened takes the timeout too
        redis_proxy.set("blackhole")
        async with asyncio.timeout(OUTER_S) as outer:
            with pytest.raises(redis.exceptions.TimeoutError):
                await pool.get("partition:probe")  # the connection already open, now silent
            with pytest.raises(redis.exceptions.TimeoutError):
                await pool.get("partition:probe")  # a new connection: accepted, then silent
        assert not outer.expired()
        redis_proxy.heal()
        assert await pool.get("partition:probe") == b"1"  # a fresh connection after the heal
    finally:
        await pool.aclose()


async def test_a_postgresql_connection_to_a_silent_server_gives_up_within_the_connect_timeout(
    services: LocalServices, pg_proxy: FaultProxy, settings: Settings
) -> None:
    """Regression: issue 21 defect 3: `database.connect_timeout_s` bounds the opening of a pool's connection,
    and the pool's connections send TCP keepalives."""
    db = settings.database.model_copy(update={"url": pg_proxy.url(services.database_url), "connect_timeout_s": BOUND_S})
    pool = await create_pool(db, max_size=2, min_size=1, name="test-timeouts")
    try:
        async with pool.acquire() as conn:
            sock = conn._transport.get_extra_info("socket")  # asyncpg's own: the socket of the pooled connection
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            pg_proxy.set("blackhole")
            async with asyncio.timeout(OUTER_S) as outer:
                with pytest.raises(TimeoutError):
                    async with pool.acquire() as second:  # the pool opens a second connection: silent
                        await second.fetchval("SELECT 1")
            assert not outer.expired()
    finally:
        pool.terminate()
