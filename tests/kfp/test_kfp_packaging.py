"""components/ and pipelines/ ship inside the distribution (as feedback_synth_kfp), with the image
references, so that `feedback-synth compile` works where there is no repository checkout."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_carries_the_kfp_packages_and_compiles_without_a_checkout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "src", "components", "pipelines", "images/images.yaml"):
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif path.exists():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, src / name)
    (src / "README.md").touch()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("feedback_synth-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    components = {f"feedback_synth_kfp/components/{n}.py" for n in (
        "__init__", "start_tracking", "prepare_data", "train_baseline", "extract_feedback", "generate_shard",
        "filter_synthetic", "retrain", "evaluate", "promote")}
    assert components <= names
    assert {"feedback_synth_kfp/__init__.py", "feedback_synth_kfp/pipelines/__init__.py",
            "feedback_synth_kfp/pipelines/feedback_synth_pipeline.py", "feedback_synth_kfp/submit.py",
            "feedback_synth_kfp/local_runner.py", "feedback_synth_kfp/task_server.py",
            "feedback_synth_kfp/task_client/sitecustomize.py", "feedback_synth/stages/retrain.py", "feedback_synth/orchestration/run.py",
            "feedback_synth/presets/digits-lt.yaml"} <= names
    if (REPO / "src/feedback_synth/weights/digits-lt-generator/unet").is_dir():  # the bundled generator
        assert "feedback_synth/weights/digits-lt-generator/unet/diffusion_pytorch_model.safetensors" in names
    images = yaml.safe_load(zipfile.ZipFile(wheel).read("feedback_synth_kfp/components/images.yaml"))
    assert images == yaml.safe_load((REPO / "images/images.yaml").read_text())  # a copy, not a link
    # every package of the library is in the wheel (the package list in pyproject.toml is explicit)
    for init in (REPO / "src" / "feedback_synth").rglob("__init__.py"):
        assert str(init.relative_to(REPO / "src")) in names, init

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    out = tmp_path / "compiled.yaml"
    code = ("import feedback_synth_kfp.components as c, sys; print(c.__file__); "
            "from feedback_synth_kfp.submit import compile_to; compile_to(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(site)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(site)), "imported the checkout, not the installed wheel"
    assert list(yaml.safe_load_all(out.read_text())) == list(
        yaml.safe_load_all((REPO / "pipelines" / "feedback_synth_pipeline.yaml").read_text()))
