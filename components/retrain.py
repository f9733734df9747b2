"""retrain: train the baseline's architecture on real + kept synthetic images (feedback_synth.pipeline.stages.retrain)."""
from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from . import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def retrain(data: Input[Dataset], baseline: Input[Model], filtered: Input[Dataset], dataset: str,
            data_overrides: str, device: str, retrain_overrides: str, retrained: Output[Model],
            metrics: Output[Metrics], confusion: Output[ClassificationMetrics], tracking: Input[Artifact],
            workspace_url: str = "", run_id: str = "", round_index: int = 1, rounds: int = 1,
            previous_retrained: Input[Model] = None):
    """Retrain from scratch on real + kept synthetic images; evaluate on the same test set.

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Input[Model]): the baseline (its architecture and, by default, its recipe are reused).
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
        round_index (int): this round (1-based).
        rounds (int): the rounds the pipeline was compiled with.
        previous_retrained (Input[Model]): the previous round's output (its rounds.json carries on).
    """
    from dataclasses import asdict

    from feedback_synth.pipeline import stages
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.parameters import section_config
    from feedback_synth_kfp.tracking import stage_run

    cfg = section_config("retrain", retrain_overrides, device=device)
    data_cfg = section_config("data", data_overrides, dataset=dataset)
    url = artifacts.stage_output_url(retrained, workspace_url, run_id, artifacts.round_folder("retrained", round_index,
                                                                                             rounds))
    previous = artifacts.artifact_url(previous_retrained) if previous_retrained is not None else None
    with stage_run(tracking, artifacts.round_name("retrain", round_index, rounds), asdict(cfg), url) as run:
        result = stages.retrain(artifacts.artifact_url(data), stages.model_url(artifacts.artifact_url(baseline)),
                                artifacts.artifact_url(filtered), url, cfg, data_cfg, on_epoch=run.on_epoch,
                                previous_retrained_url=previous, round_index=round_index)
        run.log_result(result)
    artifacts.publish(retrained, url, started=run.t0, seconds=run.seconds,
                      num_synthetic=result.summary["num_synthetic"], framework="timm")
    artifacts.log_kfp_metrics(metrics, result.metrics)
    confusion.log_confusion_matrix(artifacts.class_names(data), result.summary["confusion_matrix"])
