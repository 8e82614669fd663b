"""The fault proxy itself (tests/faults/proxy.py), in front of a real Redis: every fault it injects is
the fault a client sees, and one proxy's fault leaves the others' clients alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.exceptions
from redis.asyncio import Redis

from tests.faults.proxy import FaultProxy
from worker.local.services import RedisServer

#: Longest a command may wait for an answer before the client gives up (the faults are silences).
CLIENT_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real Redis for these tests (they need no PostgreSQL)."""
    redis_server = RedisServer(tmp_path_factory.mktemp("proxy-redis")).start()
    yield redis_server
    redis_server.stop()


@pytest.fixture
def proxy(server: RedisServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", server.port, name="redis") as running:
        yield running


def _client(proxy: FaultProxy) -> Redis:
    host, port = proxy.address
    return Redis(host=host, port=port, socket_timeout=CLIENT_TIMEOUT_S, socket_connect_timeout=CLIENT_TIMEOUT_S)


@pytest.fixture
async def through(proxy: FaultProxy) -> AsyncIterator[Redis]:
    client = _client(proxy)
    yield client
    await client.aclose()


async def test_commands_pass_through_and_latency_delays_each_answer(proxy: FaultProxy, through: Redis) -> None:
    assert await through.set("k", "v") and await through.get("k") == b"v"
    proxy.set(latency_s=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await through.get("k") == b"v"
    assert loop.time() - started >= 0.6, "0.3 s each way"
    proxy.heal()
    assert await through.ping()


async def test_a_blackhole_answers_nothing_and_closes_nothing_until_the_client_gives_up(
    proxy: FaultProxy, through: Redis
) -> None:
    assert await through.ping()
    proxy.set("blackhole")
    with pytest.raises(redis.exceptions.TimeoutError):
        await through.get("k")
    assert proxy.open_connections() == 0, "the blackholed connection is dead for good"
    # A new connection is accepted, then silent too.
    fresh = _client(proxy)
    try:
        with pytest.raises(redis.exceptions.TimeoutError):
            await fresh.ping()
        proxy.heal()
        assert await fresh.ping(), "once healed, a client that reconnects gets through"
    finally:
        await fresh.aclose()


async def test_reset_closes_every_open_connection_with_an_rst(proxy: FaultProxy, through: Redis) -> None:
    reader, writer = await asyncio.open_connection(*proxy.address)
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        assert await reader.readline() == b"+PONG\r\n"
        assert await through.ping()
        assert proxy.reset() == 2, "the raw connection and the client's"
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(100), CLIENT_TIMEOUT_S)
    finally:
        writer.close()
    accepted = proxy.accepted
    assert await through.ping(), "redis-py finds its connection closed and reconnects through the proxy"
    assert proxy.accepted == accepted + 1


async def test_half_close_sends_end_of_stream_to_the_client(proxy: FaultProxy) -> None:
    reader, writer = await asyncio.open_connection(*proxy.address)
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        assert await reader.readline() == b"+PONG\r\n"
        assert proxy.half_close() == 1
        assert await asyncio.wait_for(reader.read(100), CLIENT_TIMEOUT_S) == b"", "end of stream"
        writer.write(b"PING\r\n")  # still accepted by the proxy, and dropped
        await writer.drain()
    finally:
        writer.close()


async def test_one_proxys_fault_leaves_the_clients_of_another_connected(
    server: RedisServer, proxy: FaultProxy, through: Redis
) -> None:
    with FaultProxy("127.0.0.1", server.port, name="other") as other:
        other_client = _client(other)
        try:
            assert await through.ping() and await other_client.ping()
            other.set("blackhole")
            with pytest.raises(redis.exceptions.TimeoutError):
                await other_client.ping()
            assert await through.set("still", "here") and await through.get("still") == b"here"
        finally:
            await other_client.aclose()


def test_url_points_a_service_url_at_the_proxy(server: RedisServer, proxy: FaultProxy) -> None:
    url = proxy.url(server.url)
    assert url == f"redis://127.0.0.1:{proxy.port}/0"
    with pytest.raises(ValueError, match="does not name"):
        proxy.url("redis://127.0.0.1:1/0")
