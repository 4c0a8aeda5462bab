#!/usr/bin/env bash
# Re-make the four hash-checked lock files from pyproject.toml, for every supported Python.
#
#   bash packaging/lock.sh            # after changing a dependency in pyproject.toml
#
# One universal lock per use (`uv pip compile --universal`): a single file installs on Python
# 3.10 to 3.13 on any platform; where a package's newest release dropped 3.10, the file holds
# two pins with markers (`; python_full_version < '3.11'`) and pip picks the one that applies.
#   requirements-dev.lock           everything the tests, lint and type checks need (dev extra)
#   requirements.lock               exactly what the daemon runs: a field install
#   requirements-sandbox.lock       + the sandbox extra (`inboxd sandbox`, `inboxd demo`)
#   requirements-data-service.lock  + the data-service extra (`[api] kind = "data-service"`)
# The dev lock is made first and keeps the versions it already holds (uv prefers the pins of an
# existing output file: nothing is bumped needlessly); the others are constrained by it, so a
# field install runs exactly the versions the tests ran. To upgrade one package on purpose:
# `UV_ARGS="--upgrade-package httpx" bash packaging/lock.sh`. uv itself is the version the dev
# lock pins (the one CI uses), installed into a throw-away venv; its version is in each header.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

UV_VERSION=$(sed -n 's/^uv==\([^ ]*\) .*/\1/p' requirements-dev.lock 2>/dev/null)
UV_VERSION=${UV_VERSION:-0.13.9}
tool=$(mktemp -d)
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool/venv"
"$tool/venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
uv=$tool/venv/bin/uv

# The command recorded at the top of each file is the one to re-run: this script.
export UV_CUSTOM_COMPILE_COMMAND="bash packaging/lock.sh"
compile=(pip compile pyproject.toml --universal --python-version 3.10 --generate-hashes
    --no-header --quiet ${UV_ARGS:-})

lock() {
    local out=$1
    shift
    {
        printf '# %s — made by `bash packaging/lock.sh` (uv %s):\n' "$out" "$UV_VERSION"
        printf "#    uv %s %s -o %s\n" "${compile[*]}" "$*" "$out"
        printf '# Install: pip install --require-hashes -r %s (Python 3.10-3.13)\n' "$out"
    } >"$out.tmp"
    # An existing file's pins are kept as preferences: keep the body, re-resolve into it.
    [[ -f $out ]] && cp "$out" "$out.body" || : >"$out.body"
    "$uv" "${compile[@]}" "$@" -o "$out.body"
    cat "$out.body" >>"$out.tmp"
    mv "$out.tmp" "$out"
    rm -f "$out.body"
    echo "$out: $(grep -c '^[a-z]' "$out") pins"
}

lock requirements-dev.lock --extra dev
lock requirements.lock -c requirements-dev.lock
lock requirements-sandbox.lock --extra sandbox -c requirements-dev.lock
lock requirements-data-service.lock --extra data-service -c requirements-dev.lock
