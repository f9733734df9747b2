"""A run owns its output folder, and only what it wrote there: the lock, --overwrite, a code change
between runs, a full disk (issue: the faults of an adversarial run), through the command line."""
from __future__ import annotations

import errno
import os

import pytest

from feedback_synth import storage
from feedback_synth.cli.main import main
from feedback_synth.orchestration.shared import STAGE_FOLDERS

QUICK = ["train.model=test_resnet", "train.epochs=1", "retrain.epochs=1", "feedback.budget_fraction=0.1",
         "feedback.shard_size=64", "generate.num_inference_steps=2", "generate.criterion=none",
         "filter.filters=[degenerate]"]


def _run(output, tiny_generator, *extra, tracking=False):
    args = ["run", "--output", str(output)]
    for s in [*QUICK, f"generate.generator={tiny_generator}", f"tracking.enabled={str(tracking).lower()}", *extra]:
        args += ["--set", s]
    return main(args)


def _overwrite_args(out, tiny_generator):
    args = ["run", "--output", str(out), "--overwrite"]
    for s in [*QUICK, "train.epochs=2", f"generate.generator={tiny_generator}", "tracking.enabled=false"]:
        args += ["--set", s]
    return args


@pytest.mark.slow
def test_overwrite_keeps_the_users_files_in_every_stage_folder(tmp_path, tiny_generator, capsys):
    out = tmp_path / "proj"
    assert _run(out, tiny_generator) == 0
    user_files = [out / name / "NOTES.md" for name in STAGE_FOLDERS if name != "rounds"]
    user_files += [out / "report" / "q3.md", out / "data" / "mine" / "train" / "a.png"]
    for f in user_files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("mine")
    assert main(_overwrite_args(out, tiny_generator)) == 0, capsys.readouterr().err
    for f in user_files:
        assert f.read_text() == "mine", f
    assert (out / "baseline" / "model" / "model.safetensors").is_file()  # the new run's outputs are there
    assert storage.read_yaml(str(out / "config.yaml"))["train"]["epochs"] == 2


def test_a_first_run_into_a_folder_with_the_users_files_where_a_run_writes_is_refused(tmp_path, tiny_generator,
                                                                                     capsys):
    out = tmp_path / "proj"
    mine = out / "data" / "mine" / "train" / "3" / "a.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"png")
    assert _run(out, tiny_generator) == 2
    err = capsys.readouterr().err
    assert "holds no run, but its folder data/mine/train/3/a.png" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["data/mine/train/3/a.png"]


def test_a_second_run_into_a_locked_output_stops_at_once(tmp_path, tiny_generator, capsys):
    from filelock import FileLock

    from feedback_synth.orchestration.run import LOCK_FILE

    out = tmp_path / "out"
    out.mkdir()
    with FileLock(str(out / LOCK_FILE)):  # another process writes this folder
        assert _run(out, tiny_generator) == 2
    err = capsys.readouterr().err
    assert "is being written by another feedback-synth process" in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing else was written (the lock is the other process's)


def test_a_preflight_failure_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["run", "--output", str(out), "--set", "generate.generator=/no/such/generator"]) == 2
    assert "generator model folder not found" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_a_resume_after_a_code_change_is_refused_and_says_why(tmp_path, tiny_generator, capsys, monkeypatch):
    from feedback_synth import fingerprints

    out = tmp_path / "run"
    assert _run(out, tiny_generator) == 0
    capsys.readouterr()
    monkeypatch.setattr(fingerprints, "code_version", lambda: "0.1.0+otherthing")  # as after an edit or upgrade
    assert _run(out, tiny_generator) == 2
    err = capsys.readouterr().err
    assert "code version" in err and "-> 0.1.0+otherthing" in err and "--overwrite" in err
    assert main(_overwrite_args(out, tiny_generator)) == 0  # --overwrite redoes it with the new code
    marker = storage.read_json(str(out / "baseline" / "_STAGE.json"))
    assert marker["version"] == "0.1.0+otherthing"


def test_the_code_version_is_a_digest_of_the_source():
    from feedback_synth import __version__
    from feedback_synth.fingerprints import code_version

    version = code_version()
    assert version.startswith(__version__ + "+") and len(version.split("+")[1]) == 12


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_closes_the_runs(tmp_path, tiny_generator, capsys, monkeypatch):
    """The disk fills up while the baseline is saved: one line naming the output, the MLflow runs
    closed FAILED, no temporary file left."""
    from mlflow import MlflowClient

    from feedback_synth.training import classifier

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(classifier, "save_classifier", full)
    out = tmp_path / "run"
    assert _run(out, tiny_generator, tracking=True) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("feedback-synth: error: no space left on the device of") and str(out) in err[-1]
    assert storage.read_json(str(out / "run.json"))["state"] == "failed"
    assert not [p for p in out.rglob("*.tmp-*")]
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "feedback-synth"]
    statuses = {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id])}
    assert statuses == {"run": "FAILED", "prepare_data": "FINISHED", "train_baseline": "FAILED"}  # none left RUNNING


@pytest.mark.slow
def test_mlflow_artifacts_stay_under_the_output_whatever_its_path_holds_and_wherever_it_moves(tmp_path,
                                                                                               tiny_generator):
    import shutil

    out = tmp_path / "out dir é#%"
    assert _run(out, tiny_generator, tracking=True) == 0
    assert not (tmp_path / "out dir é").exists()  # '#' is not a URI fragment here
    first = len(list((out / "mlflow" / "artifacts").rglob("report.md")))
    assert first
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    args = ["run", "--output", str(moved), "--overwrite"]
    for s in [*QUICK, "train.epochs=2", f"generate.generator={tiny_generator}", "tracking.enabled=true"]:
        args += ["--set", s]
    assert main(args) == 0
    assert not out.exists()  # nothing written to where the folder used to be
    assert len(list((moved / "mlflow" / "artifacts").rglob("report.md"))) == 2 * first  # the new run's are here too


@pytest.mark.slow
def test_an_unreachable_tracking_server_stops_the_run_at_preflight_and_leaves_no_folder(tmp_path, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    out = tmp_path / "run"
    assert main(["run", "--output", str(out), "--set", f"tracking.tracking_uri=http://127.0.0.1:{port}",
                 "--set", "tracking.retries=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"http://127.0.0.1:{port} cannot be reached" in err[0]
    assert not out.exists()


def test_overwrite_removes_the_kfp_local_task_records_too(tmp_path):
    """Issue 23: --overwrite treats a kfp-local run's folder as an in-process one's: the KFP local
    runner's task records (kfp/feedback-synth-<timestamp>/) go; a folder of the user's under kfp/ stays."""
    from feedback_synth.orchestration.run import remove_run_outputs

    record = tmp_path / "kfp" / "feedback-synth-2026-12-05-00-03-03-189859" / "prepare-data"
    record.mkdir(parents=True)
    (record / "executor_output.json").write_text("{}")
    mine = tmp_path / "kfp" / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("keep me")
    removed = remove_run_outputs(str(tmp_path))
    assert str(tmp_path / "kfp" / "feedback-synth-2026-12-05-00-03-03-189859") in removed
    assert not (tmp_path / "kfp" / "feedback-synth-2026-12-05-00-03-03-189859").exists()
    assert (mine / "todo.txt").read_text() == "keep me"
    remove_run_outputs(str(tmp_path / "nothing-here"))  # no kfp/ folder: nothing to do


@pytest.mark.slow
def test_a_moved_run_with_an_adapted_generator_resumes_every_stage(tmp_path, tiny_generator):
    """Fingerprints hold digests of what a stage read, not where it lay: a run folder moved (or
    synced to another bucket) resumes, generation included, whose generator is the run's own
    ``adapted/generator``."""
    import json
    import shutil

    adapt = ["adapt.method=full", "adapt.steps=2", "adapt.batch_size=8", "adapt.samples_per_class=1"]
    out = tmp_path / "run"
    assert _run(out, tiny_generator, *adapt) == 0
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    markers = sorted(moved.rglob("_STAGE.json")) + sorted(moved.rglob("_SUCCESS"))
    assert any("generated" in p.parts for p in markers) and any("adapted" in p.parts for p in markers)
    before = {p: p.read_bytes() for p in markers}
    assert _run(moved, tiny_generator, *adapt) == 0
    redone = [str(p.relative_to(moved)) for p in markers if p.read_bytes() != before[p]]
    assert redone == []
    assert json.loads((moved / "run.json").read_text())["state"] == "finished"
