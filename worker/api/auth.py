"""Who may do what: API tokens from the environment, signed stream tokens for one order, session cookies.

Tokens are compared in constant time (every configured token is compared, whatever matches) and
never logged. Stream tokens and sessions are HMAC-SHA256 signed with a random key that no token
reveals: `SITEGEN_API_SIGNING_KEY` (comma-separated, newest first, for rotation) or else one created
once in PostgreSQL (`api_signing_keys`) and shared by every `serve` process. Each signed value names
its key (`kid`) and carries a keyed fingerprint of the token that made it, so removing a token from
the configuration ends its sessions and stream tokens at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import math
import os
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import orjson

Role = Literal["read", "write"]
READ_ENV = "SITEGEN_API_READ_TOKENS"
WRITE_ENV = "SITEGEN_API_WRITE_TOKENS"
SIGNING_KEY_ENV = "SITEGEN_API_SIGNING_KEY"
MIN_TOKEN_CHARS = 32
MIN_KEY_BYTES = 32
VERSION = "v2"
#: The fingerprint of "no token": what open mode (no token configured) signs with; void once one is.
OPEN = "open"


class AuthConfigError(ValueError):
    """A token or key that cannot be used; one line naming the variable, never the value."""


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (value or "").split(",") if t.strip())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(key: bytes) -> str:
    """A short public name for a key (a hash of it: it reveals nothing of the key)."""
    return _b64(hashlib.sha256(b"sitegen-api key id\0" + key).digest()[:8])


def new_signing_key() -> bytes:
    return secrets.token_bytes(32)


@dataclass(frozen=True)
class Grant:
    """What a verified credential allows: its role, the token behind it (None in open mode), its session."""

    role: Role
    token: bytes | None
    session_id: str | None = None
    expires_at: float | None = None


@dataclass(frozen=True)
class StreamGrant:
    order_id: int
    expires_at: float
    session_id: str | None = None


class Tokens:
    """The API tokens of this process and the keys that sign stream tokens and sessions."""

    def __init__(self, read: Sequence[str] = (), write: Sequence[str] = (), signing_keys: Sequence[bytes] = ()) -> None:
        for variable, values in ((READ_ENV, read), (WRITE_ENV, write)):
            for index, token in enumerate(values, 1):
                if len(token) < MIN_TOKEN_CHARS:
                    raise AuthConfigError(
                        f"{variable}: token {index} has {len(token)} characters, fewer than {MIN_TOKEN_CHARS}; "
                        "generate one with `openssl rand -hex 24`"
                    )
        self._read = tuple(t.encode() for t in read)
        self._write = tuple(t.encode() for t in write)
        #: Keys from the environment: the database's key is not used then.
        self.explicit_keys = bool(signing_keys)
        self._keys: dict[str, bytes] = {}
        self._signing: tuple[str, bytes] | None = None
        #: Per key id, the fingerprint of each configured token and the token.
        self._prints: dict[str, dict[str, bytes]] = {}
        if signing_keys:
            self.use_keys(signing_keys)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tokens:
        env = os.environ if env is None else env
        keys = [k.encode() for k in _split(env.get(SIGNING_KEY_ENV))]
        for index, key in enumerate(keys, 1):
            if len(key) < MIN_KEY_BYTES:
                raise AuthConfigError(
                    f"{SIGNING_KEY_ENV}: key {index} has {len(key)} bytes, fewer than {MIN_KEY_BYTES}; "
                    "generate one with `openssl rand -hex 32` (or leave it unset: serve keeps one in PostgreSQL)"
                )
        return cls(_split(env.get(READ_ENV)), _split(env.get(WRITE_ENV)), keys)

    def use_keys(self, keys: Sequence[bytes]) -> None:
        """Sign with the first key, verify with all of them."""
        if not keys:
            raise AuthConfigError(f"{SIGNING_KEY_ENV}: no signing key")
        for key in keys:
            if len(key) < MIN_KEY_BYTES:
                raise AuthConfigError(f"{SIGNING_KEY_ENV}: a signing key has fewer than {MIN_KEY_BYTES} bytes")
        self._keys = {key_id(k): k for k in keys}
        self._signing = (key_id(keys[0]), keys[0])
        self._prints = {
            kid: {self._fingerprint(key, t): t for t in self._read + self._write} for kid, key in self._keys.items()
        }

    @property
    def has_keys(self) -> bool:
        return self._signing is not None

    @property
    def configured(self) -> bool:
        """Whether any token is set; without one the API is read-only and answers loopback names only."""
        return bool(self._read or self._write)

    def role_of(self, token: str) -> Role | None:
        """The role a bearer token grants, compared in constant time against every configured token."""
        return self._role(token.encode())

    def _role(self, given: bytes) -> Role | None:
        write = read = False
        for known in self._write:
            write |= hmac.compare_digest(given, known)
        for known in self._read:
            read |= hmac.compare_digest(given, known)
        return "write" if write else "read" if read else None

    def bearer_grant(self, token: str) -> Grant | None:
        role = self.role_of(token)
        return None if role is None else Grant(role, token.encode())

    @staticmethod
    def _fingerprint(key: bytes, token: bytes) -> str:
        return _b64(hmac.new(key, b"sitegen-api token\0" + token, hashlib.sha256).digest()[:12])

    # -- signed values: stream tokens and sessions, `v2.<kid>.<claims>.<mac>`

    def _sign(self, purpose: str, claims: dict[str, object], token: bytes | None) -> str:
        if self._signing is None:
            raise RuntimeError("no signing key yet: the app loads it when it starts")
        kid, key = self._signing
        fingerprint = OPEN if token is None else self._fingerprint(key, token)
        body = _b64(orjson.dumps({"p": purpose, "f": fingerprint, **claims}))
        signed = f"{VERSION}.{kid}.{body}"
        return f"{signed}.{_b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())}"

    def _verify(self, purpose: str, value: str) -> tuple[dict[str, object], bytes | None] | None:
        """The claims and the configured token behind them; None unless valid, unexpired and still bound."""
        parts = value.split(".")
        if len(parts) != 4 or parts[0] != VERSION or len(value) > 4096:
            return None
        kid = parts[1]
        key = self._keys.get(kid)
        if key is None:
            return None
        try:
            expected = hmac.new(key, ".".join(parts[:3]).encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(parts[3])):
                return None
            claims = orjson.loads(_unb64(parts[2]))
        except (ValueError, orjson.JSONDecodeError, UnicodeError):
            return None
        if not isinstance(claims, dict) or claims.get("p") != purpose:
            return None
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or expires <= time.time():
            return None
        fingerprint = claims.get("f")
        if fingerprint == OPEN:
            return (claims, None) if not self.configured else None
        token = self._prints.get(kid, {}).get(fingerprint) if isinstance(fingerprint, str) else None
        if token is None:
            return None  # the token that made it is no longer configured
        return claims, token

    def stream_token(self, order_id: int, ttl_s: float, grant: Grant | None = None) -> tuple[str, float]:
        """A token for one order's events and site, bound to the credential that asked for it."""
        expires = round(time.time() + ttl_s, 3)
        claims: dict[str, object] = {"o": order_id}
        if grant is not None and grant.session_id is not None:
            claims["s"] = grant.session_id
            if grant.expires_at is not None:
                expires = min(expires, grant.expires_at)
        claims["exp"] = expires
        return self._sign("stream", claims, grant.token if grant is not None else None), expires

    def stream_grant(self, token: str) -> StreamGrant | None:
        verified = self._verify("stream", token)
        if verified is None:
            return None
        claims = verified[0]
        order_id, expires, session = claims.get("o"), claims.get("exp"), claims.get("s")
        if not isinstance(order_id, int) or not isinstance(expires, int | float):
            return None
        return StreamGrant(order_id, float(expires), session if isinstance(session, str) else None)

    def session(self, token: str, ttl_s: float) -> str | None:
        """A session for a configured token (None for any other), with an id that sign-out can revoke."""
        role = self.role_of(token)
        if role is None:
            return None
        claims = {"r": role, "s": secrets.token_urlsafe(12), "exp": round(time.time() + ttl_s)}
        return self._sign("session", claims, token.encode())

    def session_grant(self, cookie: str) -> Grant | None:
        verified = self._verify("session", cookie)
        if verified is None or verified[1] is None:
            return None
        claims, token = verified
        assert token is not None
        role, session, expires = claims.get("r"), claims.get("s"), claims.get("exp")
        current = self._role(token)
        if role not in ("read", "write") or current is None or not isinstance(session, str):
            return None
        # The token's role as configured now: a token moved from write to read downgrades its sessions.
        granted: Role = "write" if role == "write" and current == "write" else "read"
        return Grant(granted, token, session, float(expires) if isinstance(expires, int | float) else None)

    def unknown_key(self, value: str) -> bool:
        """Whether `value` looks signed by a key this process does not know (yet: a rotation)."""
        parts = value.split(".")
        return len(parts) == 4 and parts[0] == VERSION and parts[1] not in self._keys and len(value) <= 4096

    def session_id_of(self, value: str) -> str | None:
        """The session id a session cookie or stream token carries, if it verifies."""
        for purpose in ("session", "stream"):
            verified = self._verify(purpose, value)
            if verified is not None:
                session = verified[0].get("s")
                return session if isinstance(session, str) else None
        return None


class AuthThrottle:
    """Failed sign-ins and 401s per client address: a token bucket of `per_minute` failures, refilled at
    that rate; an address with an empty bucket is answered 429 until it refills. IPv6 addresses count
    per /64 (one host holds a whole one). At most `max_clients` addresses are remembered, the least
    recently failing forgotten first, so memory stays bounded whatever the number of addresses."""

    def __init__(self, per_minute: int = 30, max_clients: int = 10_000) -> None:
        self.capacity = float(per_minute)
        self.rate_s = per_minute / 60.0
        self.max_clients = max_clients
        self._clients: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    @staticmethod
    def _key(address: str | None) -> str:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return address or "?"
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
        return str(ip)

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._clients.get(key, (self.capacity, now))
        return min(self.capacity, tokens + (now - at) * self.rate_s)

    def retry_after(self, address: str | None) -> int | None:
        """Seconds until this address may try again, or None while it may."""
        key = self._key(address)
        if key not in self._clients:
            return None
        level = self._level(key, time.monotonic())
        return None if level >= 1 else max(1, math.ceil((1 - level) / self.rate_s))

    def failed(self, address: str | None) -> None:
        key = self._key(address)
        now = time.monotonic()
        self._clients[key] = (max(self._level(key, now) - 1, 0.0), now)
        self._clients.move_to_end(key)
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)

    def __len__(self) -> int:
        return len(self._clients)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) resolves to loopback addresses only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def is_loopback_name(host: str) -> bool:
    """Whether a Host header names loopback literally (`localhost`, 127.0.0.0/8, ::1), without resolving it:
    a name an attacker controls may resolve to 127.0.0.1 (DNS rebinding)."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else ""
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    name = name.rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
