"""evaluate: baseline vs retrained, fidelity, per-class plot and report (feedback_synth.pipeline.stages.evaluate_run)."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(data: Input[Dataset], baseline: Input[Model], retrained: Input[Model], filtered: Input[Dataset],
             dataset: str, data_overrides: str, evaluation: Output[Artifact], report: Output[Markdown],
             per_class: Output[HTML], metrics: Output[Metrics], tracking: Input[Artifact],
             workspace_url: str = "", run_id: str = ""):
    """Compare the baseline and retrained models on the test set; write the report and plots.

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Input[Model]): train_baseline's output.
        retrained (Input[Model]): retrain's output.
        filtered (Input[Dataset]): filter_synthetic's output (for the counts and the fidelity).
        dataset (str): the dataset parameter of prepare_data (builds the same DataConfig).
        data_overrides (str): the data overrides of prepare_data.
        evaluation (Output[Artifact]): ``report.json``, ``report.md``, ``per_class_accuracy.png``, confusion plots.
        report (Output[Markdown]): the baseline vs retrained table.
        per_class (Output[HTML]): per-class accuracy before and after.
        metrics (Output[Metrics]): baseline_*, retrained_*, delta_* metrics and fidelity.
        tracking (Input[Artifact]): start_tracking's output (the MLflow parent run, if any).
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/report`` instead.
        run_id (str): the KFP run id.
    """
    from feedback_synth import storage
    from feedback_synth.pipeline import stages
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.parameters import section_config
    from feedback_synth_kfp.tracking import stage_run

    data_cfg = section_config("data", data_overrides, dataset=dataset)
    url = artifacts.stage_output_url(evaluation, workspace_url, run_id, "report")
    with stage_run(tracking, "evaluate", {}, url) as run:
        result = stages.evaluate_run(artifacts.artifact_url(data), artifacts.artifact_url(baseline),
                                     artifacts.artifact_url(retrained), artifacts.artifact_url(filtered), url, data_cfg)
        run.log_result(result)
    artifacts.publish(evaluation, url, started=run.t0, seconds=run.seconds, fidelity=result.summary["fidelity"])
    artifacts.log_kfp_metrics(metrics, result.metrics)
    with open(report.path, "w") as f:
        f.write(storage.read_text(storage.join(url, "report.md")))
    with open(per_class.path, "w") as f:
        f.write(artifacts.png_html(storage.read_bytes(storage.join(url, "per_class_accuracy.png")),
                                   "Per-class test accuracy", "baseline vs retrained, classes ordered by training count"))
