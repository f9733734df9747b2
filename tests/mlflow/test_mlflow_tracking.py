"""MLflowTracker against a real ``mlflow server`` on loopback (SQLite backend, proxied artifacts):
runs, params, metric curves, artifacts, the logged model (no pickle) and the CLI verbs; and the
failure modes: no server at start, a server that dies mid-run."""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

import numpy as np
import pytest
import torch

from feedback_synth import cli
from feedback_synth.config import PromoteConfig, TrackingConfig
from feedback_synth.errors import TrackingError
from feedback_synth.registry.register import register_and_promote
from feedback_synth.tracking.client import resolve_tracking_uri
from feedback_synth.tracking.mlflow_tracker import MLflowTracker
from feedback_synth.training.classifier import load_classifier, save_classifier


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _cfg(server, **kw) -> TrackingConfig:
    return TrackingConfig(tracking_uri=server.url, experiment=f"exp-{uuid.uuid4().hex[:8]}", retries=1, **kw)


@pytest.fixture
def global_uri():
    """Point MLflow's global URIs at a server for loading by models:/ URI; restore afterwards."""
    import mlflow

    old = mlflow.get_tracking_uri(), mlflow.get_registry_uri()

    def set_uri(url):
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)

    yield set_uri
    mlflow.set_tracking_uri(old[0])
    mlflow.set_registry_uri(old[1])


# ------------------------------------------------------------------------------ where the store is


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts = resolve_tracking_uri(TrackingConfig(), str(tmp_path / "run"))
    assert uri == f"sqlite:///{tmp_path}/run/mlflow/mlflow.db" and artifacts == f"{tmp_path}/run/mlflow/artifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(TrackingConfig(), str(tmp_path / "run")) == ("http://mlflow.example:5000", None)
    cfg = TrackingConfig(tracking_uri="postgresql+psycopg2://u@db/mlflow")
    assert resolve_tracking_uri(cfg, "gs://bucket/run")[0] == "postgresql+psycopg2://u@db/mlflow"


def test_unreachable_server_fails_at_start_quickly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    tracker = MLflowTracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}", retries=2), str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracker.start("r", {})
    elapsed = time.monotonic() - t0
    assert 2.5 < elapsed < 15, elapsed  # 3 tries with 1 s + 2 s waits between them
    msg = str(err.value)
    assert f"http://127.0.0.1:{port} cannot be reached" in msg and "tried 3 times" in msg
    assert "tracking.enabled=false" in msg


# ------------------------------------------------------------------------------ runs


@pytest.mark.mlflow_server
def test_parent_run_and_nested_stage_runs(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("KFP_RUN_ID", "kfp-run-42")
    cfg = _cfg(mlflow_server)
    tracker = MLflowTracker(cfg, str(tmp_path))
    config = {"train": {"epochs": 2, "lr": 0.05, "model": "test_resnet"}, "data": {"dataset": "digits-lt"}}
    tracker.start("run-a", config)
    grid = tmp_path / "samples.png"
    grid.write_bytes(b"\x89PNG fake")
    with tracker.stage("train_baseline", config["train"]) as log:
        for epoch in range(3):
            log.log_metrics({"epoch": epoch, "loss": 1.0 / (epoch + 1), "lr": None, "per_class": [1, 2],
                             "note": "skipped", "ok": True, "n": np.int64(3)}, step=epoch)
        log.log_artifact_url(str(grid))
        log.log_artifact_url(str(tmp_path / "missing.png"))  # warned about, not fatal
    log.log_metrics({"overall": 0.5, "few": None}, prefix="test_")  # after the stage closed (run.py does)
    tracker.log_metrics({"baseline_overall": 0.5, "retrained_overall": 0.55})
    tracker.log_text("hello", "notes/readme.txt")
    tracker.finish("FINISHED")

    client = _client(mlflow_server.url)
    parent = client.get_run(tracker.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "run-a"
    assert parent.data.tags["kfp.run_id"] == "kfp-run-42"
    assert parent.data.params["train.epochs"] == "2" and parent.data.params["data.dataset"] == "digits-lt"
    assert parent.data.metrics["retrained_overall"] == 0.55
    assert {f.path for f in client.list_artifacts(tracker.run_id)} >= {"config.yaml", "notes"}
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{tracker.run_id}'")
    assert [c.info.run_name for c in children] == ["train_baseline"]
    child = children[0]
    assert child.info.status == "FINISHED" and child.data.tags["feedback_synth.stage"] == "train_baseline"
    assert child.data.params == {"epochs": "2", "lr": "0.05", "model": "test_resnet"}
    history = client.get_metric_history(child.info.run_id, "loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.333)]
    assert child.data.metrics["test_overall"] == 0.5 and child.data.metrics["ok"] == 1.0
    assert not {"lr", "per_class", "note", "test_few"} & set(child.data.metrics)
    assert [f.path for f in client.list_artifacts(child.info.run_id)] == ["samples.png"]


@pytest.mark.mlflow_server
def test_attached_tracker_leaves_the_parent_open(mlflow_server, tmp_path):
    cfg = _cfg(mlflow_server)
    owner = MLflowTracker(cfg, str(tmp_path))
    owner.start("pipeline", {})
    pod = MLflowTracker(cfg, str(tmp_path), parent_run_id=owner.run_id)  # a KFP component in its own pod
    pod.start("ignored", {})
    assert pod.run_id == owner.run_id
    with pod.stage("generate", {"shard": 0}) as log:
        log.log_metrics({"generated_images": 64})
    with pytest.raises(ValueError):
        with pod.stage("filter", {}):
            raise ValueError("boom")
    pod.finish("FINISHED")
    client = _client(mlflow_server.url)
    assert client.get_run(owner.run_id).info.status == "RUNNING"
    runs = {r.info.run_name: r for r in client.search_runs(
        [owner.experiment_id], f"tags.mlflow.parentRunId = '{owner.run_id}'")}
    assert runs["generate"].info.status == "FINISHED" and runs["filter"].info.status == "FAILED"
    owner.finish("FAILED")
    assert client.get_run(owner.run_id).info.status == "FAILED"
    with pytest.raises(TrackingError, match="parent MLflow run nope not found"):
        MLflowTracker(cfg, str(tmp_path), parent_run_id="nope").start("x", {})


# ------------------------------------------------------------------------------ the model


@pytest.mark.mlflow_server
def test_logged_model_loads_by_alias_without_pickle(mlflow_server, checkpoint, model_name, make_report, tmp_path,
                                                    global_uri):
    import mlflow

    clf, url, images = checkpoint
    tracker = MLflowTracker(_cfg(mlflow_server, registered_model=model_name), str(tmp_path))
    tracker.start("run", {})
    with tracker.stage("promote", {}) as log:
        result = register_and_promote(tracker, url, make_report(few=0.3, overall=0.61), PromoteConfig(), run_id=log.run_id)
    tracker.finish()
    assert result["promoted"] and result["version"] == "1" and result["model_name"] == model_name

    global_uri(mlflow_server.url)
    uri = f"models:/{model_name}@champion"
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 16, 16)
    assert info.signature.outputs.inputs[0].shape == (-1, 10)
    with torch.no_grad():
        expected = clf(torch.from_numpy(images)).numpy()
    got = mlflow.pyfunc.load_model(uri).predict(images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert (got.argmax(1) == expected.argmax(1)).all()

    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl"))
    files = {os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs}
    assert {"MLmodel", "input_example.json", "feedback_synth_classifier.py",
            "artifacts/checkpoint/model.safetensors", "artifacts/checkpoint/config.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))], files
    mlmodel = open(os.path.join(local, "MLmodel")).read()
    # models-from-code: the loader runs the code file; a pickled PythonModel would be python_model.pkl
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and ".pkl" not in mlmodel


# ------------------------------------------------------------------------------ CLI verbs


@pytest.mark.mlflow_server
def test_cli_promote_and_compare(mlflow_server, checkpoint, model_name, make_report, tmp_path, capsys):
    _, url, _ = checkpoint
    reports = tmp_path / "better.json", tmp_path / "worse.json"
    reports[0].write_text(json.dumps(make_report(few=0.4, overall=0.62)))
    reports[1].write_text(json.dumps(make_report(few=0.35, overall=0.63)))
    common = ["--tracking-uri", mlflow_server.url, "--registered-model", model_name,
              "--set", f"promote.lock_uri=file://{tmp_path}/promote.lock"]
    assert cli.main(["promote", "--model", url, "--report", str(reports[0]), *common]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["promoted"] and first["version"] == "1"
    assert cli.main(["promote", "--model", url, "--report", str(reports[1]), "--result",
                     str(tmp_path / "decision.json"), *common]) == 0
    second = json.loads(capsys.readouterr().out)
    assert not second["promoted"] and second["champion_version"] == "1" and "few 0.4000 -> 0.3500" in second["reason"]
    assert json.loads((tmp_path / "decision.json").read_text()) == second

    assert cli.main(["compare", "--model", model_name, "--tracking-uri", mlflow_server.url]) == 0
    out = capsys.readouterr().out
    assert "champion v1" in out and "challenger v2" in out
    row = next(line for line in out.splitlines() if line.startswith("few "))
    assert row.split() == ["few", "0.4000", "0.3500", "-0.0500"]
    assert "challenger v2: rejected" in out
    assert cli.main(["compare", "--model", model_name, "--tracking-uri", mlflow_server.url, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["champion"]["version"] == "1" and data["challenger"]["metrics"]["overall"] == 0.63

    assert cli.main(["compare", "--model", "no-such-model", "--tracking-uri", mlflow_server.url]) == 2
    assert "no registered model 'no-such-model'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the server goes away


@pytest.mark.mlflow_server
def test_server_stopped_mid_run_fails_clearly_and_keeps_the_model(doomed_mlflow_server, checkpoint, make_report,
                                                                   tmp_path):
    clf, _, images = checkpoint
    out = tmp_path / "run"
    tracker = MLflowTracker(_cfg(doomed_mlflow_server, registered_model="doomed"), str(out))
    tracker.start("doomed", {})
    with tracker.stage("retrain", {"epochs": 1}) as log:
        save_classifier(clf, str(out / "retrained" / "model"))  # stages write their outputs first
        log.log_metrics({"loss": 0.5}, step=0)
    doomed_mlflow_server.stop()

    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        with tracker.stage("promote", {}) as log:
            register_and_promote(tracker, str(out / "retrained" / "model"), make_report(0.3, 0.6), PromoteConfig(), run_id=log.run_id)
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert doomed_mlflow_server.url in msg and "2 times" in msg and f"outputs are kept in {out}" in msg
    tracker.finish("FAILED")  # best effort: does not raise over the original error
    kept = load_classifier(str(out / "retrained" / "model"))
    with torch.no_grad():
        np.testing.assert_array_equal(kept(torch.from_numpy(images)).numpy(), clf(torch.from_numpy(images)).numpy())
