"""`redact_url`: every password-bearing part of a database or Redis URL is masked before it is printed
or logged (worker startup, `sitegen check`, `config`, `demo`, settings errors)."""

from __future__ import annotations

import pytest

from worker.settings import redact_url

SECRET = "s3cret"

#: (URL as configured, as printed). Every URL here carries SECRET somewhere a driver reads as a password.
MASKED = [
    # libpq URIs: the userinfo password
    ("postgresql://app:s3cret@db:5432/sites", "postgresql://app:***@db:5432/sites"),
    ("postgres://app:s3cret@db/sites", "postgres://app:***@db/sites"),
    ("postgresql://app:s3cret@[::1]:5432/sites", "postgresql://app:***@[::1]:5432/sites"),
    ("postgresql://app:s3cret@[fe80::1%25eth0]/sites", "postgresql://app:***@[fe80::1%25eth0]/sites"),
    ("postgresql://app:s3cret@h1:5432,h2:5433/sites", "postgresql://app:***@h1:5432,h2:5433/sites"),
    ("postgresql://app:s3cret@%2Fvar%2Frun%2Fpostgresql/sites", "postgresql://app:***@%2Fvar%2Frun%2Fpostgresql/sites"),
    ("postgresql://app:s3cret@/sites?host=/var/run/postgresql", "postgresql://app:***@/sites?host=/var/run/postgresql"),
    ("postgresql://app:s3%40cret@db/sites", "postgresql://app:***@db/sites"),
    ("postgresql://app:s3@cret@db/sites", "postgresql://app:***@db/sites"),
    ("postgresql://app:s3cret:more@db/sites", "postgresql://app:***@db/sites"),
    ("POSTGRESQL://app:s3cret@db/sites", "POSTGRESQL://app:***@db/sites"),
    # libpq URIs: query parameters (finding 13's first example)
    ("postgresql://u@h/db?password=s3cret", "postgresql://u@h/db?password=***"),
    ("postgresql://u@h/db?sslmode=require&password=s3cret", "postgresql://u@h/db?sslmode=require&password=***"),
    ("postgresql://u@h/db?PASSWORD=s3cret", "postgresql://u@h/db?PASSWORD=***"),
    ("postgresql://u@h/db?pass%77ord=s3cret", "postgresql://u@h/db?pass%77ord=***"),
    ("postgresql://u@h/db?sslpassword=s3cret&sslkey=/k.pem", "postgresql://u@h/db?sslpassword=***&sslkey=***"),
    ("postgresql://u@h/db?password=s3cret#frag", "postgresql://u@h/db?password=***#frag"),
    ("postgresql://u@h/db?password=s3cret&password=s3cret", "postgresql://u@h/db?password=***&password=***"),
    ("postgresql://u@h/db?application_name=x;password=s3cret", "postgresql://u@h/db?application_name=x;password=***"),
    ("postgresql://u@[2001:db8::5]:6432/db?password=s3cret", "postgresql://u@[2001:db8::5]:6432/db?password=***"),
    ("postgresql://u@h/db?password=s3%26cret", "postgresql://u@h/db?password=***"),
    ("postgresql://u@h/db?oauth_client_secret=s3cret", "postgresql://u@h/db?oauth_client_secret=***"),
    # redis-py URLs (finding 13's second example) and their userinfo forms
    ("redis://h:6379/0?password=s3cret", "redis://h:6379/0?password=***"),
    ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
    ("redis://default:s3cret@cache:6379/0", "redis://default:***@cache:6379/0"),
    ("redis://s3cret@cache:6379/0", "redis://***@cache:6379/0"),  # some clients read a lone user as the password
    ("rediss://:s3cret@cache:6380/0?ssl_cert_reqs=none", "rediss://:***@cache:6380/0?ssl_cert_reqs=none"),
    ("redis://[::1]:6379/0?password=s3cret", "redis://[::1]:6379/0?password=***"),
    ("unix://:s3cret@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
    ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=***"),
    ("redis://h/0?Pwd=s3cret&passwd=s3cret&pass=s3cret", "redis://h/0?Pwd=***&passwd=***&pass=***"),
    ("redis://h/0?token=s3cret&api_key=s3cret&secret=s3cret", "redis://h/0?token=***&api_key=***&secret=***"),
    ("redis://h/0?pass+word=s3cret", "redis://h/0?pass+word=***"),
    # a provider's base URL with a key in its query
    ("https://api.example/v1?key=s3cret", "https://api.example/v1?key=***"),
    # libpq key/value connection strings (not a URL)
    ("host=db password=s3cret dbname=sites", "host=db password=*** dbname=sites"),
    ("host=db password = 's3 cret' dbname=sites", "host=db password = *** dbname=sites"),
]

#: URLs no driver would read as intended: nothing of them is shown.
UNPARSEABLE = [
    "postgresql://app:s3cret@[::1/sites",
    "redis://:s3cret/0",  # '#', '/' or '?' unencoded in a password cuts the authority short
    "redis://:pa#s3cret@cache/0",
    "postgresql://app:s3cret@db:port/sites",
    "redis://h:notaport/0?password=s3cret",
]

UNCHANGED = [
    "postgresql://sitegen@127.0.0.1:5432/sitegen",
    "postgresql://sitegen@[::1]:5432/sitegen?sslmode=require&application_name=worker",
    "redis://127.0.0.1:6379/0",
    "redis://[::1]:6379/0?socket_timeout=5",
    "unix:///var/run/redis.sock",
    "https://api.openai.com/v1",
    "not a url at all",
    "",
]


@pytest.mark.parametrize(("url", "shown"), MASKED)
def test_every_password_bearing_part_is_masked(url: str, shown: str) -> None:
    """Regression: issue 20 finding 13: `?password=` (libpq) and `?password=` (redis-py) were printed as
    written; so were sslpassword, a lone Redis user, multi-host and key/value forms."""
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url) and "s3 cret" not in redact_url(url)
    assert "s3" not in redact_url(url).replace("s3cret", "")  # nor any piece of it


@pytest.mark.parametrize("url", UNPARSEABLE)
def test_an_unparseable_url_is_not_echoed(url: str) -> None:
    """Regression: issue 20 finding 13: a URL a driver cannot read is hidden whole, not half-masked."""
    assert redact_url(url) == "<unparseable URL>"


@pytest.mark.parametrize("url", UNCHANGED)
def test_a_url_without_secrets_is_printed_as_configured(url: str) -> None:
    assert redact_url(url) == url


@pytest.mark.parametrize(("url", "shown"), MASKED)
def test_url_secrets_finds_what_redact_url_masks_as_written_and_decoded(url: str, shown: str) -> None:
    """`sitegen check` scrubs these from driver messages: the secret as written and percent-decoded."""
    from worker.settings import url_secrets

    secrets = url_secrets(url)
    assert any(SECRET in s or "s3 cret" in s or "s3@cret" in s or "s3&cret" in s for s in secrets), secrets
    assert "" not in secrets


def test_url_secrets_decodes_percent_escapes() -> None:
    from worker.settings import url_secrets

    assert set(url_secrets("postgresql://app:s3%40cret@db/sites?password=a%2Bb")) >= {"s3%40cret", "s3@cret", "a+b"}
