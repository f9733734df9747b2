"""train_baseline: train the classifier on the real, imbalanced data (feedback_synth.stages.train_baseline)."""
from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from . import image_for


@dsl.component(base_image=image_for("train_baseline"), install_kfp_package=False)
def train_baseline(data: Input[Dataset], baseline: Output[Model], metrics: Output[Metrics],
                   confusion: Output[ClassificationMetrics], tracking: Input[Artifact],
                   workspace_url: str = "", run_id: str = "", run_folder: str = ""):
    """Train the baseline classifier on the real data and evaluate it on the test set.

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Output[Model]): the stage folder: ``model/`` (checkpoint), ``metrics.json``, ``history.json``.
        metrics (Output[Metrics]): test metrics (overall, many, medium, few, worst_class).
        confusion (Output[ClassificationMetrics]): test confusion matrix.
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/baseline`` instead.
        run_id (str): the KFP run id.
        run_folder (str): when set, write the run's layout under this folder instead (kfp-local: its
            --output), so that a re-run resumes.
    """
    from feedback_synth.stages.outputs import model_url
    from feedback_synth.training.classifier import classifier_spec
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import run_table_stage

    url = artifacts.stage_output_url(baseline, workspace_url, run_id, "baseline", run_folder)
    result = run_table_stage(tracking, "train_baseline", {"data": artifacts.artifact_url(data)}, url)
    artifacts.publish(baseline, url, seconds=result.seconds, model=classifier_spec(model_url(url)).model,
                      framework="timm")
    artifacts.log_kfp_metrics(metrics, result.metrics)
    confusion.log_confusion_matrix(artifacts.class_names(data), result.summary["confusion_matrix"])
