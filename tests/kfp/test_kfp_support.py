"""The plumbing of the KFP components (feedback_synth_kfp: artifacts, parameters, tracking) and of the kfp-local runner's
parameters, in process: locations, configs, MLflow parent/nested runs and promotion."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from kfp import dsl

from feedback_synth.config import RunConfig, TrainConfig
from feedback_synth.errors import ConfigError
from feedback_synth.stages.result import StageResult
from feedback_synth_kfp import artifacts
from feedback_synth_kfp import tracking as kfp_tracking
from feedback_synth_kfp.parameters import pipeline_arguments, run_config_from_parameters


def test_stage_output_url_workspace_or_artifact(tmp_path):
    art = dsl.Dataset(name="data", uri=str(tmp_path / "artifact"), metadata={})
    assert artifacts.stage_output_url(art, "", "run-1", "data") == str(tmp_path / "artifact")
    assert artifacts.stage_output_url(art, "gs://bucket/fs/", "run-1", "generated") == "gs://bucket/fs/run-1/generated"
    with pytest.raises(ConfigError, match="run id"):
        artifacts.stage_output_url(art, "gs://bucket/fs", "", "data")


def test_publish_records_the_real_location(tmp_path):
    art = dsl.Model(name="baseline", uri=str(tmp_path / "a"), metadata={})
    artifacts.publish(art, str(tmp_path / "a"), seconds=1.5, fidelity=None)
    assert artifacts.artifact_url(art) == str(tmp_path / "a") and art.metadata == {"seconds": 1.5}
    artifacts.publish(art, "gs://bucket/fs/run-1/baseline", model="resnet10t")
    assert artifacts.artifact_url(art) == "gs://bucket/fs/run-1/baseline"
    assert artifacts.unique(["a", "b", "a"]) == ["a", "b"]


def test_the_config_parameter_is_checked_and_named_parameters_apply_over_it():
    # a named parameter that differs from its default wins over ``config``; one left at its default
    # (resnet10t) leaves ``config``'s value in force
    cfg = run_config_from_parameters({"config": '{"train": {"epochs": 3, "model": "test_resnet"}}',
                                      "classifier_model": "resnet10t", "scale": 0.1})
    assert cfg.train.epochs == 3 and cfg.train.model == "test_resnet" and cfg.generate.scale == 0.1
    cfg = run_config_from_parameters({"config": '{"train": {"model": "test_resnet"}}', "classifier_model": "resnet18"})
    assert cfg.train.model == "resnet18"
    with pytest.raises(ConfigError, match="'config': expected a JSON object of sections"):
        run_config_from_parameters({"config": "[1, 2]"})
    with pytest.raises(ConfigError, match="'config': not valid JSON"):
        run_config_from_parameters({"config": '{"generate": {"prompt_template": "a "quoted" digit"}}'})
    with pytest.raises(ConfigError, match="config field 'train.epochs'"):
        run_config_from_parameters({"config": '{"train": {"epochs": 0}}'})
    with pytest.raises(ConfigError, match="unknown config field 'trian'"):
        run_config_from_parameters({"config": '{"trian": {"epochs": 3}}'})


def test_a_run_started_from_the_ui_gets_the_datasets_preset(compiled_defaults=None):
    """The pipeline's own defaults (what a run started from the KFP UI sends) mean what
    `feedback-synth run --dataset D` means: the preset of D, not the bare library defaults."""
    from feedback_synth.config import resolve_run_config
    from feedback_synth_kfp.parameters import named_defaults

    for dataset in ("digits-lt", "digits-gap", "digits-groups"):
        ui = run_config_from_parameters({**named_defaults(), "dataset": dataset, "config": "{}"})
        assert ui == resolve_run_config(dataset), dataset
    ui = run_config_from_parameters({**named_defaults(), "config": "{}"})
    assert (ui.generate.scale, ui.feedback.shard_size) == (0.03, 128)  # the tuned digits-lt values, not 0.02 and 256
    # a dataset URL has no preset: the library defaults
    assert run_config_from_parameters({**named_defaults(), "dataset": "gs://b/data"}).generate.scale == 0.02


def test_generation_summary_from_shard_metadata():
    shards = [{"started": 100.0, "seconds": 10.0, "generation_seconds": 8.0, "num_images": 16.0, "skipped": False,
               "criterion": "entropy"},
              {"started": 105.0, "seconds": 20.0, "generation_seconds": 9.0, "num_images": 16.0, "skipped": True,
               "criterion": "entropy"}]
    assert artifacts.generation_summary(shards) == {"shards": 2, "skipped": 1, "num_images": 32, "seconds": 8.0,
                                            "criterion": "entropy", "wall_seconds": 25.0}


def test_pipeline_arguments_reproduce_the_run_config():
    cfg = RunConfig()
    cfg.data.many_threshold = 30
    cfg.train.epochs, cfg.train.model = 3, "test_resnet"
    cfg.feedback.budget_fraction, cfg.feedback.target = 0.25, 50
    cfg.generate.scale, cfg.generate.num_inference_steps, cfg.generate.device = 0.01, 4, "cpu"
    cfg.filter.filters = ["degenerate"]
    cfg.retrain.synthetic_fraction, cfg.retrain.device = 0.3, "cuda"
    cfg.promote.min_gain = 0.02
    cfg.adapt.method, cfg.adapt.device = "lora", "cuda"
    cfg.device = "cuda:1"
    args = pipeline_arguments(cfg, "http://mlflow:5000", "gs://b/ws")
    assert args["mlflow_tracking_uri"] == "http://mlflow:5000" and args["workspace_url"] == "gs://b/ws"
    assert args["classifier_model"] == "test_resnet" and args["adapt_method"] == "lora"
    # the run's device is a named parameter; a section that overrides it carries its own
    assert args["device"] == "cuda:1"
    assert json.loads(args["config"])["generate"] == {"device": "cpu", "num_inference_steps": 4}
    # RunConfig()'s distillation (the library default) differs from the digits-lt preset's (off)
    assert json.loads(args["config"])["retrain"] == {"device": "cuda", "distill_weight": 0.25, "synthetic_fraction": 0.3}
    args["mlflow_tracking_uri"] = ""  # the tracking URI is infrastructure, not part of the run config
    assert run_config_from_parameters(args) == cfg  # what start_tracking resolves: the same run config
    # ... and what every task reads back from start_tracking's artifact
    art = dsl.Artifact(name="tracking", uri="/nowhere", metadata={kfp_tracking.CONFIG_KEY: json.dumps(asdict(cfg))})
    assert kfp_tracking.config_from_artifact(art) == cfg


def test_tracking_off_is_a_no_op(tmp_path):
    assert kfp_tracking.start_tracking("", "exp", "model", "run", "kfp-1", {}) == ""
    art = dsl.Artifact(name="tracking", uri=str(tmp_path / "t"), metadata={"context": ""})
    calls = []

    def work(on_epoch):
        on_epoch({"epoch": 1, "loss": 0.5})  # logging into the null tracker is a no-op, not an error
        calls.append("work")
        return StageResult("prepare_data", metrics={"x": 1.0})

    result = kfp_tracking.run_task_stage(art, "prepare_data", {"a": 1}, str(tmp_path), work)
    assert calls == ["work"] and result.metrics == {"x": 1.0} and result.stage == "prepare_data"
    assert kfp_tracking.promote(art, str(tmp_path / "model"), str(tmp_path / "e"), {}, RunConfig(), "") is None
    assert "Skipped" in artifacts.promotion_markdown(None)


@pytest.mark.slow
def test_tracking_parent_nested_runs_and_promotion(tmp_path, small_classifier):
    """One parent run tagged with the KFP run id, a nested run per stage task (each its own
    tracker, as in separate pods), promotion in the last one, which closes the parent run."""
    from mlflow import MlflowClient

    from feedback_synth.tracking.client import resolve_tracking_uri

    _, model_url = small_classifier
    store = str(tmp_path / "mlflow")  # a folder: a SQLite store with its artifact folder
    context = kfp_tracking.start_tracking(store, "kfp-test", "kfp-test-model", "feedback-synth-run", "kfp-run-42",
                               {"scale": 0.02})
    assert json.loads(context)["parent_run_id"]
    tracking = dsl.Artifact(name="tracking", uri=str(tmp_path / "t"), metadata={kfp_tracking.TRACKING_KEY: context})
    def train(on_epoch):
        on_epoch({"epoch": 1, "train_loss": 0.7})
        return StageResult("train_baseline", metrics={"test_overall": 0.5})

    def fail(on_epoch):
        raise RuntimeError("stage failed")

    kfp_tracking.run_task_stage(tracking, "train_baseline", asdict(TrainConfig(epochs=2)), str(tmp_path / "b"), train)
    with pytest.raises(RuntimeError):
        kfp_tracking.run_task_stage(tracking, "retrain", {}, str(tmp_path / "r"), fail)
    report = {"baseline": {"overall": 0.5, "few": 0.1}, "retrained": {"overall": 0.52, "few": 0.3}}
    cfg = RunConfig()
    cfg.tracking.registered_model = "kfp-test-model"
    result = kfp_tracking.promote(tracking, model_url, str(tmp_path / "e"), report, cfg, "")
    assert result["promoted"] and result["model_name"] == "kfp-test-model"
    # a retried promote task reports the decision made instead of registering a second version
    again = kfp_tracking.promote(tracking, model_url, str(tmp_path / "e"), report, cfg, "")
    assert again["resumed"] and again["version"] == result["version"]
    assert "champion" in artifacts.promotion_markdown(result)

    uri, _ = resolve_tracking_uri(type("C", (), {"tracking_uri": store})(), "")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = client.get_run(json.loads(context)["parent_run_id"])
    assert parent.data.tags["kfp.run_id"] == "kfp-run-42" and parent.info.status == "FINISHED"
    assert parent.data.params["scale"] == "0.02"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"train_baseline", "retrain", "promote"}
    assert by_name["train_baseline"].info.status == "FINISHED"
    assert by_name["train_baseline"].data.params["epochs"] == "2"
    assert by_name["train_baseline"].data.metrics["test_overall"] == 0.5
    assert "seconds" in by_name["train_baseline"].data.metrics
    assert by_name["retrain"].info.status == "FAILED"
    assert str(client.get_model_version_by_alias("kfp-test-model", "champion").version) == str(result["version"])


def test_the_first_task_runs_preflight_before_opening_any_run(tmp_path):
    """start_tracking (the cluster path's first task) refuses a bad run as pre-flight does in process,
    in one line, before an MLflow run is opened; a GPU device is only checked for its form there."""
    from feedback_synth_kfp.components.start_tracking import start_tracking
    from feedback_synth_kfp.parameters import named_defaults

    def call(**changes):
        art = dsl.Artifact(name="tracking", uri=str(tmp_path / "t"), metadata={})
        params = {**named_defaults(), "mlflow_tracking_uri": "", "run_name": "r", "kfp_run_id": "k", "config": "{}",
                  **changes}
        start_tracking.python_func(tracking=art, **params)
        return art

    with pytest.raises(ConfigError, match="unknown timm model 'no-such-model'"):
        call(classifier_model="no-such-model")
    assert not (tmp_path / "t").exists()
    art = call(device="cuda")  # this CPU pod has no CUDA: the GPU pods check that
    assert json.loads(art.metadata["config"])["device"] == "cuda"
