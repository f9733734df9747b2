"""evaluate: baseline vs retrained, fidelity, per-class plot and report (feedback_synth.stages.evaluate_run)."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from . import image_for


@dsl.component(base_image=image_for("evaluate"), install_kfp_package=False)
def evaluate(data: Input[Dataset], baseline: Input[Model], adapted: Input[Model], retrained: Input[Model],
             filtered: Input[Dataset], evaluation: Output[Artifact], report: Output[Markdown],
             per_class: Output[HTML], metrics: Output[Metrics], tracking: Input[Artifact],
             workspace_url: str = "", run_id: str = "", run_folder: str = ""):
    """Compare the baseline and retrained models on the test set; write the report and plots.

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Input[Model]): train_baseline's output.
        adapted (Input[Model]): adapt_generator's output (the gap before and after adaptation).
        retrained (Input[Model]): the last round's retrain output.
        filtered (Input[Dataset]): the last round's filter output.
        evaluation (Output[Artifact]): ``report.json``, ``report.md``, plots.
        report (Output[Markdown]): the report, for the KFP UI.
        per_class (Output[HTML]): the per-class accuracy plot, for the KFP UI.
        metrics (Output[Metrics]): baseline, retrained and delta metrics, fidelity.
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/report`` instead.
        run_id (str): the KFP run id.
        run_folder (str): when set, write the run's layout under this folder instead (kfp-local: its
            --output), so that a re-run resumes.
    """
    from feedback_synth import storage
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import log_epilogue, run_table_stage

    url = artifacts.stage_output_url(evaluation, workspace_url, run_id, "report", run_folder)
    inputs = {name: artifacts.artifact_url(a) for name, a in (("data", data), ("baseline", baseline), ("adapted", adapted),
                                                              ("retrained", retrained), ("filtered", filtered))}
    result = run_table_stage(tracking, "evaluate", inputs, url)
    log_epilogue(tracking, url, result)  # the parent run's metrics and report.md, as in process
    artifacts.publish(evaluation, url, seconds=result.seconds, fidelity=result.summary["fidelity"])
    artifacts.log_kfp_metrics(metrics, result.metrics)
    with open(report.path, "w") as f:
        f.write(storage.read_text(storage.join(url, "report.md")))
    with open(per_class.path, "w") as f:
        f.write(artifacts.png_html(storage.read_bytes(storage.join(url, "per_class_accuracy.png")),
                                   "Per-class test accuracy", "baseline vs retrained, classes ordered by training count"))
