"""A run folder whose name holds '%' (issue 25, item 11): SQLAlchemy unquotes a sqlite URL's path
and MLflow does not, so no URI can name a local store there; the run is refused in one line before
any work (it took 118 s of retries and ended in a SQLAlchemy traceback)."""
from __future__ import annotations

import pytest

from feedback_synth.cli.main import main
from feedback_synth.config import TrackingConfig
from feedback_synth.errors import ConfigError
from feedback_synth.tracking.client import check_local_store, resolve_tracking_uri, sqlite_file


@pytest.mark.parametrize("name", ["a%41b", "50%", "x%zz"])
def test_a_local_store_in_a_folder_with_a_percent_is_refused(tmp_path, name):
    with pytest.raises(ConfigError, match="holds '%'"):
        resolve_tracking_uri(TrackingConfig(), str(tmp_path / name))
    assert list(tmp_path.iterdir()) == []
    check_local_store(TrackingConfig(tracking_uri="http://127.0.0.1:5000"), str(tmp_path / name))  # a server: fine
    uri, _ = resolve_tracking_uri(TrackingConfig(), str(tmp_path / "plain"))
    assert sqlite_file(uri) == str(tmp_path / "plain" / "mlflow" / "mlflow.db")


@pytest.mark.parametrize("tracking, refused", [("true", True), ("false", False)])
def test_a_run_into_a_folder_with_a_percent_is_one_line_before_any_work(tmp_path, capsys, tracking, refused):
    out = tmp_path / "run%41"
    model = "test_resnet" if refused else "no-such-model"  # tracking off: stop pre-flight at a later check
    args = ["run", "--output", str(out), "--set", f"tracking.enabled={tracking}", "--set", "train.epochs=1",
            "--set", "retrain.epochs=1", "--set", f"train.model={model}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    if refused:
        assert len(err) == 1 and "holds '%'" in err[0] and "tracking.enabled=false" in err[0]
    else:  # with tracking off the folder is fine: pre-flight goes on (and stops at the unknown model)
        assert "unknown timm model" in err[-1]
    assert not out.exists()
