#!/usr/bin/env bash
# Run the deployment checks: install helm, kubectl and checkov into .tools/ if they are missing,
# then tests/test_deploy.py (helm lint/template, kubernetes-validate, the Argo CD CRD schema,
# checkov, yamllint, hadolint, image references, planted mistakes).
#   bash scripts/check-deploy.sh            # extra arguments go to pytest, e.g. -k checkov
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install-deploy-tools.sh
exec "${PYTHON:-.venv/bin/python}" -m pytest tests/test_deploy.py -q "$@"
