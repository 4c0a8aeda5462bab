#!/usr/bin/env bash
# WAN benchmark (issue #14): small files through a latency-adding proxy -> docs/benchmarks.md.
#
#   bash bench/wan_run.sh                        # 40 ms and 10 ms RTT, 2,000 x 16 KiB, 2 rounds
#   bash bench/wan_run.sh --quick --no-write     # smoke run
#   bash bench/wan_run.sh --rtt-ms 40 --daemon 'w32=workers=32'   # compare a candidate
#
# Needs the project venv (.venv). The SDK column uses the marpledata SDK venv that
# bench/run.sh creates (~/.cache/inboxd-bench/sdk-venv, or $BENCH_SDK_VENV); it is created here
# too when missing, as bench/run.sh does.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [[ ! -x $PY ]]; then
    echo "wan_run.sh: no $PY; create the project venv first" >&2
    exit 2
fi
sdk_venv="${BENCH_SDK_VENV:-$HOME/.cache/inboxd-bench/sdk-venv}"
if [[ " $* " != *" --no-sdk "* ]]; then
    if [[ ! -x "$sdk_venv/bin/python" ]]; then
        echo "wan_run.sh: creating $sdk_venv for the marpledata SDK" >&2
        "$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$sdk_venv"
    fi
    if ! "$sdk_venv/bin/python" -c 'import marple.db' 2>/dev/null; then
        "$sdk_venv/bin/python" -m pip install -q marpledata
    fi
    export BENCH_SDK_PYTHON="$sdk_venv/bin/python"
fi
export WAN_BENCH_VIA_RUN_SH=1
exec "$PY" bench/wan_bench.py "$@"
