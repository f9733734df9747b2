"""retrain: train the baseline's architecture on real + kept synthetic images (feedback_synth.stages.retrain)."""
from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from . import image_for


@dsl.component(base_image=image_for("retrain"), install_kfp_package=False)
def retrain(data: Input[Dataset], baseline: Input[Model], filtered: Input[Dataset], retrained: Output[Model],
            metrics: Output[Metrics], confusion: Output[ClassificationMetrics], tracking: Input[Artifact],
            workspace_url: str = "", run_id: str = "", run_folder: str = "", round_index: int = 1, rounds: int = 1,
            previous_retrained: Input[Model] = None):
    """Retrain from scratch on real + kept synthetic images; evaluate on the same test set.

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Input[Model]): the baseline (its architecture and recipe).
        filtered (Input[Dataset]): filter_synthetic's output (every kept image so far).
        retrained (Output[Model]): ``model/``, ``metrics.json``, ``history.json``, ``reference_metrics.json``.
        metrics (Output[Metrics]): test metrics.
        confusion (Output[ClassificationMetrics]): test confusion matrix.
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/retrained`` instead.
        run_id (str): the KFP run id.
        run_folder (str): when set, write the run's layout under this folder instead (kfp-local: its
            --output), so that a re-run resumes.
        round_index (int): this round (1-based).
        rounds (int): the rounds the pipeline was compiled with.
        previous_retrained (Input[Model]): the previous round's retrain output (rounds > 1).
    """
    from feedback_synth.orchestration.shared import RunLayout
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import run_table_stage

    url = artifacts.stage_output_url(retrained, workspace_url, run_id, RunLayout.folder("retrained", round_index, rounds),
                                     run_folder)
    inputs = {name: artifacts.artifact_url(a) for name, a in (("data", data), ("baseline", baseline),
                                                              ("filtered", filtered))}
    if previous_retrained is not None:
        inputs["previous_retrained"] = artifacts.artifact_url(previous_retrained)
    result = run_table_stage(tracking, "retrain", inputs, url, round_index, rounds)
    artifacts.publish(retrained, url, seconds=result.seconds, rounds_seconds=artifacts.rounds_seconds(
                          previous_retrained, result.seconds), num_synthetic=result.summary["num_synthetic"],
                      framework="timm")
    artifacts.log_kfp_metrics(metrics, result.metrics)
    confusion.log_confusion_matrix(artifacts.class_names(data), result.summary["confusion_matrix"])
