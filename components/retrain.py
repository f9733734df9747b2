"""retrain: train the baseline's architecture on real + kept synthetic images (feedback_synth.stages.retrain)."""
from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from . import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def retrain(data: Input[Dataset], baseline: Input[Model], filtered: Input[Dataset], dataset: str,
            data_overrides: str, device: str, retrain_overrides: str, retrained: Output[Model],
            metrics: Output[Metrics], confusion: Output[ClassificationMetrics], tracking: Input[Artifact],
            workspace_url: str = "", run_id: str = ""):
    """Retrain from scratch on real + kept synthetic images; evaluate on the same test set.

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Input[Model]): the baseline (its architecture is reused).
        filtered (Input[Dataset]): filter_synthetic's output (the kept synthetic images).
        dataset (str): the dataset parameter of prepare_data (builds the same DataConfig).
        data_overrides (str): the data overrides of prepare_data.
        device (str): torch device (cuda on GPU nodes).
        retrain_overrides (str): JSON object of further RetrainConfig fields (epochs, synthetic_fraction, ...).
        retrained (Output[Model]): the stage folder: ``model/``, ``metrics.json``, ``history.json``.
        metrics (Output[Metrics]): test metrics of the retrained model.
        confusion (Output[ClassificationMetrics]): its test confusion matrix.
        tracking (Input[Artifact]): start_tracking's output (the MLflow parent run, if any).
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/retrained`` instead.
        run_id (str): the KFP run id.
    """
    from dataclasses import asdict

    from feedback_synth import kfp_support as k
    from feedback_synth import stages
    from feedback_synth.config import DataConfig, RetrainConfig, stage_config
    from feedback_synth.data import load_info

    cfg = stage_config(RetrainConfig, k.stage_params(retrain_overrides, device=device), "retrain")
    data_cfg = stage_config(DataConfig, k.stage_params(data_overrides, dataset=dataset), "data")
    data_url = k.artifact_url(data)
    url = k.stage_output_url(retrained, workspace_url, run_id, "retrained")
    with k.stage_run(tracking, "retrain", asdict(cfg), url) as run:
        result = stages.retrain(data_url, stages.model_url(k.artifact_url(baseline)), k.artifact_url(filtered), url,
                                cfg, data_cfg, on_epoch=run.on_epoch)
        run.log_metrics(result, prefix="test_")
    k.publish(retrained, url, started=run.t0, seconds=run.seconds, num_synthetic=result["num_synthetic"],
              framework="timm")
    k.log_kfp_metrics(metrics, result, prefix="test_")
    confusion.log_confusion_matrix(load_info(data_url).class_names, result["confusion_matrix"])
