"""filter_synthetic: drop degenerate, duplicate and off-support synthetic images
(feedback_synth.pipeline.stages.filter_synthetic)."""
from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from . import image_for


@dsl.component(base_image=image_for("filter"), install_kfp_package=False)
def filter_synthetic(data: Input[Dataset], baseline: Input[Model], feedback: Input[Artifact],
                     shards: Input[List[Dataset]], filtered: Output[Dataset], samples: Output[HTML],
                     metrics: Output[Metrics], tracking: Input[Artifact], workspace_url: str = "", run_id: str = "",
                     round_index: int = 1, rounds: int = 1, previous_filtered: Input[Dataset] = None):
    """Join the generated shards and filter them; every shard of the plan must be committed.

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Input[Model]): the latest classifier (features for the filters).
        feedback (Input[Artifact]): extract_feedback's output (plan, class statistics).
        shards (Input[List[Dataset]]): the generate_shard outputs (dsl.Collected).
        filtered (Output[Dataset]): ``synthetic.npz`` (kept), ``filter_report.json``, ``samples.png``.
        samples (Output[HTML]): a grid of real and kept synthetic images per class.
        metrics (Output[Metrics]): generated, kept, per filter.
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/filtered`` instead.
        run_id (str): the KFP run id.
        round_index (int): this round (1-based).
        rounds (int): the rounds the pipeline was compiled with.
        previous_filtered (Input[Dataset]): the previous round's filter output (rounds > 1).
    """
    from dataclasses import asdict

    from feedback_synth import storage
    from feedback_synth.pipeline import stages
    from feedback_synth.pipeline.orchestration import RunLayout
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import run_config, run_task_stage

    cfg = run_config(tracking, "filter")
    url = artifacts.stage_output_url(filtered, workspace_url, run_id, RunLayout.folder("filtered", round_index, rounds))
    generated = artifacts.unique([artifacts.artifact_url(s) for s in shards])
    previous = artifacts.artifact_url(previous_filtered) if previous_filtered is not None else None
    result = run_task_stage(
        tracking, RunLayout.run_name("filter", round_index, rounds), asdict(cfg.filter), url,
        lambda _: stages.filter_synthetic(artifacts.artifact_url(data), stages.model_url(artifacts.artifact_url(baseline)),
                                          artifacts.artifact_url(feedback), generated, url, cfg.filter, previous))
    report = result.summary
    artifacts.publish(filtered, url, seconds=result.seconds, generated=report["generated"], kept=report["kept"],
                      generation=artifacts.generation_summary([dict(s.metadata) for s in shards]))
    artifacts.log_kfp_metrics(metrics, result.metrics)
    with open(samples.path, "w") as f:
        f.write(artifacts.png_html(storage.read_bytes(storage.join(url, "samples.png")),
                                   "Real and kept synthetic images",
                                   f"{report['kept']} of {report['generated']} generated images kept"))
