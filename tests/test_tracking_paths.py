"""A run folder whose name holds '%' (issue 25, item 11): SQLAlchemy unquotes a sqlite URL's path
and MLflow does not, so no URI can name a local store there; the run is refused in one line before
any work (it took 118 s of retries and ended in a SQLAlchemy traceback)."""
from __future__ import annotations

import pytest

from feedback_synth.cli.main import main
from feedback_synth.config import TrackingConfig
from feedback_synth.errors import ConfigError
from feedback_synth.tracking.client import check_local_store, resolve_tracking_uri, sqlite_file


@pytest.mark.parametrize("name", ["a%41b", "x%2fy"])
def test_a_local_store_in_a_folder_with_a_percent_escape_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="holds '%XX'"):
        resolve_tracking_uri(TrackingConfig(), str(tmp_path / name))
    assert list(tmp_path.iterdir()) == []
    check_local_store(TrackingConfig(tracking_uri="http://127.0.0.1:5000"), str(tmp_path / name))  # a server: fine
    uri, _ = resolve_tracking_uri(TrackingConfig(), str(tmp_path / "plain"))
    assert sqlite_file(uri) == str(tmp_path / "plain" / "mlflow" / "mlflow.db")


@pytest.mark.parametrize("name", ["50%", "x%zz"])
def test_a_lone_percent_is_fine(tmp_path, name):
    from mlflow import MlflowClient

    uri, artifacts = resolve_tracking_uri(TrackingConfig(), str(tmp_path / name))
    MlflowClient(tracking_uri=uri).create_experiment("e", artifact_location=artifacts)
    assert (tmp_path / name / "mlflow" / "mlflow.db").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_a_store_named_by_uri_keeps_new_artifacts_beside_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri=uri), "") == (uri, str(tmp_path / "store" / "artifacts"))


@pytest.mark.parametrize("tracking, refused", [("true", True), ("false", False)])
def test_a_run_into_a_folder_with_a_percent_is_one_line_before_any_work(tmp_path, capsys, tracking, refused):
    out = tmp_path / "run%41"
    model = "test_resnet" if refused else "no-such-model"  # tracking off: stop pre-flight at a later check
    args = ["run", "--output", str(out), "--set", f"tracking.enabled={tracking}", "--set", "train.epochs=1",
            "--set", "retrain.epochs=1", "--set", f"train.model={model}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    if refused:
        assert len(err) == 1 and "holds '%XX'" in err[0] and "tracking.enabled=false" in err[0]
    else:  # with tracking off the folder is fine: pre-flight goes on (and stops at the unknown model)
        assert "unknown timm model" in err[-1]
    assert not out.exists()


@pytest.fixture
def full_disk(tmp_path):
    """A real 2 MB tmpfs, filled up (needs root, as CI and this machine have; skipped elsewhere)."""
    import shutil
    import subprocess

    mount = tmp_path / "full"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        with open(mount / "fill", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        assert shutil.disk_usage(mount).free < 65536
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_run_started_on_a_full_disk_is_one_line_and_leaves_nothing(full_disk, capsys):
    """Issue 25, item 19: with tracking on, a run started on a full disk said "failed 'create_run' 4
    times" over pages of SQLAlchemy tracebacks; now the output's own first write says it, in one line."""
    out = full_disk / "run"
    assert main(["run", "--output", str(out), "--set", "train.model=test_resnet", "--set", "train.epochs=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"feedback-synth: error: no space left on the device of {out}; free some space (or use another "
                   "--output) and run the same command again to resume"]
    assert sorted(p.name for p in full_disk.iterdir()) == ["fill"]
