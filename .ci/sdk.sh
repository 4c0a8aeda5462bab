#!/usr/bin/env bash
# The official marpledata SDK (3.7.0), unmodified, against `inboxd sandbox`: tests/sdk.
#
# The SDK pulls in pandas, pyarrow, trino and azure-storage-blob, which inboxd neither needs nor
# should be tested against by accident, so it gets its own venv, .venv-sdk: the project's
# requirements-dev.lock plus tests/sdk/requirements.lock (marpledata and what it adds), both
# hash-checked and installed with --no-deps so no pin of the project's moves, then inboxd itself
# (editable). Azurite comes from node_modules (`npm ci`). Run from anywhere; safe to re-run;
# arguments go to pytest (e.g. `bash .ci/sdk.sh -k azure`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1
venv=.venv-sdk

# uv (pinned in the dev lock) when the project venv has it: seconds where pip takes minutes.
if [[ -x .venv/bin/uv ]]; then
    .venv/bin/uv venv --quiet --clear --python python3 "$venv"
    .venv/bin/uv pip install --quiet --python "$venv/bin/python" --no-deps --require-hashes \
        -r requirements-dev.lock -r tests/sdk/requirements.lock
    .venv/bin/uv pip install --quiet --python "$venv/bin/python" --no-deps -e .
    .venv/bin/uv pip check --python "$venv/bin/python"
else
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --no-deps \
        -r requirements-dev.lock -r tests/sdk/requirements.lock
    "$venv/bin/python" -m pip install --quiet --no-deps -e .
    "$venv/bin/python" -m pip check
fi
"$venv/bin/python" -c 'import marple; print("marpledata", marple.__version__)'
exec "$venv/bin/python" -m pytest -q tests/sdk "$@"
