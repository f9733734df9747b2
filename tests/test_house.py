"""The house rules (pyproject.toml, [tool.importlinter]) hold, and a verb loads only what it needs."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    """Layers, the library never importing KFP or the CLI, no circles: `lint-imports` itself."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return set(out.stdout.split())


def test_help_and_the_config_load_no_heavy_library():
    """`feedback-synth --help` and the config (what a KFP component parses first) import none of
    torch, timm, diffusers, mlflow or kfp: each verb imports what it needs."""
    heavy = {"torch", "timm", "diffusers", "mlflow", "kfp"}
    help_modules = _modules_after("from feedback_synth.cli.main import build_parser\nbuild_parser().format_help()")
    assert not heavy & help_modules
    config_modules = _modules_after("from feedback_synth.config import resolve_run_config\nresolve_run_config('digits-lt')")
    assert not heavy & config_modules


def test_the_pre_flight_checks_load_no_diffusers():
    """The checks before a run (the generator folder, its classes) read its configs without
    diffusers: a kfp-local launcher, which runs them and then only waits for its tasks, starts the
    pipeline seconds sooner (the bundled generator; diffusers and its peft/transformers take ~4 s)."""
    modules = _modules_after("from feedback_synth.config import resolve_run_config\n"
                             "from feedback_synth.orchestration.preflight import preflight\n"
                             "preflight(resolve_run_config('digits-lt', None, ['tracking.enabled=false']))")
    assert "feedback_synth.generation.loading" in modules and "diffusers" not in modules
