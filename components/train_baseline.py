"""train_baseline: train the classifier on the real, imbalanced data (feedback_synth.pipeline.stages.train_baseline)."""
from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train_baseline(data: Input[Dataset], dataset: str, data_overrides: str, classifier_model: str,
                   train_overrides: str, baseline: Output[Model], metrics: Output[Metrics],
                   confusion: Output[ClassificationMetrics], tracking: Input[Artifact],
                   workspace_url: str = "", run_id: str = ""):
    """Train the baseline classifier on the real data and evaluate it on the test set.

    Args:
        data (Input[Dataset]): the prepared dataset.
        dataset (str): the dataset parameter of prepare_data (builds the same DataConfig).
        data_overrides (str): the data overrides of prepare_data.
        classifier_model (str): timm model name (TrainConfig.model).
        train_overrides (str): JSON object of further TrainConfig fields (epochs, lr, ...), applied last.
        baseline (Output[Model]): the stage folder: ``model/`` (checkpoint), ``metrics.json``, ``history.json``.
        metrics (Output[Metrics]): test metrics (overall, many, medium, few, worst_class).
        confusion (Output[ClassificationMetrics]): test confusion matrix.
        tracking (Input[Artifact]): start_tracking's output (the MLflow parent run, if any).
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/baseline`` instead.
        run_id (str): the KFP run id.
    """
    from dataclasses import asdict

    from feedback_synth.pipeline import stages
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.parameters import section_config
    from feedback_synth_kfp.tracking import stage_run

    cfg = section_config("train", train_overrides, model=classifier_model)
    data_cfg = section_config("data", data_overrides, dataset=dataset)
    url = artifacts.stage_output_url(baseline, workspace_url, run_id, "baseline")
    with stage_run(tracking, "train_baseline", asdict(cfg), url) as run:
        result = stages.train_baseline(artifacts.artifact_url(data), url, cfg, data_cfg, on_epoch=run.on_epoch)
        run.log_result(result)
    artifacts.publish(baseline, url, started=run.t0, seconds=run.seconds, model=cfg.model, framework="timm")
    artifacts.log_kfp_metrics(metrics, result.metrics)
    confusion.log_confusion_matrix(artifacts.class_names(data), result.summary["confusion_matrix"])
