"""The functional core stays free of I/O: the phase modules never import the database layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHASE_MODULES = ("plan", "content", "code", "assemble")
FORBIDDEN = "worker.store"


def imported_modules(source: str) -> set[str]:
    """Every module a source file imports, `from worker import store` counted as worker.store."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("phase", PHASE_MODULES)
def test_phase_module_does_not_import_the_store(phase: str) -> None:
    """Regression: issue 14 acceptance 6: phases never import worker.store."""
    source = (ROOT / "worker" / "pipeline" / f"{phase}.py").read_text()
    imports = imported_modules(source)
    assert not {m for m in imports if m == FORBIDDEN or m.startswith(FORBIDDEN + ".")}, (
        f"worker/pipeline/{phase}.py imports {FORBIDDEN}: phases are pure functions (STYLE.md); "
        "domain types belong in worker.models"
    )


def test_importing_the_phases_does_not_load_the_store() -> None:
    """Regression: issue 14 acceptance 6: not even through another module."""
    modules = ", ".join(f"worker.pipeline.{p}" for p in PHASE_MODULES)
    code = f"import sys, {modules}; print({FORBIDDEN!r} in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_the_api_imports_the_store_and_the_client_never_the_pipeline() -> None:
    """Issue 16: `sitegen serve` is a web face of its own (STYLE.md, "a web face that stays small")."""
    code = (
        "import sys, worker.api.app, worker.api.routes, worker.api.dashboard; "
        "print(sorted(m for m in sys.modules if m.startswith(('worker.pipeline', 'worker.ai.'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the API loads the pipeline or the AI providers: {out.stdout}"


def _api_imports() -> dict[str, set[str]]:
    """worker.api's modules and the worker.api modules each imports (at any depth of its source)."""
    modules = {p.stem: p for p in (ROOT / "worker" / "api").glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imports = imported_modules(path.read_text())
        graph[name] = {m for m in modules if f"worker.api.{m}" in imports} - {name}
    return graph


def test_the_api_modules_import_each_other_in_no_circle() -> None:
    """Issue 20 acceptance 6: app.py, routes.py and dashboard.py imported each other in a circle; the
    shared pieces live in worker.api.context, and the app factory sits on top."""
    graph = _api_imports()
    assert not {m for m, deps in graph.items() if "app" in deps}, "nothing in worker/api imports the app factory"

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(dep == goal or (dep not in seen and reaches(dep, goal, seen | {dep})) for dep in graph[start])

    circles = sorted(m for m in graph if reaches(m, m, {m}))
    assert not circles, f"worker/api modules in an import circle: {circles} ({graph})"
    assert {"routes", "dashboard"} <= graph["app"]
    assert "routes" not in graph["dashboard"] and "dashboard" not in graph["routes"]
