"""The one settings object: `settings.toml` (or `$SITEGEN_SETTINGS`) under `SITEGEN_<SECTION>__<KEY>` env overrides.

`DATABASE_URL` and `REDIS_URL` are honoured as-is. Secrets (API keys) are never read from the
TOML file: a provider names the environment variable that holds its key (`api_key_env`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, unquote_plus, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

PROJECT_DIR = Path(__file__).resolve().parent.parent
TASKS = ("planning", "content", "coding", "edit_planning", "editing", "rewriting")
#: The edit tasks, each routed as `coding` is unless `ai.routing` names it (settings made before edits existed).
EDIT_TASKS = ("edit_planning", "editing", "rewriting")


class SettingsError(RuntimeError):
    """Settings that cannot be used; the message names every key to fix, one per line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkerSection(_Section):
    queue_name: str = Field(default="site_generation", description="The arq queue this replica takes jobs from")
    replica_id: str = Field(default="", description="Names this replica in logs and its health key; default: host name")
    max_jobs: int = Field(
        default=10,
        ge=1,
        le=10_000,
        description="Generations one replica runs at once. The default matches a provider's default max_concurrency "
        "(8) plus 2 for generations between calls or waiting out a Retry-After; raise both together, up to what the "
        "provider's limits allow (docs/runbook.md, Sizing)",
    )
    poll_delay_s: float = Field(default=0.05, gt=0, description="How often an idle replica asks Redis for jobs")
    job_timeout_s: float = Field(default=1800, gt=0, description="Longest one job may run (arq job_timeout)")
    max_tries: int = Field(
        default=5,
        ge=1,
        description="Attempts of a generation whose failures are retryable (a provider down or rate limited) "
        "before it fails; runs that did no work (an order busy elsewhere, a drain) do not count, and PostgreSQL "
        "or Redis out of reach is retried for as long as it lasts",
    )
    max_attempts: int = Field(
        default=10,
        ge=1,
        description="Attempts of one generation in all (every claim by any replica, retries and the sweeper's "
        "re-enqueues included) before it fails with its last error, e.g. when it keeps killing its replica",
    )
    keep_result_s: float = Field(default=60, ge=0, description="How long a job's result stays readable in Redis")
    health_check_interval_s: float = Field(
        default=5, gt=0, description="How often the replica refreshes its health key for `arq --check`"
    )
    retry_backoff_s: float = Field(default=5, ge=0, description="First delay before a retryable failure is retried")
    retry_backoff_max_s: float = Field(default=300, ge=0, description="Longest delay between retries")
    lease_s: float = Field(
        default=8,
        ge=2,
        description="A replica's claim on a running job lasts this long without a heartbeat (every lease_s/4): "
        "the generations of a SIGKILLed replica are resumed elsewhere after about this long",
    )
    sweep_every_s: int = Field(
        default=30,
        ge=1,
        le=60,
        description="How often (seconds, dividing 60) the sweeper re-enqueues active generations whose job was lost",
    )
    run_migrations: bool = Field(default=True, description="Apply pending migrations at startup")
    shutdown_grace_s: float = Field(
        default=30,
        ge=0,
        description="On SIGTERM, how long running generations may take to finish their current phase",
    )

    @field_validator("sweep_every_s")
    @classmethod
    def _divides_a_minute(cls, every: int) -> int:
        if 60 % every:
            raise ValueError("must divide 60 (e.g. 5, 10, 15, 30, 60)")
        return every

    @cached_property
    def replica(self) -> str:
        return self.replica_id or socket.gethostname()


class DatabaseSection(_Section):
    url: str = Field(default="postgresql://sitegen@127.0.0.1:5432/sitegen", description="PostgreSQL DSN")
    pool_min_size: int = Field(default=1, ge=0, description="Connections the generation pool keeps open")
    pool_max_size: int = Field(default=10, ge=1, description="Most connections of the generation pool")
    progress_pool_max_size: int = Field(default=2, ge=1, description="Most connections of the progress pool")
    progress_buffer_rows: int = Field(
        default=10_000,
        ge=100,
        description="Progress rows held in memory while PostgreSQL is slower than the log; beyond this the "
        "oldest are dropped, each drop logged and counted (metric sitegen_progress_rows_dropped)",
    )
    progress_wait_s: float = Field(
        default=0.1,
        ge=0,
        description="How long a finishing job waits for its progress rows to be written before its result is "
        "stored; jobs stop waiting while the log is behind, so a slow database never holds generations up",
    )
    command_timeout_s: float = Field(
        default=10,
        gt=0,
        le=3600,
        description="Longest a single SQL statement may take; also how long a call waits on a silent connection "
        "(a network partition, a vanished host) before it gives up and PostgreSQL counts as out of reach",
    )
    connect_timeout_s: float = Field(
        default=5,
        gt=0,
        le=300,
        description="Longest the opening of one PostgreSQL connection may take (TCP, TLS, authentication)",
    )
    migrations_dir: Path = Field(default=PROJECT_DIR / "migrations", description="Folder of the *.sql migrations")

    @field_validator("url")
    @classmethod
    def _postgres_url(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("postgres", "postgresql"):
            raise ValueError("expected a postgresql:// URL")
        return url


class RedisSection(_Section):
    url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis URL of the queue")
    socket_timeout_s: float = Field(
        default=5,
        ge=0.5,
        le=300,
        description="Longest the worker waits for Redis to answer one command (its commands take milliseconds); "
        "then the connection counts as lost and Redis as out of reach: a partition or a vanished host is noticed "
        "this fast, and a shutdown never waits longer on Redis",
    )
    connect_timeout_s: float = Field(
        default=2, gt=0, le=300, description="Longest the opening of one Redis connection may take"
    )

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected a redis:// or rediss:// URL")
        return url


class OutputSection(_Section):
    dir: Path = Field(default=Path("generated_sites"), description="Sites are written to <dir>/<order_id>/")
    keep_versions: int = Field(
        default=0,
        ge=0,
        description="Versions of each order's site to keep, newest first (0: all); pruning never removes the "
        "live version or a file a kept version uses",
    )
    allowed_embed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts (and their subdomains) published pages may load scripts, frames, images, styles, "
        "fonts and media from and post forms to; all others are removed",
    )
    inline_write_max_ms: float = Field(
        default=20,
        ge=0,
        description="Sites are written on the event loop while each write takes at most this long; a slower "
        "one sends writes to a thread for 5 minutes (0: always in a thread)",
    )


class LimitsSection(_Section):
    max_brief_bytes: int = Field(default=64 * 1024, ge=1024, description="Largest brief accepted, as JSON bytes")


ProviderKind = Literal["offline", "openai", "anthropic", "cloudflare"]
DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "cloudflare": "https://api.cloudflare.com/client/v4",
}


class ProviderSettings(_Section):
    kind: ProviderKind = Field(description="offline, openai (any OpenAI-compatible API), anthropic or cloudflare")
    model: str = Field(default="", description="Model name sent to the provider (required but for offline)")
    base_url: str = Field(default="", description="API root; default: the provider's public API")
    api_key_env: str = Field(default="", description="Name of the environment variable holding the API key")
    account_id: str = Field(default="", description="cloudflare only: the account id in the URL")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers sent with every request")
    connect_timeout_s: float = Field(default=10, gt=0, description="Connect timeout of one request")
    read_timeout_s: float = Field(default=120, gt=0, description="Longest wait for the next bytes of an answer")
    total_timeout_s: float = Field(default=300, gt=0, description="Longest one request may take in all")
    max_concurrency: int = Field(
        default=8, ge=1, description="Requests in flight at once to this provider from one replica"
    )
    requests_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Requests per minute to this provider from every replica together, spaced evenly (GCRA in "
        "Redis; none: no limit). Set it a little under the provider's own limit (network jitter)",
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Tokens (input + output) per minute to this provider from every replica together: each call is "
        "charged an estimate before it is made, corrected from the usage the provider reports (none: no limit)",
    )
    cluster_max_concurrency: int | None = Field(
        default=None,
        ge=1,
        description="Requests in flight at once to this provider from every replica together (a leased semaphore "
        "in Redis: a killed replica's slots come back after worker.lease_s; none: no limit)",
    )
    max_retries: int = Field(default=3, ge=0, le=10, description="Retries of a failed request inside a phase")
    max_retry_wait_s: float = Field(
        default=60, ge=0, description="Longest wait inside a phase; a longer Retry-After goes back to the queue"
    )
    max_output_tokens: int = Field(default=8192, ge=1, description="max_tokens of a request")
    temperature: float = Field(default=0.2, ge=0, le=2)
    price_input_per_mtok: float = Field(default=0, ge=0, description="USD per million input tokens, for cost")
    price_output_per_mtok: float = Field(default=0, ge=0, description="USD per million output tokens, for cost")
    latency_s: float = Field(default=0, ge=0, le=60, description="offline only: pretend each answer takes this long")

    @model_validator(mode="after")
    def _complete(self) -> ProviderSettings:
        if self.kind == "offline":
            limits = [
                k for k in ("requests_per_minute", "tokens_per_minute", "cluster_max_concurrency") if getattr(self, k)
            ]
            if limits:
                raise ValueError(
                    f"{', '.join(limits)}: the offline provider makes no network calls and takes no limits"
                )
            return self
        if not self.model:
            raise ValueError(f"model: required for a {self.kind} provider")
        if self.kind in ("anthropic", "cloudflare") and not self.api_key_env:
            raise ValueError(f"api_key_env: required for a {self.kind} provider (the env var holding its key)")
        if self.kind == "cloudflare" and not self.account_id:
            raise ValueError("account_id: required for a cloudflare provider")
        if self.api_key_env and not os.environ.get(self.api_key_env):
            raise ValueError(f"api_key_env: environment variable {self.api_key_env} is not set (it holds the API key)")
        base = self.base_url or DEFAULT_BASE_URLS[self.kind]
        if urlsplit(base).scheme not in ("http", "https"):
            raise ValueError(f"base_url: expected an http(s) URL, got {base!r}")
        return self

    @property
    def api_root(self) -> str:
        return self.base_url or DEFAULT_BASE_URLS.get(self.kind, "")


def _route_list(value: Any) -> Any:
    """A route is a provider name or a fallback list; env vars may give `a,b` or a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class AISection(_Section):
    providers: dict[str, ProviderSettings] = Field(
        default_factory=lambda: {"offline": ProviderSettings(kind="offline", model="offline-templates-1")},
        description="Providers by name (see below)",
    )
    routing: dict[str, list[str]] = Field(
        default_factory=lambda: {task: ["offline"] for task in TASKS},
        description="For each task (planning, content, coding, and for edits edit_planning, editing, rewriting, "
        "which follow coding unless named): a provider name, or a list tried in order",
    )
    max_output_retries: int = Field(
        default=2, ge=0, le=5, description="Re-asks of a model whose answer fails validation"
    )
    max_retry_defer_s: float = Field(
        default=300,
        ge=0,
        description="Longest a job is deferred because a provider's Retry-After asked for more than "
        "max_retry_wait_s; a longer (or absurd: inf, 1e12) value is cut to this",
    )
    max_tokens_per_generation: int = Field(
        default=0, ge=0, description="Stop a generation that uses more tokens than this (0: no limit)"
    )
    max_budget_wait_s: float = Field(
        default=120,
        ge=0,
        description="Longest a phase waits for a provider's shared budget (requests_per_minute, tokens_per_minute, "
        "cluster_max_concurrency, or a pause after a 429) before it hands the generation back with a deferred retry",
    )
    fallback_budget_wait_s: float = Field(
        default=10,
        ge=0,
        description="For a task with a fallback provider: longest it waits for the first provider's budget before "
        "it asks the next one instead",
    )

    @field_validator("routing", mode="before")
    @classmethod
    def _routes_as_lists(cls, routing: Any) -> Any:
        if isinstance(routing, dict):
            routes = {task: _route_list(route) for task, route in routing.items()}
            for task in EDIT_TASKS:
                if task not in routes and "coding" in routes:
                    routes[task] = list(routes["coding"])
            return routes
        return routing

    @model_validator(mode="after")
    def _routes_known(self) -> AISection:
        for task in TASKS:
            names = self.routing.get(task)
            if not names:
                raise ValueError(f"routing.{task}: no provider routed for task {task!r}")
            for name in names:
                if name not in self.providers:
                    raise ValueError(
                        f"routing.{task}: unknown provider {name!r} (known: {', '.join(sorted(self.providers))})"
                    )
        unknown = sorted(set(self.routing) - set(TASKS))
        if unknown:
            raise ValueError(f"routing: unknown task(s) {', '.join(unknown)} (tasks: {', '.join(TASKS)})")
        return self


class LogSection(_Section):
    level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    json_lines: bool = Field(
        default=False,
        description="Log JSON lines instead of text (also on when the environment variable SITEGEN_LOG_JSON=1)",
    )


class MetricsSection(_Section):
    port: int = Field(
        default=0, ge=0, le=65535, description="Serve Prometheus metrics at http://host:port/metrics (0: off)"
    )
    host: str = Field(default="127.0.0.1", description="Address the metrics server listens on (0.0.0.0: all)")
    queue_sample_every_s: float = Field(
        default=5, gt=0, description="How often the queue depth is read from Redis for the metrics"
    )


class ApiSection(_Section):
    host: str = Field(
        default="127.0.0.1",
        description="Address `sitegen serve` listens on; a non-loopback one needs API tokens "
        "(SITEGEN_API_READ_TOKENS / SITEGEN_API_WRITE_TOKENS, environment only)",
    )
    port: int = Field(default=8000, ge=0, le=65535, description="Port of the progress API and dashboard")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins (scheme://host[:port]) allowed to call the API cross-origin (default: none)",
    )
    stream_token_ttl_s: float = Field(
        default=900, gt=0, le=7 * 86400, description="How long a stream token (one order's events and site) is valid"
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses or networks of the reverse proxies in front of `sitegen serve` (JSON list or "
        "comma-separated, e.g. 127.0.0.1): only requests from them have their X-Forwarded-For/-Proto/-Host "
        "believed (client address, https, host). Default: none",
    )
    auth_failures_per_minute: int = Field(
        default=30,
        ge=1,
        le=100_000,
        description="Failed sign-ins and 401s one client address may cause per minute (burst as large) before "
        "its requests get 429 with Retry-After; counted per `serve` process",
    )
    max_streams: int = Field(
        default=1000, ge=1, description="Most SSE streams one `serve` process holds open; beyond it 429 (Retry-After)"
    )
    max_streams_per_token: int = Field(
        default=100,
        ge=1,
        description="Most SSE streams open at once with one token (bearer, stream token or dashboard session)",
    )
    max_streams_per_client: int = Field(
        default=200, ge=1, description="Most SSE streams open at once from one client address"
    )
    pool_acquire_timeout_s: float = Field(
        default=5,
        gt=0,
        description="Longest a request waits for a PostgreSQL connection of the API's pool; then 503 (try again)",
    )
    overview_cache_s: float = Field(
        default=3, ge=0, description="How long one process reuses a rendered dashboard overview (0: render each time)"
    )

    @field_validator("cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _origins_as_list(cls, value: Any) -> Any:
        return _route_list(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                expected = "expected addresses or networks like 127.0.0.1 or 10.0.0.0/8"
                raise ValueError(f"{expected}, got {proxy!r}") from None
        return proxies

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
                raise ValueError(f"expected origins like https://app.example.com, got {origin!r}")
        return [origin.lower() for origin in origins]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SITEGEN_", env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    worker: WorkerSection = Field(default_factory=WorkerSection)
    database: DatabaseSection = Field(default_factory=DatabaseSection)
    redis: RedisSection = Field(default_factory=RedisSection)
    output: OutputSection = Field(default_factory=OutputSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    ai: AISection = Field(default_factory=AISection)
    log: LogSection = Field(default_factory=LogSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    api: ApiSection = Field(default_factory=ApiSection)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, _PlainUrlSource(settings_cls)]
        toml_file = _settings_file()
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


class _PlainUrlSource(PydanticBaseSettingsSource):
    """`DATABASE_URL` / `REDIS_URL`, as the rest of the ecosystem sets them (below SITEGEN_* overrides)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if os.environ.get("DATABASE_URL"):
            found["database"] = {"url": os.environ["DATABASE_URL"]}
        if os.environ.get("REDIS_URL"):
            found["redis"] = {"url": os.environ["REDIS_URL"]}
        return found


def _settings_file() -> Path | None:
    named = os.environ.get("SITEGEN_SETTINGS")
    if named:
        path = Path(named)
        if not path.is_file():
            raise SettingsError(f"SITEGEN_SETTINGS names {named!r}, which is not a readable file")
        return path
    for candidate in (Path("settings.toml"), PROJECT_DIR / "settings.toml"):
        if candidate.is_file():
            return candidate
    return None


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings, or raise SettingsError naming each bad key."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(_explain(exc)) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        raise SettingsError(f"cannot read settings: {exc}") from None


def _explain(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        env = "SITEGEN_" + "__".join(str(part) for part in error["loc"]).upper()
        given = error.get("input")
        shown = "" if isinstance(given, dict | list) else f" (got {redact_url(str(given))!r})"
        lines.append(f"invalid setting {key} (env {env}): {error['msg']}{shown}")
    return "\n".join(lines)


#: A query parameter (or libpq keyword) whose name says it carries a secret: password, passwd, pass, pwd,
#: sslpassword, oauth_client_secret, token, api_key, ... (case-insensitive, after percent-decoding).
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|auth|credential", re.IGNORECASE)
#: Schemes whose clients may read a lone user name as the password (`redis://secret@host`, pre-ACL style).
_REDIS_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")
_HOST = re.compile(r"(\[[0-9A-Za-z:.%]*\]|[^:\[\]]*)(:[0-9]*)?")
_KEYWORD_SECRET = re.compile(r"""([\w.-]+)(\s*=\s*)('(?:\\.|[^'\\])*'|\S*)""")
MASK = "***"
UNPARSEABLE = "<unparseable URL>"


class _Url:
    """A URL cut as libpq and redis-py read it, textually: no normalisation, multi-host authorities kept."""

    def __init__(self, url: str) -> None:
        self.scheme, _, rest = url.partition("://")
        cut = re.search(r"[/?#]", rest)
        self.authority, tail = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
        self.userinfo, self.at, self.hosts = self.authority.rpartition("@")
        self.path, self.question, query = tail.partition("?")
        if not self.question:
            self.path, self.hash, self.fragment = tail.partition("#")
            self.query = ""
        else:
            self.query, self.hash, self.fragment = query.partition("#")

    @property
    def parseable(self) -> bool:
        return all(_HOST.fullmatch(host) for host in self.hosts.split(","))

    def params(self) -> list[tuple[str, str, str]]:
        """(name as written, '=' or '', value as written) of each query parameter (libpq: &; redis-py: & and ;)."""
        found = []
        for param in re.split(r"[&;]", self.query) if self.question else ():
            name, eq, value = param.partition("=")
            found.append((name, eq, value))
        return found

    def password(self) -> str | None:
        """The userinfo part a client may read as the password (as written), if any."""
        if not self.at:
            return None
        user, colon, password = self.userinfo.partition(":")
        if colon:
            return password
        return user if self.scheme.lower() in _REDIS_SCHEMES and user else None


def _secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(unquote(name)) or _SECRET_NAME.search(unquote_plus(name)))


def redact_url(url: str) -> str:
    """The URL with every password-bearing part masked as `***`, for logs, errors and `sitegen config`.

    Masked: the userinfo's password (on Redis URLs also a lone user name, which some clients read as the
    password), query parameters named like a secret (`?password=`, `sslpassword`, `token`, `key`, ...), and
    in a libpq `key=value` string the same keywords. A URL no driver could read is not shown at all.
    """
    if "://" not in url:
        return _KEYWORD_SECRET.sub(lambda m: m[1] + m[2] + MASK if _secret_name(m[1]) else m[0], url)
    parts = _Url(url)
    if not parts.parseable:
        return UNPARSEABLE
    authority = parts.authority
    if parts.password() is not None:
        user, colon, _ = parts.userinfo.partition(":")
        authority = f"{user}:{MASK}@{parts.hosts}" if colon else f"{MASK}@{parts.hosts}"
    query = parts.query
    if parts.question:
        separators = re.findall(r"[&;]", parts.query)
        shown = [f"{n}{eq}{MASK}" if eq and _secret_name(n) else f"{n}{eq}{v}" for n, eq, v in parts.params()]
        query = shown[0] + "".join(sep + param for sep, param in zip(separators, shown[1:], strict=True))
    return f"{parts.scheme}://{authority}{parts.path}{parts.question}{query}{parts.hash}{parts.fragment}"


def url_secrets(url: str) -> list[str]:
    """The secrets `redact_url` masks, as written and percent-decoded (to scrub them from a driver's message)."""
    if "://" not in url:
        found = [m[3] for m in _KEYWORD_SECRET.finditer(url) if _secret_name(m[1])]
        found += [s[1:-1] for s in found if s.startswith("'") and s.endswith("'")]
    else:
        parts = _Url(url)
        found = [v for n, eq, v in parts.params() if eq and _secret_name(n)]
        password = parts.password()
        if password is not None:
            found.append(password)
    found += [unquote(s) for s in found] + [unquote_plus(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def settings_reference() -> str:
    """The Markdown reference of every setting, generated from the model so it cannot drift."""
    lines = [
        "# Settings reference",
        "",
        "Generated by `python -m worker.settings` from `worker/settings.py`; a test keeps it current.",
        "Each key is set in `settings.toml` (section, then key) or by the environment variable shown.",
        "`DATABASE_URL` and `REDIS_URL` are honoured as-is (below the `SITEGEN_` variables).",
        "",
        "| key | env | default | description |",
        "|---|---|---|---|",
    ]
    for section, field_info in Settings.model_fields.items():
        model = field_info.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        for key, sub in model.model_fields.items():
            default = sub.get_default(call_default_factory=True)
            if isinstance(default, Path):
                default = default.relative_to(PROJECT_DIR) if default.is_relative_to(PROJECT_DIR) else default
            if isinstance(default, dict):
                default = json.dumps(
                    {
                        k: v.model_dump(exclude_defaults=True) if isinstance(v, BaseModel) else v
                        for k, v in default.items()
                    }
                )
            if default == "":
                default = "(empty)"
            env = f"SITEGEN_{section}__{key}".upper()
            lines.append(f"| `{section}.{key}` | `{env}` | `{default}` | {sub.description or ''} |")
    provider = ProviderSettings.model_fields
    lines += ["", "Each `[ai.providers.NAME]` table has:", "", "| key | default | description |", "|---|---|---|"]
    for key, sub in provider.items():
        default = "(required)" if sub.is_required() else f"`{sub.get_default()}`"
        lines.append(f"| `{key}` | {default} | {sub.description or ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_reference(), end="")
