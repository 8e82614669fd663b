"""`worker.api.auth` without a server: token and key checks, key ids, fingerprints, rotation."""

from __future__ import annotations

import time

import pytest

from worker.api.auth import AuthConfigError, AuthThrottle, Tokens, is_loopback_name

READ = "r" * 32
WRITE = "w" * 32
KEY = b"k" * 32
SIGNING = "SITEGEN_API_SIGNING_KEY"
NEW_KEY = b"n" * 32


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"SITEGEN_API_WRITE_TOKENS": "a"}, "SITEGEN_API_WRITE_TOKENS"),
        ({"SITEGEN_API_READ_TOKENS": f"{READ}, {'x' * 31}"}, "SITEGEN_API_READ_TOKENS"),
        ({"SITEGEN_API_WRITE_TOKENS": WRITE, "SITEGEN_API_SIGNING_KEY": "x"}, "SITEGEN_API_SIGNING_KEY"),
        ({"SITEGEN_API_WRITE_TOKENS": WRITE, "SITEGEN_API_SIGNING_KEY": "k" * 32 + ",short"}, SIGNING),
    ],
)
def test_weak_tokens_and_keys_are_refused_naming_the_variable(env: dict[str, str], variable: str) -> None:
    """Regression: issue 20 finding 6: a write token "a" and a signing key "x" were accepted."""
    with pytest.raises(AuthConfigError, match=variable) as caught:
        Tokens.from_env(env)
    message = str(caught.value)
    assert "\n" not in message and "32" in message
    assert "short" not in message and "'a'" not in message and "'x'" not in message, "the value is not echoed"


def test_values_carry_a_key_id_and_verify_across_a_rotation() -> None:
    """Regression: issue 20 finding 4: signed values carry a key id, so a key rotates without a flag day:
    the newest key signs, the previous ones still verify until they are removed."""
    before = Tokens(write=(WRITE,), signing_keys=[KEY])
    during = Tokens(write=(WRITE,), signing_keys=[NEW_KEY, KEY])
    after = Tokens(write=(WRITE,), signing_keys=[NEW_KEY])
    old_session = before.session(WRITE, 60)
    assert old_session is not None and old_session.count(".") == 3
    assert during.session_grant(old_session) is not None, "the previous key still verifies"
    new_session = during.session(WRITE, 60)
    assert new_session is not None and new_session.split(".")[1] != old_session.split(".")[1], "a new key id"
    assert before.session_grant(new_session) is None
    assert after.session_grant(new_session) is not None
    assert after.session_grant(old_session) is None, "a removed key verifies nothing"


def test_a_session_is_bound_to_its_token_and_carries_neither_the_token_nor_its_hash() -> None:
    """Regression: issue 20 finding 5: a session names the token that made it (a keyed fingerprint), so it
    ends when that token is removed, and a token moved from write to read downgrades its sessions."""
    tokens = Tokens(read=(READ,), write=(WRITE,), signing_keys=[KEY])
    session = tokens.session(WRITE, 60)
    assert session is not None and tokens.session(READ[:-1] + "x", 60) is None
    grant = tokens.session_grant(session)
    assert grant is not None and grant.role == "write"
    assert WRITE not in session
    assert Tokens(read=(READ,), signing_keys=[KEY]).session_grant(session) is None, "its token was removed"
    demoted = Tokens(read=(READ, WRITE), signing_keys=[KEY]).session_grant(session)
    assert demoted is not None and demoted.role == "read"
    stream, _ = tokens.stream_token(3, 60, grant)
    assert tokens.stream_grant(stream) is not None
    assert Tokens(read=(READ,), signing_keys=[KEY]).stream_grant(stream) is None


def test_expired_tampered_and_cross_purpose_values_are_refused() -> None:
    tokens = Tokens(read=(READ,), signing_keys=[KEY])
    grant = tokens.bearer_grant(READ)
    assert grant is not None
    expired, _ = tokens.stream_token(1, -1, grant)
    assert tokens.stream_grant(expired) is None
    session = tokens.session(READ, 60)
    assert session is not None
    assert tokens.stream_grant(session) is None, "a session is not a stream token"
    stream, expires = tokens.stream_token(1, 60, grant)
    assert tokens.session_grant(stream) is None, "nor the other way round"
    assert expires > time.time()
    for broken in (stream[:-2] + "AA", stream.replace(".", "", 1), "", "....", "v2." + "A" * 300):
        assert tokens.stream_grant(broken) is None, broken


def test_the_failure_throttle_is_per_address_per_ipv6_64_and_bounded() -> None:
    """Regression: issue 20 finding 6: failures are counted per client address in bounded memory."""
    throttle = AuthThrottle(per_minute=3, max_clients=100)
    for _ in range(3):
        assert throttle.retry_after("203.0.113.1") is None
        throttle.failed("203.0.113.1")
    wait = throttle.retry_after("203.0.113.1")
    assert wait is not None and 1 <= wait <= 20
    assert throttle.retry_after("203.0.113.2") is None, "another address has its own budget"
    for host in range(3):  # one IPv6 host owns a /64: its addresses share a budget
        throttle.failed(f"2001:db8:1:2::{host + 1}")
    assert throttle.retry_after("2001:db8:1:2:ffff::9") is not None
    assert throttle.retry_after("2001:db8:1:3::1") is None
    assert throttle.retry_after("::ffff:203.0.113.1") is not None, "an IPv4-mapped address is the IPv4 one"
    for n in range(10_000):  # an attacker with many addresses cannot grow the table
        throttle.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert len(throttle) == 100


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:8000", True),
        ("localhost", True),
        ("LOCALHOST.:80", True),
        ("app.localhost:8000", True),
        ("[::1]:8000", True),
        ("127.9.9.9", True),
        ("rebind.evil.example", False),
        ("127.0.0.1.evil.example", False),
        ("localhost.evil.example", False),
        ("[::ffff:8.8.8.8]", False),
        ("", False),
        ("0.0.0.0", False),
    ],
)
def test_open_mode_host_names_are_loopback_literally(host: str, loopback: bool) -> None:
    """Regression: issue 20 finding 7: DNS rebinding: a Host is loopback by its text, never by resolving it."""
    assert is_loopback_name(host) is loopback
