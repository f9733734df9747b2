#!/usr/bin/env bash
# The GPU check, in one go, on the lent GPU machine (the `device` tool), first thing in a session that has one:
#   bash scripts/gpu-check.sh            # ~6-8 min on one H200; writes benchmarks/results/gpu_check.md
#   bash scripts/gpu-check.sh --smoke    # the same steps at toy size on any machine (a check of the script)
# It runs the `gpu` tests, a whole run of each preset with device=cuda (tracking off), and the throughput
# benchmark's SD-sized GPU rows with the memory estimate beside each measurement (benchmarks/gpu_check.py).
#
# The GPU machine has torch, timm, transformers, peft and pytest but no diffusers or pydantic and no network:
# carry the wheels (see ../shared/TOOL-FACTS.md: `pip download ... -d .whl diffusers pydantic ...`, with
# /.whl/ and /.site/ in .git/info/exclude); this script installs them into .site/ when they are missing.
# Its report (and a copy under $OUT when the device tool sets it) is what to commit, with the card named.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import diffusers, pydantic" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target .site .whl/*.whl
  else
    echo "gpu-check: diffusers/pydantic are missing and there is no .whl/ folder to install them from" >&2
    exit 2
  fi
fi
export PYTHONPATH="$PWD/.site:$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 FEEDBACK_SYNTH_CACHE="${FEEDBACK_SYNTH_CACHE:-$(mktemp -d)}"
nvidia-smi 2>/dev/null | head -15 || true
"$PY" benchmarks/gpu_check.py "$@"
rc=$?
if [[ -n "${OUT:-}" && -f benchmarks/results/gpu_check.md ]]; then cp benchmarks/results/gpu_check.md "$OUT/"; fi
exit $rc
