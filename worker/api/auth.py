"""Who may do what: API tokens from the environment, signed stream tokens for one order, session cookies.

Tokens are compared in constant time (every configured token is compared, whatever matches) and
never logged. Stream tokens and session cookies are HMAC-SHA256 signed with a key derived from the
configured tokens (or `SITEGEN_API_SIGNING_KEY`), so every `serve` process of a deployment accepts
what another one signed, and rotating the tokens revokes them all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import orjson

Role = Literal["read", "write"]
READ_ENV = "SITEGEN_API_READ_TOKENS"
WRITE_ENV = "SITEGEN_API_WRITE_TOKENS"
SIGNING_KEY_ENV = "SITEGEN_API_SIGNING_KEY"


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (value or "").split(",") if t.strip())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class StreamGrant:
    order_id: int
    expires_at: float


class Tokens:
    """The API tokens of this process and the key that signs stream tokens and sessions."""

    def __init__(self, read: tuple[str, ...] = (), write: tuple[str, ...] = (), signing_key: bytes | None = None):
        self._read = tuple(t.encode() for t in read)
        self._write = tuple(t.encode() for t in write)
        if signing_key is None:
            if self.configured:
                material = b"\n".join(sorted(self._read + self._write))
                signing_key = hmac.new(b"sitegen-api signing key v1", material, hashlib.sha256).digest()
            else:  # open mode (loopback only): nothing to derive from, valid for this process's life
                signing_key = secrets.token_bytes(32)
        self._key = signing_key

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tokens:
        env = os.environ if env is None else env
        key = env.get(SIGNING_KEY_ENV)
        return cls(_split(env.get(READ_ENV)), _split(env.get(WRITE_ENV)), key.encode() if key else None)

    @property
    def configured(self) -> bool:
        """Whether any token is set; without one every request may read and write (loopback only)."""
        return bool(self._read or self._write)

    def role_of(self, token: str) -> Role | None:
        """The role a bearer token grants, compared in constant time against every configured token."""
        given = token.encode()
        write = read = False
        for known in self._write:
            write |= hmac.compare_digest(given, known)
        for known in self._read:
            read |= hmac.compare_digest(given, known)
        return "write" if write else "read" if read else None

    # -- signed values: stream tokens and sessions

    def _sign(self, purpose: str, claims: dict[str, object]) -> str:
        body = _b64(orjson.dumps({"p": purpose, **claims}))
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return f"{body}.{_b64(mac)}"

    def _verify(self, purpose: str, value: str) -> dict[str, object] | None:
        body, _, mac = value.partition(".")
        try:
            expected = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(mac)):
                return None
            claims = orjson.loads(_unb64(body))
        except (ValueError, orjson.JSONDecodeError, UnicodeError):
            return None
        if not isinstance(claims, dict) or claims.get("p") != purpose:
            return None
        expires = claims.get("exp")
        if not isinstance(expires, int | float) or expires <= time.time():
            return None
        return claims

    def stream_token(self, order_id: int, ttl_s: float) -> tuple[str, float]:
        expires = round(time.time() + ttl_s, 3)
        return self._sign("stream", {"o": order_id, "exp": expires}), expires

    def stream_grant(self, token: str) -> StreamGrant | None:
        claims = self._verify("stream", token)
        order_id, expires = (claims or {}).get("o"), (claims or {}).get("exp")
        if not isinstance(order_id, int) or not isinstance(expires, int | float):
            return None
        return StreamGrant(order_id, float(expires))

    def session(self, role: Role, ttl_s: float) -> str:
        return self._sign("session", {"r": role, "exp": round(time.time() + ttl_s), "n": secrets.token_hex(8)})

    def session_role(self, cookie: str) -> Role | None:
        claims = self._verify("session", cookie)
        role = claims.get("r") if claims else None
        if role == "read" or role == "write":
            return role
        return None


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
