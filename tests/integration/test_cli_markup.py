"""Text from outside (the model, a provider, a brief) printed by `sitegen logs`, `status` and `demo` is shown
as written: never read as Rich markup (no crash on `[/bold]`, no `[link=...]` hyperlink), and its control
characters escaped (no ESC sequence, OSC 8 hyperlink, carriage return or fake line reaches the terminal)."""

from __future__ import annotations

import json
import re

import asyncpg
import pytest

from tests.helpers import KEY, KEY_ENV, cli_env, run_sitegen
from tests.integration.test_cli_ops import insert_log
from worker.local.fake_server import FakeProviderServer
from worker.local.services import LocalServices

#: What a prompt-injected model (or a hostile provider or brief) may put in a message.
HOSTILE = [
    "[/bold]",
    "[/]",
    "[link=https://evil.example/]click me[/link]",
    "[bold red]fake error[/bold red]",
    r"\[escaped] then a trailing backslash \\",
    "\x1b]8;;https://evil.example/\x07osc link\x1b]8;;\x07",
    "\x1b[2J\x1b[H cleared the screen",
    "\x1b[31mred\x1b[0m",
    "bell\x07 backspace\x08 vt\x0b ff\x0c del\x7f",
    "carriage\rreturn overwrites",
    "fake\n12:00:00 assemble generation succeeded",
    "\x9b31m c1 csi \x9d8;;https://evil.example/\x9c",
    "\u202egnp.exe right-to-left override",
    ":warning: :smiley: emoji codes",
    "{task.description} %s %(x)s {0}",
]
#: Rich's own colour codes (SGR) are allowed in a terminal; nothing else with ESC is.
SGR = re.compile(r"\x1b\[[0-9;]*m")


def escaped(text: str) -> str:
    """How the CLI shows `text`: control characters (and bidi controls) as Python-style escapes, tabs kept."""
    bidi = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    return "".join(
        c
        if c == "\t" or (c.isprintable() and c not in bidi)
        else (repr(c)[1:-1] if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


def terminal_env(services: LocalServices, **extra: str) -> dict[str, str]:
    """The CLI's environment as in a colour terminal (Rich writes styles and links), wide enough not to wrap."""
    return cli_env(services, FORCE_COLOR="1", TERM="xterm-256color", COLUMNS="4000", **extra)


def assert_shown_literally(out: str, texts: list[str]) -> None:
    assert "Traceback" not in out and "MarkupError" not in out, out
    assert "\x1b]" not in out and "\x9d" not in out, f"an OSC sequence (hyperlink) reached the terminal: {out!r}"
    plain = SGR.sub("", out)
    unprintable = {c for c in plain if not (c.isprintable() or c in "\n\t")}
    assert not unprintable, f"control characters reached the terminal: {unprintable!r}"
    for text in texts:
        assert escaped(text) in plain, f"{text!r} not shown as {escaped(text)!r}:\n{plain}"
    assert not any(line.startswith("12:00:00 assemble") for line in plain.splitlines()), "a faked line"


async def test_logs_and_status_print_hostile_text_as_written(db: asyncpg.Connection, services: LocalServices) -> None:
    """Regression: issue 20 finding 14: a progress message or stored error with `[/bold]` crashed `sitegen logs`
    and `status` with MarkupError, `[link=...]` made a terminal hyperlink, and ESC sequences were written raw."""
    order = 4801
    await db.execute("INSERT INTO site_orders (id, brief) VALUES ($1, '{}')", order)
    for i, text in enumerate(HOSTILE):
        level = ("info", "warning", "error")[i % 3]
        await insert_log(db, order, None, "assemble", level, f"removed <script src={text}>", "site.warning")
        error = {"type": "AIBadOutput", "message": text, "phase": "code"}
        await db.execute(
            "INSERT INTO site_generations (order_id, status, current_phase, attempt, error, started_at, finished_at)"
            " VALUES ($1, 'failed', 'code', 1, $2, now(), now())",
            order,
            json.dumps(error),
        )
    running = await db.fetchval(
        "INSERT INTO site_generations (order_id, status, current_phase, attempt, started_at)"
        " VALUES ($1, 'running', 'plan', 1, now()) RETURNING id",
        order,
    )
    await insert_log(db, order, running, "plan", "info", f"waiting for {HOSTILE[2]}", "budget.waiting")

    env = terminal_env(services)
    code, out = await run_sitegen(env, "logs", str(order))
    assert code == 0, out
    assert_shown_literally(out, [f"removed <script src={text}>" for text in HOSTILE] + [f"waiting for {HOSTILE[2]}"])

    code, out = await run_sitegen(env, "status", str(order), "--limit", str(len(HOSTILE) + 1))
    assert code == 0, out
    assert_shown_literally(out, [f"AIBadOutput: {text} (phase code)" for text in HOSTILE] + [HOSTILE[2]])

    code, out = await run_sitegen(env, "status")  # all orders: the same table
    assert code == 0, out
    assert_shown_literally(out, [HOSTILE[2]])


@pytest.mark.usefixtures("db")
async def test_demo_prints_a_hostile_provider_message_as_written(
    fake: FakeProviderServer, services: LocalServices
) -> None:
    """Regression: issue 20 finding 14: `sitegen demo` printed progress rows as markup, so a provider's error
    text (here in a 503 body the worker retries past) crashed it or reached the terminal as escape codes."""
    hostile = "[/bold] [link=https://evil.example/]x[/link] \x1b]8;;https://evil.example/\x07y\x1b]8;;\x07 \x1b[2J"
    fake.script(f"body:503:{hostile}")
    provider = {
        "KIND": "openai",
        "MODEL": "fake-gpt",
        "BASE_URL": f"{fake.url}/v1",
        "API_KEY_ENV": KEY_ENV,
        "MAX_RETRY_WAIT_S": "5",
    }
    env = terminal_env(
        services,
        **{f"SITEGEN_AI__PROVIDERS__REMOTE__{key}": value for key, value in provider.items()},
        **{f"SITEGEN_AI__ROUTING__{task}": "remote" for task in ("PLANNING", "CONTENT", "CODING")},
        **{KEY_ENV: KEY, "SITEGEN_OUTPUT__DIR": str(services.base_dir / "demo-markup-sites")},
    )
    code, out = await run_sitegen(env, "demo", "--order-id", "4802", "--latency", "0", timeout=120)
    assert code == 0, out
    assert_shown_literally(out, ["[/bold] [link=https://evil.example/]x[/link]"])
    assert "site ready" in SGR.sub("", out)
