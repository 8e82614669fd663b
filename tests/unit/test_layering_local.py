"""Production first (issue 16 acceptance 6): what runs the worker locally or tests it lives in worker/local/."""

from __future__ import annotations

from pathlib import Path

WORKER = Path(__file__).resolve().parents[2] / "worker"


def test_the_local_and_test_helpers_live_in_their_own_subpackage() -> None:
    helpers = {"services.py", "fake_server.py", "offline_site.py", "screenshot.py"}
    assert helpers <= {p.name for p in (WORKER / "local").glob("*.py")}
    for folder in (WORKER, WORKER / "ai", WORKER / "pipeline"):
        assert not helpers & {p.name for p in folder.glob("*.py")}, f"a local helper is back in {folder}"
