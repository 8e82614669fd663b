"""A TCP fault proxy for the fault suite: it sits between a client (a replica) and a server (Redis or
PostgreSQL) on loopback and, on command, adds latency, blackholes, resets or half-closes connections.

No toxiproxy server can be installed here; this is the small asyncio equivalent. It runs its own event
loop in a thread, so a test that blocks (waiting on a process, stopping a server) does not stall the
traffic it carries. One proxy per client gives "cut one replica off while the others stay connected":
each replica's DATABASE_URL / REDIS_URL points at its own proxy.

Modes, applied to the connections already open and to new ones:
- `pass`: bytes go through, each chunk after `latency_s` (default 0) in each direction;
- `blackhole`: bytes are read and dropped in both directions, nothing is answered and nothing is closed,
  as when a host vanishes or a firewall drops packets (new connections are accepted, then go silent);
- `reset()`: every open connection is closed with a TCP RST at once (the mode stays as it was);
- `half_close()`: every open connection gets a FIN towards the client (the client reads end of stream
  while its own writes are still accepted and dropped), as a load balancer that drops a connection.

A connection that was blackholed stays dead after the mode goes back to `pass` (what was dropped is
lost, so neither end can trust the stream): the client must notice and reconnect, as in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, Self, TypeVar

Mode = Literal["pass", "blackhole"]
T = TypeVar("T")
CHUNK = 65536


@dataclass(eq=False)  # hashed by identity: held in a set
class _Link:
    """One proxied connection: the client's side, the server's side, and whether it still forwards."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    dead: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """A proxy on 127.0.0.1:<port> to `upstream_host:upstream_port`, in a thread of its own."""

    def __init__(self, upstream_host: str, upstream_port: int, *, name: str = "proxy") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.name = name
        self.mode: Mode = "pass"
        self.latency_s = 0.0
        #: Connections accepted since the start (a test can see that a client reconnected).
        self.accepted = 0
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fault-proxy-{name}", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    # -- life

    def start(self) -> Self:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def url(self, original: str) -> str:
        """`original` (a redis:// or postgresql:// URL of the upstream) pointing at this proxy instead."""
        host, port = self.upstream
        for form in (f"{host}:{port}", f"[{host}]:{port}"):
            if form in original:
                return original.replace(form, f"127.0.0.1:{self.port}", 1)
        raise ValueError(f"{original!r} does not name {host}:{port}")

    # -- commands (from the test's thread)

    def set(self, mode: Mode | None = None, *, latency_s: float | None = None) -> None:
        """Change the mode and/or the latency, for open connections and new ones alike."""
        if mode is not None:
            self.mode = mode
        if latency_s is not None:
            self.latency_s = latency_s

    def heal(self) -> None:
        """Back to `pass` with no latency (blackholed connections stay dead: clients must reconnect)."""
        self.set("pass", latency_s=0.0)

    def reset(self) -> int:
        """Close every open connection with an RST; returns how many there were."""
        return self._call(self._each(self._reset))

    def half_close(self) -> int:
        """Send a FIN to every open connection's client and stop forwarding; returns how many."""
        return self._call(self._each(self._half_close))

    def open_connections(self) -> int:
        return sum(1 for link in list(self._links) if not link.dead)

    # -- the proxy (on its own loop)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        link = _Link(writer)
        self._links.add(link)
        try:
            if self.mode == "blackhole":  # accepted, then silent: as a vanished host behind a firewall
                link.dead = True
                await self._drain_forever(reader)
                return
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._abort(writer)
                return
            link.server = server_writer
            link.tasks = [
                asyncio.create_task(self._pump(link, reader, server_writer)),
                asyncio.create_task(self._pump(link, server_reader, writer)),
            ]
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self._links.discard(link)
            for side in (link.client, link.server):
                if side is not None and not side.is_closing():
                    side.close()

    async def _pump(self, link: _Link, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while True:
            try:
                data = await source.read(CHUNK)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                if not link.dead:  # one side said goodbye: so does the other (Redis and PostgreSQL never half-close)
                    self._close_pair(link)
                return
            if self.mode == "blackhole":
                link.dead = True
            if link.dead:
                continue  # read and dropped: nothing answers, nothing closes
            if self.latency_s > 0:
                await asyncio.sleep(self.latency_s)
            try:
                sink.write(data)
                await sink.drain()
            except (ConnectionError, OSError):
                self._close_pair(link)
                return

    @staticmethod
    async def _drain_forever(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await reader.read(CHUNK):
                pass

    def _close_pair(self, link: _Link) -> None:
        for side in (link.client, link.server):
            if side is not None and not side.is_closing():
                side.close()

    @staticmethod
    def _abort(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _each(self, action: Any) -> int:
        links = list(self._links)
        for link in links:
            action(link)
        return len(links)

    def _reset(self, link: _Link) -> None:
        link.dead = True
        self._abort(link.client)
        if link.server is not None:
            self._abort(link.server)

    def _half_close(self, link: _Link) -> None:
        link.dead = True
        with contextlib.suppress(OSError, RuntimeError):
            link.client.write_eof()

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            self._reset(link)
            for task in link.tasks:
                task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
