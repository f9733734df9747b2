"""The plumbing of the KFP components (feedback_synth_kfp: artifacts, parameters, tracking) and of the kfp-local runner's
parameters, in process: locations, configs, MLflow parent/nested runs and promotion."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from kfp import dsl

from feedback_synth.config import (
    DataConfig,
    FeedbackConfig,
    FilterConfig,
    GenerateConfig,
    PromoteConfig,
    RetrainConfig,
    RunConfig,
    TrainConfig,
)
from feedback_synth.errors import ConfigError
from feedback_synth_kfp import artifacts
from feedback_synth_kfp import tracking as kfp_tracking
from feedback_synth_kfp.parameters import (
    NAMED_PARAMETERS,
    pipeline_arguments,
    run_config_from_parameters,
    section_config,
)


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


def test_section_config_overrides_apply_last():
    assert section_config("train", '{"epochs": 3, "model": "test_resnet"}', model="resnet10t") == \
        TrainConfig(epochs=3, model="test_resnet")
    assert section_config("generate", "", scale=0.1) == GenerateConfig(scale=0.1)
    with pytest.raises(ConfigError, match="'train_overrides': expected a JSON object"):
        section_config("train", "[1, 2]")
    with pytest.raises(ConfigError, match="'generate_overrides': not valid JSON"):
        section_config("generate", '{"prompt_template": "a "quoted" digit"}')
    with pytest.raises(ConfigError, match="config field 'train.epochs'"):
        section_config("train", '{"epochs": 0}')


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
    args = pipeline_arguments(cfg, "http://mlflow:5000", "gs://b/ws")
    assert args["mlflow_tracking_uri"] == "http://mlflow:5000" and args["workspace_url"] == "gs://b/ws"
    assert args["classifier_model"] == "test_resnet" and args["gpu_device"] == "cpu"
    assert json.loads(args["retrain_overrides"]) == {"device": "cuda", "synthetic_fraction": 0.3}
    classes = {"data": DataConfig, "train": TrainConfig, "feedback": FeedbackConfig, "generate": GenerateConfig,
               "filter": FilterConfig, "retrain": RetrainConfig, "promote": PromoteConfig}
    for section, cls in classes.items():  # what each component builds
        named = {field: args[param] for field, param in NAMED_PARAMETERS[section].items()}
        rebuilt = section_config(section, args[f"{section}_overrides"], **named)
        assert isinstance(rebuilt, cls) and rebuilt == getattr(cfg, section), section
    args["mlflow_tracking_uri"] = ""  # the tracking URI is infrastructure, not part of the run config
    assert run_config_from_parameters(args) == cfg  # what start_tracking logs: the same run config


def test_tracking_off_is_a_no_op(tmp_path):
    assert kfp_tracking.start_tracking("", "exp", "model", "run", "kfp-1", {}) == ""
    art = dsl.Artifact(name="tracking", uri=str(tmp_path / "t"), metadata={"context": ""})
    with kfp_tracking.stage_run(art, "prepare_data", {"a": 1}, str(tmp_path)) as run:
        run.log_metrics({"x": 1.0})
        run.on_epoch({"epoch": 1, "loss": 0.5})
    assert run.seconds is not None and run.seconds >= 0
    assert kfp_tracking.promote(art, str(tmp_path / "model"), {}, PromoteConfig()) is None
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
    with kfp_tracking.stage_run(tracking, "train_baseline", asdict(TrainConfig(epochs=2)), str(tmp_path / "b")) as run:
        run.on_epoch({"epoch": 1, "train_loss": 0.7})
        run.log_metrics({"overall": 0.5}, prefix="test_")
    with pytest.raises(RuntimeError):
        with kfp_tracking.stage_run(tracking, "retrain", {}, str(tmp_path / "r")):
            raise RuntimeError("stage failed")
    report = {"baseline": {"overall": 0.5, "few": 0.1}, "retrained": {"overall": 0.52, "few": 0.3}}
    result = kfp_tracking.promote(tracking, model_url, report, PromoteConfig(), str(tmp_path / "e"))
    assert result["promoted"] and result["model_name"] == "kfp-test-model"
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
