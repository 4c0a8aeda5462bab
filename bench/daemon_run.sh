#!/usr/bin/env bash
# Daemon benchmarks (throughput, drop latency, start-up, RSS, status) -> docs/benchmarks.md.
#
#   bash bench/daemon_run.sh                 # the full suite (< 10 min), writes the docs section
#   bash bench/daemon_run.sh --quick --no-write   # smoke run
#   bash bench/daemon_run.sh --only latency,status
#   bash bench/daemon_run.sh --profile ...   # also py-spy one daemon throughput run (workers=2)
#
# Needs the project venv (.venv). --profile installs py-spy into its own venv under
# ~/.cache/inboxd-bench/ (never into .venv) the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [[ ! -x $PY ]]; then
    echo "daemon_run.sh: no $PY; create the project venv first" >&2
    exit 2
fi
args=()
for a in "$@"; do
    if [[ $a == --profile ]]; then
        tools="${XDG_CACHE_HOME:-$HOME/.cache}/inboxd-bench/py-spy-venv"
        if [[ ! -x $tools/bin/py-spy ]]; then
            python3 -m venv "$tools"
            "$tools/bin/pip" install -q py-spy
        fi
        args+=(--py-spy "$tools/bin/py-spy")
    else
        args+=("$a")
    fi
done
export DAEMON_BENCH_VIA_RUN_SH=1
exec "$PY" bench/daemon_bench.py "${args[@]}"
