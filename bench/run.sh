#!/usr/bin/env bash
# Push throughput benchmark (issue #2): installs what it needs, then runs
# bench/push_throughput.py with the given arguments, e.g.
#   bench/run.sh --size 256M          # quick check (writes docs/benchmarks.md too)
#   bench/run.sh                      # the full 2 GiB run
#   bench/run.sh --size 256M --no-write
#
# Needs: nginx (Debian nginx-light), curl, /usr/bin/time (Debian time), the project venv
# (.venv), and the official marpledata SDK. The SDK goes into its own venv
# ($BENCH_SDK_VENV, default ~/.cache/inboxd-bench/sdk-venv) rather than the project's:
# it pulls in pandas, pyarrow, trino and azure-storage-blob, which inboxd neither needs nor
# should be tested against by accident. Set BENCH_SDK_VENV=.venv to put it in the project
# venv anyway. py-spy (for --profile) is installed into the same venv.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"

py="$repo/.venv/bin/python"
if [[ ! -x "$py" ]]; then
    echo "run.sh: no project venv at $repo/.venv (python -m venv .venv && .venv/bin/pip install -e '.[dev]')" >&2
    exit 1
fi

as_root() {
    if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "run.sh: need root to run: $*" >&2; return 1; fi
}

apt_updated=0
apt_install() {
    # apt-get update first when the package is unknown (fresh image) or the install fails.
    if ! as_root apt-get install -y -q "$@" >/dev/null 2>&1; then
        if [[ $apt_updated -eq 0 ]]; then
            as_root apt-get update -q >/dev/null
            apt_updated=1
        fi
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
    fi
}

if ! command -v nginx >/dev/null && [[ ! -x /usr/sbin/nginx ]]; then
    echo "run.sh: installing nginx-light" >&2
    apt_install nginx-light
    # The package may start a system nginx on port 80; the benchmark runs its own.
fi
command -v curl >/dev/null || apt_install curl
[[ -x /usr/bin/time ]] || apt_install time
command -v taskset >/dev/null || apt_install util-linux

sdk_venv="${BENCH_SDK_VENV:-$HOME/.cache/inboxd-bench/sdk-venv}"
[[ "$sdk_venv" = /* ]] || sdk_venv="$repo/$sdk_venv"
if [[ ! -x "$sdk_venv/bin/python" ]]; then
    echo "run.sh: creating $sdk_venv for the marpledata SDK" >&2
    base_py="$("$py" -c 'import sys; print(sys._base_executable)')"
    "$base_py" -m venv "$sdk_venv"
fi
if ! "$sdk_venv/bin/python" -c 'import marple.db' 2>/dev/null; then
    echo "run.sh: installing marpledata into $sdk_venv" >&2
    "$sdk_venv/bin/python" -m pip install -q marpledata
fi
if [[ " $* " == *" --profile "* ]] && [[ ! -x "$sdk_venv/bin/py-spy" ]]; then
    "$sdk_venv/bin/python" -m pip install -q py-spy
fi

export BENCH_SDK_PYTHON="$sdk_venv/bin/python"
export BENCH_COMMAND="bench/run.sh${*:+ $*}"
[[ -x "$sdk_venv/bin/py-spy" ]] && export PATH="$PATH:$sdk_venv/bin"
exec "$py" "$here/push_throughput.py" "$@"
