"""Docs generated from code stay in step with it."""

from __future__ import annotations

from pathlib import Path

from worker.settings import settings_reference

ROOT = Path(__file__).resolve().parents[2]


def test_settings_reference_is_current() -> None:
    assert (ROOT / "docs" / "settings.md").read_text() == settings_reference(), (
        "docs/settings.md is stale: run `.venv/bin/python -m worker.settings > docs/settings.md`"
    )
