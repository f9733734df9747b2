"""The registry under faults (issue 25): a process killed mid-promotion (a real SIGKILL), a run
folder moved, a mistyped store, a missing model, a resume refused for a code change. Real local
SQLite stores and real processes, no mocks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from feedback_synth import storage
from feedback_synth.cli.main import main

QUICK = ["train.model=test_resnet", "train.epochs=1", "retrain.epochs=1", "feedback.budget_fraction=0.1",
         "feedback.shard_size=64", "generate.num_inference_steps=2", "generate.criterion=none",
         "filter.filters=[degenerate]", "tracking.enabled=true"]
MODEL = "feedback-synth-classifier"  # tracking.registered_model's default

# a real process that a real SIGKILL stops right after MLflow made what ``point`` creates (the
# CLI otherwise unchanged): argv[1] is the MlflowClient method, the rest the CLI's arguments
KILLED_AFTER = """
import os, signal, sys
from mlflow import MlflowClient
point, argv = sys.argv[1], sys.argv[2:]
real = getattr(MlflowClient, point)
def made_then_killed(self, *args, **kwargs):
    real(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
setattr(MlflowClient, point, made_then_killed)
from feedback_synth.cli.main import main
sys.exit(main(argv))
"""


def _killed_after(point: str, argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER, point, *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _store(folder) -> str:
    return f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}"


def _run_args(output, tiny_generator) -> list[str]:
    args = ["run", "--output", str(output)]
    for s in [*QUICK, f"generate.generator={tiny_generator}"]:
        args += ["--set", s]
    return args


def _assert_one_version(uri: str, name: str, promoted: bool = True) -> None:
    """One version, v1: challenger (and champion if ``promoted``), with its metrics and decision;
    one LoggedModel, READY, with its metrics."""
    client = _client(uri)
    (mv,) = client.search_model_versions(f"name = '{name}'")
    assert mv.version in (1, "1")
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases == ({"champion": "1", "challenger": "1"} if promoted else {"challenger": "1"})
    tags = client.get_model_version(name, "1").tags
    assert tags["promotion.decision"] == ("promoted" if promoted else "rejected")
    assert "metric.few" in tags and "feedback_synth.promotion_key" in tags
    models = [m for e in client.search_experiments() for m in client.search_logged_models([e.experiment_id])]
    assert [(m.model_id, str(m.status.name if hasattr(m.status, "name") else m.status)) for m in models] == [
        (mv.source[len("models:/"):], "READY")]
    assert models[0].tags["promotion.model"] == f"{name}/1"
    assert {m.key for m in models[0].metrics} >= {"test_few", "test_overall"}


# ------------------------------------------------------------------------------ promote, killed


@pytest.mark.slow
@pytest.mark.parametrize("point", ["create_logged_model", "create_model_version"])
def test_promote_killed_mid_way_is_finished_by_the_next_try_on_the_same_version(point, checkpoint, make_report,
                                                                                 tmp_path, capsys):
    """Killed right after the LoggedModel is made (it stays PENDING) or right after the version is
    made (no aliases, no tags yet): the same command again finishes that model and that version,
    instead of a second LoggedModel and a v2 (items 4 and 34)."""
    _, url, _ = checkpoint
    report = tmp_path / "report.json"
    report.write_text(json.dumps(make_report(few=0.4, overall=0.62)))
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    argv = ["promote", "--model", url, "--report", str(report), "--tracking-uri", uri,
            "--set", f"promote.lock_uri=file://{tmp_path}/promote.lock"]
    _killed_after(point, argv)
    client = _client(uri)
    left = [m for e in client.search_experiments() for m in client.search_logged_models([e.experiment_id])]
    assert [m.status.name for m in left] == (["PENDING"] if point == "create_logged_model" else ["READY"])
    if point == "create_model_version":
        assert not client.get_registered_model(MODEL).aliases  # the kill came before the gate

    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["version"] == "1" and result["promoted"]
    _assert_one_version(uri, MODEL)
    assert main(argv) == 0  # and once more, with nothing killed: still v1
    assert json.loads(capsys.readouterr().out)["version"] == "1"
    _assert_one_version(uri, MODEL)


# ------------------------------------------------------------------------------ the CLI refuses early


def test_compare_with_a_mistyped_sqlite_store_creates_nothing(tmp_path, capsys):
    typo = tmp_path / "runz" / "mlflow" / "mlflow.db"
    assert main(["compare", "--tracking-uri", f"sqlite:///{typo}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no MLflow store at" in err[0] and str(typo) in err[0]
    assert not (tmp_path / "runz").exists()


def test_promote_of_a_missing_model_opens_no_run(tmp_path, make_report, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _client(uri).search_experiments()  # an existing store
    report = tmp_path / "report.json"
    report.write_text(json.dumps(make_report(few=0.4, overall=0.62)))
    assert main(["promote", "--model", str(tmp_path / "retraind" / "model"), "--report", str(report),
                 "--tracking-uri", uri]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("feedback-synth")]
    assert len(err) == 1 and "retraind/model does not exist" in err[0]
    client = _client(uri)
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    # a mistyped store folder for promote: refused too, nothing created
    assert main(["promote", "--model", str(tmp_path), "--report", str(report),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"]) == 2
    assert not (tmp_path / "nope").exists()


# ------------------------------------------------------------------------------ a whole run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_generator):
    """A finished, tracked run at test size (its champion is v1), made once per test run (the xdist
    workers share it); tests copy it."""
    from builders import shared_by_workers

    def make(folder):
        out = folder / "run"
        env = dict(os.environ)
        env.pop("MLFLOW_TRACKING_URI", None)
        proc = subprocess.run([sys.executable, "-m", "feedback_synth.cli.main", *_run_args(out, tiny_generator)],
                              env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        client = _client(_store(out))
        if "champion" not in client.get_registered_model(MODEL).aliases:  # the test-size model may fail the gate
            client.set_registered_model_alias(MODEL, "champion", "1")

    return shared_by_workers(tmp_path_factory, "finished-run", make) / "run"


def _copy(run, dest):
    shutil.copytree(run, dest)
    return dest


@pytest.mark.slow
def test_a_run_killed_just_after_registering_resumes_on_that_version(finished_run, tiny_generator, tmp_path):
    """The issue's case through `feedback-synth run`: SIGKILL right after the version is made; the
    re-run finishes v1 (aliases, tags) instead of registering v2."""
    out = _copy(finished_run, tmp_path / "run")
    shutil.rmtree(out / "mlflow")  # a fresh store: only the promotion is left to do
    (out / "report" / "promotion.json").unlink()
    _killed_after("create_model_version", _run_args(out, tiny_generator))
    assert storage.read_json(str(out / "run.json"))["state"] == "running"
    assert main(_run_args(out, tiny_generator)) == 0
    promotion = storage.read_json(str(out / "report" / "promotion.json"))["promotion"]
    assert promotion["version"] == "1"  # promoted or not: the test-size model may not pass the gate
    _assert_one_version(_store(out), MODEL, promotion["promoted"])


@pytest.mark.slow
def test_a_moved_run_folder_still_loads_its_champion(finished_run, tiny_generator, tmp_path):
    """Move a run folder and re-run into it (its store follows it): models:/<name>@champion loads
    from the new place (item 5: the versions' storage locations were left pointing at the old one)."""
    import mlflow

    first = _copy(finished_run, tmp_path / "first")
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    assert main(_run_args(moved, tiny_generator)) == 0  # a resume: every stage done already
    uri = _store(moved)
    (mv,) = _client(uri).search_model_versions(f"name = '{MODEL}'")
    # ``storage_location`` is not on the entity: read it where MLflow reads it, in the store
    import sqlite3

    with sqlite3.connect(moved / "mlflow" / "mlflow.db") as db:
        (location,) = db.execute("SELECT storage_location FROM model_versions").fetchone()
    assert location.startswith((moved / "mlflow" / "artifacts").as_uri()), location
    mlflow.set_tracking_uri(uri)  # conftest puts the global URIs back afterwards
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert model.predict(np.zeros((2, 1, 16, 16), np.float32)).shape == (2, 10)


@pytest.mark.slow
def test_a_resume_refused_for_a_code_change_leaves_run_json_as_it_was(finished_run, tiny_generator, tmp_path,
                                                                       capsys, monkeypatch):
    from feedback_synth import fingerprints

    out = _copy(finished_run, tmp_path / "run")
    before = (out / "run.json").read_bytes()
    monkeypatch.setattr(fingerprints, "code_version", lambda: "0.1.0+otherthing")  # as after an edit or upgrade
    assert main(_run_args(out, tiny_generator)) == 2
    assert "code version" in capsys.readouterr().err
    assert (out / "run.json").read_bytes() == before  # still the finished run's record (item 36)
