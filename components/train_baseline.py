"""train_baseline: train the classifier on the real, imbalanced data (feedback_synth.stages.train_baseline)."""
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

    from feedback_synth import kfp_support as k
    from feedback_synth import stages
    from feedback_synth.config import DataConfig, TrainConfig, stage_config
    from feedback_synth.data import load_info

    cfg = stage_config(TrainConfig, k.stage_params(train_overrides, model=classifier_model), "train")
    data_cfg = stage_config(DataConfig, k.stage_params(data_overrides, dataset=dataset), "data")
    data_url = k.artifact_url(data)
    url = k.stage_output_url(baseline, workspace_url, run_id, "baseline")
    with k.stage_run(tracking, "train_baseline", asdict(cfg), url) as run:
        result = stages.train_baseline(data_url, url, cfg, data_cfg, on_epoch=run.on_epoch)
        run.log_metrics(result, prefix="test_")
    k.publish(baseline, url, started=run.t0, seconds=run.seconds, model=cfg.model, framework="timm")
    k.log_kfp_metrics(metrics, result, prefix="test_")
    confusion.log_confusion_matrix(load_info(data_url).class_names, result["confusion_matrix"])
