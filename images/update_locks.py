"""Compile the image lock files with pip-compile (pip-tools), every pin with its hashes.

    .venv/bin/python images/update_locks.py                   # both locks
    .venv/bin/python images/update_locks.py gpu               # one of them (gpu, cpu)
    .venv/bin/python images/update_locks.py --upgrade         # newest versions pyproject.toml allows
    .venv/bin/python images/update_locks.py --upgrade-package mlflow   # other options go to pip-compile

The input is the runtime of the images: pyproject.toml's [project].dependencies plus
images/requirements.in (test tools stay out). pip-compile keeps the versions already in a lock
unless told to upgrade, and the Dockerfiles install the locks with `--no-deps`, so the lock is
the whole environment (`pip check` then proves it complete).

- requirements.lock      GPU image: torch from PyPI, whose Linux wheels carry the CUDA user-space
                         libraries (nvidia-*, cuda-*, triton); the node supplies only the driver.
- requirements-cpu.lock  CPU image: torch and torchvision as their `+cpu` builds from the PyTorch
                         CPU index (needs that index to be reachable), the rest from PyPI.

Only the indexes named here are read (pip's own configuration is ignored: no local wheel folders
or mirrors), so every hash is one that the index serves.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYPI = "https://pypi.org/simple"
TORCH_CPU = "https://download.pytorch.org/whl/cpu"
INPUTS = ["pyproject.toml", "images/requirements.in"]
LOCKS = {
    "gpu": ("images/requirements.lock", []),
    "cpu": ("images/requirements-cpu.lock", ["--extra-index-url", TORCH_CPU]),
}


CUDA_ONLY = re.compile(r"^(nvidia-|cuda-|triton==)")


def check_lock(which: str, text: str) -> str:
    """'' if the compiled lock is right for its image, else what is wrong."""
    pins = [line.split(" ", 1)[0] for line in text.splitlines() if re.match(r"^[a-z0-9]", line)]
    torch = next((p for p in pins if p.startswith("torch==")), "")
    if which == "cpu" and (not torch.endswith("+cpu") or any(CUDA_ONLY.match(p) for p in pins)):
        return f"no torch +cpu build (got {torch or 'no torch'}): is {TORCH_CPU} reachable?"
    if which == "gpu" and (not torch or "+" in torch):
        return f"expected torch from PyPI, got {torch or 'no torch'}"
    return ""


def compile_lock(which: str, extra: list[str]) -> int:
    """pip-compile into a copy of the lock (so its pins are kept), checked before it replaces it."""
    out, indexes = LOCKS[which]
    lock = ROOT / out
    with tempfile.TemporaryDirectory() as tmp:
        draft = Path(tmp) / lock.name
        if lock.exists():
            shutil.copy(lock, draft)
        cmd = [sys.executable, "-m", "piptools", "compile", "--generate-hashes", "--allow-unsafe", "--strip-extras",
               "--resolver", "backtracking", "--index-url", PYPI, *indexes, "--no-emit-index-url",
               "--no-emit-trusted-host", "--output-file", str(draft), *extra, *INPUTS]
        env = {k: v for k, v in os.environ.items()
               if k not in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT")}
        env["PIP_CONFIG_FILE"] = os.devnull
        env["CUSTOM_COMPILE_COMMAND"] = f"python images/update_locks.py {which}"  # the lock's header says how
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT, env=env).returncode:
            return 1
        problem = check_lock(which, draft.read_text())
        if problem:
            print(f"update_locks: {out} not written: {problem}", file=sys.stderr)
            return 1
        shutil.copy(draft, lock)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="other options are passed to pip-compile")
    parser.add_argument("locks", nargs="*", metavar="{gpu,cpu}", help="which locks (default: both)")
    parser.add_argument("--upgrade", action="store_true", help="upgrade every pin pyproject.toml allows")
    args, extra = parser.parse_known_args()
    unknown = set(args.locks) - set(LOCKS)
    if unknown:
        parser.error(f"no such lock: {', '.join(sorted(unknown))} (choose from {', '.join(LOCKS)})")
    extra = (["--upgrade"] if args.upgrade else []) + [a for a in extra if a != "--"]
    failed = [which for which in (args.locks or list(LOCKS)) if compile_lock(which, extra)]
    if failed:
        print(f"update_locks: pip-compile failed for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
