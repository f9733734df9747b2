"""MLflowTracker against a real ``mlflow server`` on loopback (SQLite backend, proxied artifacts):
runs, params, metric curves, artifacts, the experiment kind, datasets, the LoggedModel (no pickle)
with its metrics, the registered version and the CLI verbs; and the failure modes: no server at
start, a server that dies mid-run, creates whose responses are lost."""
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
from feedback_synth.registry.gate import model_id_of
from feedback_synth.registry.register import register_and_promote
from feedback_synth.tracking.base import NullTracker
from feedback_synth.tracking.client import resolve_tracking_uri, total_wait_s
from feedback_synth.tracking.datasets import log_split_datasets, log_synthetic_dataset
from feedback_synth.tracking.mlflow_tracker import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MLflowTracker
from feedback_synth.training.classifier import load_classifier, save_classifier


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _cfg(server, **kw) -> TrackingConfig:
    return TrackingConfig(tracking_uri=server.url, experiment=f"exp-{uuid.uuid4().hex[:8]}", retries=1, **kw)


@pytest.fixture
def global_uri():
    """Point MLflow's global URIs at a server for loading by models:/ URI (conftest's autouse
    ``_mlflow_globals_restored`` puts them, and their environment variables, back afterwards)."""
    import mlflow

    def set_uri(url):
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)

    return set_uri


# ------------------------------------------------------------------------------ where the store is


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts = resolve_tracking_uri(TrackingConfig(), str(tmp_path / "run"))
    assert uri == f"sqlite:///{tmp_path}/run/mlflow/mlflow.db" and artifacts == f"{tmp_path}/run/mlflow/artifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(TrackingConfig(), str(tmp_path / "run")) == ("http://mlflow.example:5000", None)
    cfg = TrackingConfig(tracking_uri="postgresql+psycopg2://u@db/mlflow")
    assert resolve_tracking_uri(cfg, "gs://bucket/run")[0] == "postgresql+psycopg2://u@db/mlflow"


@pytest.mark.slow
def test_unreachable_server_fails_at_start_quickly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    tracker = MLflowTracker(TrackingConfig(tracking_uri=f"http://127.0.0.1:{port}", retries=2), str(tmp_path))
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as err:
        tracker.start("r", {})
    elapsed = time.monotonic() - t0
    # MLflow's own retries: 3 tries, urllib3 waiting 0 s then 6 s (+ up to 1 s jitter each)
    assert total_wait_s(2) - 1 < elapsed < total_wait_s(2) + 6, elapsed
    assert total_wait_s(3) == 18  # the default tracking.retries=3: ~18 s
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
    # the 3.x UI opens the experiment on its runs, not on the GenAI overview
    assert client.get_experiment(parent.info.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
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


@pytest.mark.mlflow_server
def test_an_existing_experiment_is_tagged_at_first_use(mlflow_server, tmp_path):
    cfg = _cfg(mlflow_server)
    client = _client(mlflow_server.url)
    exp_id = client.create_experiment(cfg.experiment)  # made by something else, untagged
    tracker = MLflowTracker(cfg, str(tmp_path))
    tracker.start("r", {})
    tracker.finish()
    assert tracker.experiment_id == exp_id
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


# ------------------------------------------------------------------------------ datasets


@pytest.mark.mlflow_server
def test_datasets_are_mlflow_datasets_of_the_stage_and_the_parent(mlflow_server, prepared_dataset, tmp_path):
    from feedback_synth.data.imageset import ImageSet, load_split

    filtered = tmp_path / "filtered"
    load_split(prepared_dataset, "pool").subset(np.arange(12)).save(str(filtered / "synthetic.npz"))
    plan = tmp_path / "plan.json"
    plan.write_text('{"target": 30}')
    # tracking off: nothing is read or logged
    assert log_split_datasets(NullTracker(), prepared_dataset, ["train"]) == []
    assert log_synthetic_dataset(NullTracker(), str(filtered), str(plan), {}) == []

    tracker = MLflowTracker(_cfg(mlflow_server), str(tmp_path))
    tracker.start("run", {})
    with tracker.stage("train_baseline", {}) as log:
        logged = log_split_datasets(log, prepared_dataset, ["train", "val", "test"])
    with tracker.stage("retrain", {}) as log:
        log_split_datasets(log, prepared_dataset, ["train", "val", "test"])
        synthetic = log_synthetic_dataset(log, str(filtered), str(plan), {"guidance_scale": 2.0, "steps": 20},
                                          dataset_name="digits-lt")
    tracker.finish()
    assert [(d["name"], d["context"]) for d in logged] == [
        ("digits-lt/train", "training"), ("digits-lt/val", "validation"), ("digits-lt/test", "testing")]
    assert synthetic[0]["name"] == "digits-lt/synthetic" and synthetic[0]["context"] == "training"

    client = _client(mlflow_server.url)
    runs = {r.info.run_name: r for r in client.search_runs([tracker.experiment_id])}
    stage = {i.dataset.name: i for i in runs["retrain"].inputs.dataset_inputs}
    assert set(stage) == {"digits-lt/train", "digits-lt/val", "digits-lt/test", "digits-lt/synthetic"}
    train = stage["digits-lt/train"]
    assert train.dataset.digest == logged[0]["digest"] and len(train.dataset.digest) == 16
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    assert json.loads(train.dataset.source)["uri"].endswith("train.npz") and train.dataset.source_type == "local"
    profile = json.loads(train.dataset.profile)
    assert profile["features_shape"] == list(load_split(prepared_dataset, "train").images.shape)
    source = json.loads(stage["digits-lt/synthetic"].dataset.source)["tags"]
    assert source["plan"] == str(plan) and source["generate_config"] == {"guidance_scale": 2.0, "steps": 20}
    assert len(source["plan_digest"]) == 16
    # the parent run names them too, once each although two stages read them
    parent = [i.dataset.name for i in client.get_run(tracker.run_id).inputs.dataset_inputs]
    assert sorted(parent) == sorted(stage)
    # a different split is a different digest
    assert len({d["digest"] for d in logged}) == 3
    assert ImageSet.load(str(filtered / "synthetic.npz")).images.shape[0] == 12


# ------------------------------------------------------------------------------ the model


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_logged_model_with_metrics_datasets_and_version(mlflow_server, checkpoint, prepared_dataset, model_name,
                                                        make_report, tmp_path, global_uri):
    import mlflow

    clf, url, images = checkpoint
    tracker = MLflowTracker(_cfg(mlflow_server, registered_model=model_name), str(tmp_path))
    tracker.start("run", {})
    with tracker.stage("retrain", {}) as log:
        (test,) = log_split_datasets(log, prepared_dataset, ["test"])
    report = make_report(few=0.3, overall=0.61)
    with tracker.stage("promote", {}) as log:
        result = register_and_promote(tracker, url, report, PromoteConfig(), run_id=log.run_id)
        promote_run = log.run_id
    tracker.finish()
    assert result["promoted"] and result["version"] == "1" and result["model_name"] == model_name

    client = _client(mlflow_server.url)
    # the LoggedModel: in the run's experiment, made by the promote run, READY, with the test
    # metrics on the test dataset (found without it being named: the parent run's test split)
    (model,) = client.search_logged_models([tracker.experiment_id])
    assert model.model_id == result["model_id"] and model.name == "classifier" and model.model_type == "classifier"
    assert model.source_run_id == promote_run and str(model.status) in ("READY", "LoggedModelStatus.READY")
    metrics = {m.key: m for m in model.metrics}
    assert {k: m.value for k, m in metrics.items()} == {f"test_{k}": v for k, v in report["retrained"].items()}
    assert {(m.dataset_name, m.dataset_digest) for m in metrics.values()} == {("digits-lt/test", test["digest"])}
    assert model.params["data.dataset"] == "digits-lt" and model.params["classifier.model"] == "test_resnet"
    assert model.tags["promotion.decision"] == "promoted" and model.tags["promotion.model"] == f"{model_name}/1"
    # what the UI lists as the model's registered versions (written by the server, or by us for a local store)
    versions = json.loads(model.tags["mlflow.modelVersions"])
    assert [(v["name"], str(v["version"])) for v in versions] == [(model_name, "1")]
    # (MLflow 3.17's server matches no model when the dataset has no digest: name both)
    test_set = [{"dataset_name": "digits-lt/test", "dataset_digest": test["digest"]}]
    by_dataset = client.search_logged_models([tracker.experiment_id], datasets=test_set)
    assert [m.model_id for m in by_dataset] == [model.model_id]
    assert [m.model_id for m in client.search_logged_models(
        [tracker.experiment_id], filter_string="metrics.test_few > 0.25", datasets=test_set)] == [model.model_id]
    assert not client.search_logged_models([tracker.experiment_id], filter_string="metrics.test_few > 0.5")
    assert not client.search_logged_models([tracker.experiment_id], datasets=[
        {"dataset_name": "digits-lt/train", "dataset_digest": test["digest"]}])
    # the runs list it as their output ("Logged models"); the promote run names the test dataset
    for run_id in (promote_run, tracker.run_id):
        assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [model.model_id]
    assert [i.dataset.name for i in client.get_run(promote_run).inputs.dataset_inputs] == ["digits-lt/test"]
    # the registered version points at the LoggedModel
    mv = client.get_model_version(model_name, "1")
    assert mv.source == f"models:/{model.model_id}" and model_id_of(mv) == model.model_id
    assert mv.model_id in (None, model.model_id)  # MLflow 3.17's SQL registry does not store it
    assert mv.run_id == promote_run and mv.tags["metric.few"] == "0.3"

    global_uri(mlflow_server.url)
    uri = f"models:/{model_name}@champion"
    info = mlflow.models.get_model_info(uri)
    assert info.model_id == model.model_id and info.run_id == promote_run
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 16, 16)
    assert info.signature.outputs.inputs[0].shape == (-1, 10)
    with torch.no_grad():
        expected = clf(torch.from_numpy(images)).numpy()
    got = mlflow.pyfunc.load_model(uri).predict(images)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(images), expected,
                               rtol=0, atol=1e-6)

    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl"))
    files = {os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs}
    assert {"MLmodel", "input_example.json", "feedback_synth_classifier.py",
            "artifacts/checkpoint/model.safetensors", "artifacts/checkpoint/config.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth", ".cloudpickle"))], files
    mlmodel = open(os.path.join(local, "MLmodel")).read()
    # models-from-code: the loader runs the code file; a pickled PythonModel would be python_model.pkl
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and ".pkl" not in mlmodel
    assert f"model_id: {model.model_id}" in mlmodel


@pytest.mark.mlflow_server
def test_lost_responses_never_create_twice(mlflow_server, checkpoint, model_name, make_report, tmp_path):
    """Each non-idempotent create goes out once; when its response is lost (the server did create),
    the retry finds what it made instead of making a second run, LoggedModel or version."""
    from mlflow.exceptions import MlflowException

    _, url, _ = checkpoint
    tracker = MLflowTracker(_cfg(mlflow_server, registered_model=model_name), str(tmp_path))
    tracker.start("run", {})
    raw, lost = tracker.client.raw, []
    for name in ("create_run", "create_logged_model", "create_model_version"):
        def lose_first_response(*a, _real=getattr(raw, name), _name=name, **kw):
            out = _real(*a, **kw)
            if _name not in lost:
                lost.append(_name)
                raise MlflowException(f"API request to {mlflow_server.url} failed with exception Read timed out.")
            return out
        setattr(raw, name, lose_first_response)
    with tracker.stage("promote", {}) as log:
        result = register_and_promote(tracker, url, make_report(0.3, 0.61), PromoteConfig(), run_id=log.run_id)
    tracker.finish()
    assert lost == ["create_run", "create_logged_model", "create_model_version"]
    client = _client(mlflow_server.url)
    assert [r.info.run_name for r in client.search_runs([tracker.experiment_id])] == ["promote", "run"]
    assert len(client.search_logged_models([tracker.experiment_id])) == 1
    assert [v.version for v in client.search_model_versions(f"name = '{model_name}'")] == ["1"]
    assert result["version"] == "1" and result["promoted"]


# ------------------------------------------------------------------------------ CLI verbs


def _decision_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if ": promoted (" in line or ": rejected (" in line]


@pytest.mark.mlflow_server
@pytest.mark.slow
def test_cli_promote_and_compare(mlflow_server, checkpoint, prepared_dataset, model_name, make_report, tmp_path,
                                 capsys):
    _, url, _ = checkpoint
    reports = {}
    for label, (few, overall) in {"first": (0.4, 0.62), "worse": (0.35, 0.63), "better": (0.45, 0.63)}.items():
        reports[label] = tmp_path / f"{label}.json"
        reports[label].write_text(json.dumps(make_report(few=few, overall=overall)))
    common = ["--tracking-uri", mlflow_server.url, "--registered-model", model_name,
              "--set", f"promote.lock_uri=file://{tmp_path}/promote.lock"]
    compare = ["compare", "--model", model_name, "--tracking-uri", mlflow_server.url]
    assert cli.main(["promote", "--model", url, "--report", str(reports["first"]), "--dataset", prepared_dataset,
                     *common]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["promoted"] and first["version"] == "1" and first["model_id"].startswith("m-")

    # the first champion: nothing earlier to compare with
    assert cli.main(compare) == 0
    out = capsys.readouterr().out
    assert "the first champion (promoted vs baseline of the same run)" in out
    assert len(_decision_lines(out)) == 1 and f"logged models: v1 {first['model_id']}" in out

    assert cli.main(["promote", "--model", url, "--report", str(reports["worse"]), "--result",
                     str(tmp_path / "decision.json"), *common]) == 0
    second = json.loads(capsys.readouterr().out)
    assert not second["promoted"] and second["champion_version"] == "1" and "few 0.4000 -> 0.3500" in second["reason"]
    assert json.loads((tmp_path / "decision.json").read_text()) == second

    # after a rejection: the champion vs the latest challenger
    assert cli.main(compare) == 0
    out = capsys.readouterr().out
    assert "the champion vs the latest challenger (rejected)" in out
    row = next(line for line in out.splitlines() if line.startswith("few "))
    assert row.split() == ["few", "0.4000", "0.3500", "-0.0500"]
    lines = _decision_lines(out)
    assert len(lines) == 2 and lines[0].startswith("champion v1: promoted (vs baseline")
    assert lines[1].startswith("challenger v2: rejected (vs champion v1: fails: few 0.4000 -> 0.3500")
    assert cli.main([*compare, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "champion_vs_challenger" and data["champion"]["version"] == "1"
    assert data["challenger"]["metrics"]["overall"] == 0.63 and data["delta"]["few"] == pytest.approx(-0.05)

    assert cli.main(["promote", "--model", url, "--report", str(reports["better"]), *common]) == 0
    third = json.loads(capsys.readouterr().out)
    assert third["promoted"] and third["version"] == "3" and third["reference"] == "champion v1"

    # after a promotion (champion == challenger): the new champion vs the champion it replaced
    assert cli.main(compare) == 0
    out = capsys.readouterr().out
    assert "the champion v3 vs the champion it replaced, v1" in out and "challenger v3, champion v3" in out
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "previous", "champion", "v1", "champion", "v3", "delta"]
    row = next(line for line in out.splitlines() if line.startswith("few "))
    assert row.split() == ["few", "0.4000", "0.4500", "+0.0500"]
    lines = _decision_lines(out)
    assert len(lines) == 2, out  # each version's decision once
    assert lines[0].startswith("previous champion v1: promoted (vs baseline")
    assert lines[1].startswith("champion v3: promoted (vs champion v1: passes: few 0.4000 -> 0.4500")
    assert "+0.0000" not in row

    # any two
    assert cli.main([*compare, "--versions", "2", "3"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("few "))
    assert row.split() == ["few", "0.3500", "0.4500", "+0.1000"] and "v2 vs v3" in out
    assert len(_decision_lines(out)) == 2

    assert cli.main(["compare", "--model", "no-such-model", "--tracking-uri", mlflow_server.url]) == 2
    assert "no registered model 'no-such-model'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the server goes away


@pytest.mark.mlflow_server
@pytest.mark.slow
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
    kept = load_classifier(str(out / "retrained" / "model"), "cpu")
    with torch.no_grad():
        np.testing.assert_array_equal(kept(torch.from_numpy(images)).numpy(), clf(torch.from_numpy(images)).numpy())
