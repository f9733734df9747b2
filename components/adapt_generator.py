"""adapt_generator: fine-tune the generator on the task's real images (feedback_synth.stages.adapt_generator)."""
from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from . import image_for


@dsl.component(base_image=image_for("adapt_generator"), install_kfp_package=False)
def adapt_generator(data: Input[Dataset], baseline: Input[Model], adapted: Output[Model], samples: Output[HTML], metrics: Output[Metrics],
                    tracking: Input[Artifact], workspace_url: str = "", run_id: str = "", run_folder: str = ""):
    """Adapt the generator to the task's style (``adapt.method``: none | full | lora) and say which
    generator folder generation loads (metadata ``generator``: the adapted folder, or the original
    one when ``adapt.method`` is none).

    Args:
        data (Input[Dataset]): the prepared dataset (the real training images to adapt on).
        baseline (Input[Model]): the baseline classifier (its features measure the gap to the real data).
        adapted (Output[Model]): ``generator/`` (a diffusers folder), ``adapt_report.json``, ``loss.png``,
            ``samples_before_after.png``.
        samples (Output[HTML]): samples per class before and after adaptation, for the KFP UI.
        metrics (Output[Metrics]): the final loss and the gap before and after.
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/adapted`` instead.
        run_id (str): the KFP run id.
        run_folder (str): when set, write the run's layout under this folder instead (kfp-local: its
            --output), so that a re-run resumes.
    """
    from feedback_synth import storage
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import run_table_stage

    url = artifacts.stage_output_url(adapted, workspace_url, run_id, "adapted", run_folder)
    result = run_table_stage(tracking, "adapt_generator", {"data": artifacts.artifact_url(data),
                                                           "baseline": artifacts.artifact_url(baseline)}, url)
    artifacts.publish(adapted, url, seconds=result.seconds, generator=result.summary["generator"],
                      method=result.summary["method"])
    artifacts.log_kfp_metrics(metrics, result.metrics)
    grid = storage.join(url, "samples_before_after.png")
    with open(samples.path, "w") as f:
        f.write(artifacts.png_html(storage.read_bytes(grid), "Samples per class, before and after adaptation")
                if storage.exists(grid) else "<p>adapt.method is none: the generator is used as it is.</p>")
