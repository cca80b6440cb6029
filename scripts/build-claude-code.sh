#!/usr/bin/env bash
# Install (once) the real Claude Code CLI that the plugin and install tests drive,
# from npm into a cached folder. Never installs globally.
#
#   CLAUDE_CODE_DIR      install folder (default: <repo>/.cache/claude-code)
#   CLAUDE_CODE_VERSION  release to install (default: 2.1.332)
#
# Idempotent: a stamp file `.built-<version>` in the folder makes reruns instant.
# Prints the `claude` executable's path as the last line of stdout.
set -euo pipefail

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd -- "${script_dir}/.." && pwd)"
version="${CLAUDE_CODE_VERSION:-2.1.332}"
dir="${CLAUDE_CODE_DIR:-${repo_root}/.cache/claude-code}"
stamp="${dir}/.built-${version}"
claude="${dir}/node_modules/.bin/claude"

log() { printf 'build-claude-code: %s\n' "$*" >&2; }

if [[ -f "${stamp}" && -x "${claude}" ]]; then
    log "cached: ${dir} (claude-code ${version})"
    printf '%s\n' "${claude}"
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    log "ERROR: npm not found; install Node.js (which brings npm) to get Claude Code,"
    log "       or point CLAUDE_CODE_DIR at a folder that already holds it."
    exit 1
fi

log "installing @anthropic-ai/claude-code@${version} into ${dir}"
start=${SECONDS}
# A half-built folder (no stamp) is rebuilt from scratch.
rm -rf -- "${dir}"
mkdir -p -- "${dir}"
# A package.json of its own keeps npm from walking up into the repository.
printf '{"name": "claude-code-cache", "private": true}\n' >"${dir}/package.json"
npm install --prefix "${dir}" --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@${version}" >&2
if ! got="$("${claude}" --version 2>&1)"; then
    log "ERROR: ${claude} --version failed: ${got}"
    exit 1
fi
case "${got}" in
    "${version}"*) ;;
    *) log "ERROR: expected Claude Code ${version}, ${claude} --version says: ${got}"; exit 1 ;;
esac
touch "${stamp}"
log "installed Claude Code ${got} in $((SECONDS - start)) s"
printf '%s\n' "${claude}"
