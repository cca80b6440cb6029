#!/usr/bin/env bash
# Build (once) the separate Python 3.13 venv that runs the real Akosha server
# used by the integration tests. Never installs into the project's own .venv.
#
#   AKOSHA_VENV      venv location (default: <repo>/.venv-akosha)
#   AKOSHA_VERSION   Akosha release to install (default: 0.11.0)
#   AKOSHA_PYTHON    explicit python3.13 interpreter (default: pyenv, then PATH)
#
# Idempotent: a stamp file `.built-<version>` inside the venv makes reruns instant.
# Prints the venv's python path as the last line of stdout.
set -euo pipefail

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd -- "${script_dir}/.." && pwd)"
version="${AKOSHA_VERSION:-0.11.0}"
venv="${AKOSHA_VENV:-${repo_root}/.venv-akosha}"
stamp="${venv}/.built-${version}"

log() { printf 'build-akosha-venv: %s\n' "$*" >&2; }

if [[ -f "${stamp}" && -x "${venv}/bin/python" ]]; then
    log "cached: ${venv} (akosha ${version})"
    printf '%s\n' "${venv}/bin/python"
    exit 0
fi

find_python313() {
    local base candidate root
    if [[ -n "${AKOSHA_PYTHON:-}" ]]; then
        printf '%s\n' "${AKOSHA_PYTHON}"
        return 0
    fi
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root 2>/dev/null || true)"
        if [[ -n "${root}" ]]; then
            for candidate in "${root}"/versions/3.13*/bin/python3.13; do
                if [[ -x "${candidate}" ]]; then
                    printf '%s\n' "${candidate}"
                    return 0
                fi
            done
        fi
    fi
    # pyenv not on PATH (e.g. a non-login shell), or HOME moved by a test
    # harness: try PYENV_ROOT, the root beside the pyenv binary, ~/.pyenv.
    root=""
    if command -v pyenv >/dev/null 2>&1; then
        root="$(cd -- "$(dirname -- "$(command -v pyenv)")/.." && pwd)"
    fi
    for base in "${PYENV_ROOT:-/nonexistent}" "${root:-/nonexistent}" "${HOME:-/root}/.pyenv"; do
        for candidate in "${base}"/versions/3.13*/bin/python3.13; do
            if [[ -x "${candidate}" ]]; then
                printf '%s\n' "${candidate}"
                return 0
            fi
        done
    done
    if command -v python3.13 >/dev/null 2>&1; then
        candidate="$(command -v python3.13)"
        # A pyenv shim exits non-zero when 3.13 is not actually installed.
        if "${candidate}" -c 'import sys' >/dev/null 2>&1; then
            printf '%s\n' "${candidate}"
            return 0
        fi
    fi
    return 1
}

if ! python313="$(find_python313)"; then
    log "ERROR: Python 3.13 not found (looked in \$(pyenv root), \$PYENV_ROOT and ~/.pyenv"
    log "       under versions/3.13*/bin, and for python3.13 on PATH)."
    log "       akosha==${version} requires Python 3.13; install it (e.g. 'pyenv install 3.13')"
    log "       or set AKOSHA_PYTHON=/path/to/python3.13."
    exit 1
fi
if ! "${python313}" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 13) else 1)' 2>/dev/null; then
    log "ERROR: ${python313} is not a working Python 3.13 interpreter."
    exit 1
fi

log "building ${venv} with ${python313} (akosha ${version})"
start=${SECONDS}
# A stale or half-built venv (no stamp) is rebuilt from scratch.
rm -rf -- "${venv}"
"${python313}" -m venv "${venv}"
# The pip bundled with 3.13.0 (24.2) cannot resolve Akosha's dependency set.
"${venv}/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"${venv}/bin/python" -m pip install --quiet --disable-pip-version-check "akosha==${version}"
"${venv}/bin/python" -c 'import akosha.mcp' >/dev/null
touch "${stamp}"
log "built ${venv} in $((SECONDS - start)) s"
printf '%s\n' "${venv}/bin/python"
