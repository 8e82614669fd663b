"""worker/settings.py: sources and their precedence, and error messages that name what to fix."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from worker import settings as settings_module
from worker.settings import PROJECT_DIR, TASKS, SettingsError, load_settings, redact_url

WriteToml = Callable[[str], Path]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No settings from the developer's shell, and a working directory without a settings.toml."""
    for name in list(os.environ):
        if name.upper().startswith("SITEGEN_") or name.upper() in ("DATABASE_URL", "REDIS_URL"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def write_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> WriteToml:
    """Write a TOML file and point SITEGEN_SETTINGS at it."""

    def write(text: str) -> Path:
        path = tmp_path / "conf" / "sitegen.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        monkeypatch.setenv("SITEGEN_SETTINGS", str(path))
        return path

    return write


# --------------------------------------------------------------------------- sources


def test_defaults_with_an_empty_settings_file(write_toml: WriteToml) -> None:
    write_toml("")
    settings = load_settings()
    assert settings.worker.max_jobs == 10
    assert settings.worker.queue_name == "site_generation"
    assert settings.worker.retry_backoff_s == 5
    assert settings.database.url == "postgresql://sitegen@127.0.0.1:5432/sitegen"
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert settings.output.dir == Path("generated_sites")
    assert settings.limits.max_brief_bytes == 64 * 1024
    assert settings.ai.max_output_retries == 2
    assert settings.ai.routing == {task: ["offline"] for task in TASKS}
    assert settings.ai.providers["offline"].kind == "offline"


def test_defaults_when_no_settings_file_exists_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(settings_module, "PROJECT_DIR", tmp_path / "no-project")
    assert settings_module._settings_file() is None
    settings = load_settings()
    assert settings.worker.max_jobs == 10
    assert settings.log.level == "INFO"


def test_without_sitegen_settings_the_project_file_is_the_fallback() -> None:
    # The working directory (tmp_path) has no settings.toml, so the project's own one is used.
    expected = PROJECT_DIR / "settings.toml"
    found = settings_module._settings_file()
    if expected.is_file():
        assert found == expected
    else:
        assert found is None


def test_a_settings_file_in_the_working_directory_wins_over_the_project_one(tmp_path: Path) -> None:
    (tmp_path / "settings.toml").write_text("[worker]\nmax_jobs = 3\n")
    assert settings_module._settings_file() == Path("settings.toml")
    assert load_settings().worker.max_jobs == 3


def test_toml_values_are_read(write_toml: WriteToml) -> None:
    write_toml(
        """
[worker]
max_jobs = 7
queue_name = "q2"
retry_backoff_s = 1.5

[database]
url = "postgresql://app@db.internal:5433/sites"

[redis]
url = "rediss://cache.internal:6380/2"

[output]
dir = "/srv/sites"

[limits]
max_brief_bytes = 4096

[ai]
max_output_retries = 4

[ai.providers.local]
kind = "offline"
model = "templates-2"

[ai.routing]
planning = "local"
content = "local"
coding = "local"
"""
    )
    settings = load_settings()
    assert settings.worker.max_jobs == 7
    assert settings.worker.queue_name == "q2"
    assert settings.worker.retry_backoff_s == 1.5
    assert settings.database.url == "postgresql://app@db.internal:5433/sites"
    assert settings.redis.url == "rediss://cache.internal:6380/2"
    assert settings.output.dir == Path("/srv/sites")
    assert settings.limits.max_brief_bytes == 4096
    assert settings.ai.max_output_retries == 4
    assert settings.ai.providers["local"].model == "templates-2"
    assert settings.ai.routing["coding"] == ["local"]
    # Issue 22: the edit tasks, not named in these settings, follow coding.
    assert [settings.ai.routing[t] for t in ("edit_planning", "editing", "rewriting")] == [["local"]] * 3


def test_env_overrides_toml(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml('[worker]\nmax_jobs = 7\nqueue_name = "from-toml"\n')
    monkeypatch.setenv("SITEGEN_WORKER__MAX_JOBS", "20")
    settings = load_settings()
    assert settings.worker.max_jobs == 20
    assert settings.worker.queue_name == "from-toml"  # the rest of the section still comes from the file


def test_init_overrides_win_over_env(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml("[worker]\nmax_jobs = 7\n")
    monkeypatch.setenv("SITEGEN_WORKER__MAX_JOBS", "20")
    assert load_settings(worker={"max_jobs": 30}).worker.max_jobs == 30


def test_plain_database_and_redis_urls_override_toml(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml('[database]\nurl = "postgresql://toml@h/db"\npool_max_size = 4\n[redis]\nurl = "redis://toml:6379/0"\n')
    monkeypatch.setenv("DATABASE_URL", "postgresql://plain@pg:5432/sites")
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379/1")
    settings = load_settings()
    assert settings.database.url == "postgresql://plain@pg:5432/sites"
    assert settings.redis.url == "redis://plain:6379/1"
    assert settings.database.pool_max_size == 4


def test_sitegen_database_url_wins_over_database_url(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml('[database]\nurl = "postgresql://toml@h/db"\n')
    monkeypatch.setenv("DATABASE_URL", "postgresql://plain@pg/sites")
    monkeypatch.setenv("SITEGEN_DATABASE__URL", "postgresql://prefixed@pg/sites")
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379/1")
    monkeypatch.setenv("SITEGEN_REDIS__URL", "redis://prefixed:6379/2")
    settings = load_settings()
    assert settings.database.url == "postgresql://prefixed@pg/sites"
    assert settings.redis.url == "redis://prefixed:6379/2"


def test_empty_database_url_is_ignored(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml('[database]\nurl = "postgresql://toml@h/db"\n')
    monkeypatch.setenv("DATABASE_URL", "")
    assert load_settings().database.url == "postgresql://toml@h/db"


# --------------------------------------------------------------------------- errors


def test_invalid_env_value_names_key_and_env_var(write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml("")
    monkeypatch.setenv("SITEGEN_WORKER__MAX_JOBS", "many")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "worker.max_jobs" in message
    assert "SITEGEN_WORKER__MAX_JOBS" in message
    assert "'many'" in message


def test_out_of_range_toml_value_names_key_and_env_var(write_toml: WriteToml) -> None:
    write_toml("[worker]\nmax_jobs = 0\n")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "worker.max_jobs" in str(caught.value)
    assert "SITEGEN_WORKER__MAX_JOBS" in str(caught.value)


def test_every_bad_key_is_named_one_per_line(write_toml: WriteToml) -> None:
    write_toml('[worker]\nmax_jobs = 0\npoll_delay_s = -1\n[log]\njson_lines = "maybe"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings()
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert any("worker.max_jobs" in line for line in lines)
    assert any("worker.poll_delay_s" in line for line in lines)
    assert any("log.json_lines" in line and "SITEGEN_LOG__JSON_LINES" in line for line in lines)


def test_unknown_toml_key_is_named(write_toml: WriteToml) -> None:
    write_toml("[worker]\nmax_jobz = 3\n")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "worker.max_jobz" in str(caught.value)


def test_unknown_toml_section_is_named(write_toml: WriteToml) -> None:
    write_toml("[wrker]\nmax_jobs = 3\n")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "wrker" in str(caught.value)


def test_malformed_toml_is_a_settings_error(write_toml: WriteToml) -> None:
    write_toml("[worker\nmax_jobs = 3\n")
    with pytest.raises(SettingsError, match="cannot read settings"):
        load_settings()


def test_missing_settings_file_names_the_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "settings.toml"
    monkeypatch.setenv("SITEGEN_SETTINGS", str(missing))
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(missing) in str(caught.value)
    assert "SITEGEN_SETTINGS" in str(caught.value)


def test_settings_naming_a_directory_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SITEGEN_SETTINGS", str(tmp_path))
    with pytest.raises(SettingsError, match="not a readable file"):
        load_settings()


def test_routing_to_an_unknown_provider_names_the_route(write_toml: WriteToml) -> None:
    write_toml('[ai.routing]\nplanning = "offline"\ncontent = "offline"\ncoding = "gpt-9"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "routing.coding" in message
    assert "gpt-9" in message


def test_a_task_without_a_route_is_named(write_toml: WriteToml) -> None:
    write_toml('[ai.routing]\ncontent = "offline"\ncoding = "offline"\n')
    with pytest.raises(SettingsError, match=r"routing\.planning"):
        load_settings()


def test_routing_an_unknown_task_is_named(write_toml: WriteToml) -> None:
    write_toml('[ai.routing]\nplanning = "offline"\ncontent = "offline"\ncoding = "offline"\nreview = "offline"\n')
    with pytest.raises(SettingsError, match="review"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("DATABASE_URL", "mysql://app:hunter2secret@db:3306/sites", "database.url"),
        ("SITEGEN_DATABASE__URL", "http://app:hunter2secret@db/sites", "database.url"),
        ("REDIS_URL", "http://:hunter2secret@cache:6379/0", "redis.url"),
    ],
)
def test_password_in_an_invalid_url_is_not_shown(
    write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, key: str
) -> None:
    write_toml("")
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert key in message
    assert "hunter2secret" not in message
    assert "***" in message


def test_password_in_an_invalid_toml_url_is_not_shown(write_toml: WriteToml) -> None:
    write_toml('[database]\nurl = "mysql://app:hunter2secret@db/sites"\n')
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "database.url" in str(caught.value)
    assert "hunter2secret" not in str(caught.value)


def test_unparseable_url_with_password_is_a_settings_error(
    write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml("")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:hunter2secret@[broken/sites")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "database.url" in str(caught.value)
    assert "hunter2secret" not in str(caught.value)


# --------------------------------------------------------------------------- redact_url


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://app:s3cret@db:5432/sites", "postgresql://app:***@db:5432/sites"),
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("postgresql://app:p%40ss@db/sites", "postgresql://app:***@db/sites"),
        ("postgresql://app:p@ss@db/sites", "postgresql://app:***@db/sites"),
        ("postgresql://same:same@db/sites", "postgresql://same:***@db/sites"),
    ],
)
def test_redact_url_masks_the_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://sitegen@127.0.0.1:5432/sitegen",
        "redis://127.0.0.1:6379/0",
        "unix:///var/run/redis.sock",
        "not a url at all",
        "",
    ],
)
def test_redact_url_leaves_urls_without_password_untouched(url: str) -> None:
    assert redact_url(url) == url


def test_provider_whose_api_key_env_var_is_missing_fails_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOPE_API_KEY", raising=False)
    with pytest.raises(SettingsError) as caught:
        load_settings(
            ai={
                "providers": {"gpt": {"kind": "openai", "model": "gpt-4o", "api_key_env": "NOPE_API_KEY"}},
                "routing": {"planning": "gpt", "content": "gpt", "coding": "gpt"},
            }
        )
    message = str(caught.value)
    assert "ai.providers.gpt" in message and "NOPE_API_KEY is not set" in message
    assert len(message.splitlines()) == 1


def test_unknown_provider_kind_fails_naming_the_setting() -> None:
    with pytest.raises(SettingsError, match=r"ai\.providers\.x\.kind"):
        load_settings(ai={"providers": {"x": {"kind": "gemini", "model": "m"}}, "routing": {"planning": "x"}})


def test_routing_accepts_a_fallback_list_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SITEGEN_AI__ROUTING__CODING", "offline,backup")
    monkeypatch.setenv("SITEGEN_AI__PROVIDERS__BACKUP__KIND", "offline")
    settings = load_settings()
    assert settings.ai.routing["coding"] == ["offline", "backup"]


# --------------------------------------------------------------------------- timeouts (issue 21 defect 3)


def test_every_redis_and_postgresql_call_is_bounded_by_default_within_seconds(write_toml: WriteToml) -> None:
    """Regression: issue 21 defect 3: a partition must be noticed within seconds, not the minutes of TCP."""
    write_toml("")
    settings = load_settings()
    assert settings.redis.socket_timeout_s == 5
    assert settings.redis.connect_timeout_s == 2
    assert settings.database.command_timeout_s == 10
    assert settings.database.connect_timeout_s == 5


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("SITEGEN_REDIS__SOCKET_TIMEOUT_S", "0.1", "redis.socket_timeout_s"),  # shorter than a loaded Redis answers
        ("SITEGEN_REDIS__SOCKET_TIMEOUT_S", "0", "redis.socket_timeout_s"),  # 0 would mean "for ever" to redis-py
        ("SITEGEN_REDIS__CONNECT_TIMEOUT_S", "0", "redis.connect_timeout_s"),
        ("SITEGEN_DATABASE__CONNECT_TIMEOUT_S", "-1", "database.connect_timeout_s"),
        ("SITEGEN_DATABASE__COMMAND_TIMEOUT_S", "0", "database.command_timeout_s"),
        ("SITEGEN_REDIS__SOCKET_TIMEOUT_S", "86400", "redis.socket_timeout_s"),  # a day: no bound at all
    ],
)
def test_a_timeout_out_of_bounds_is_refused_naming_its_setting(
    write_toml: WriteToml, monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str
) -> None:
    write_toml("")
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert field in str(caught.value)
    assert env in str(caught.value)
