"""filter_synthetic: drop degenerate, duplicate and off-support synthetic images
(feedback_synth.stages.filter_synthetic)."""
from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from . import image_for


@dsl.component(base_image=image_for("filter"), install_kfp_package=False)
def filter_synthetic(data: Input[Dataset], latest: Input[Model], feedback: Input[Artifact],
                     generated: Input[List[Dataset]], filtered: Output[Dataset], samples: Output[HTML],
                     metrics: Output[Metrics], tracking: Input[Artifact], workspace_url: str = "", run_id: str = "",
                     run_folder: str = "",                     round_index: int = 1, rounds: int = 1, previous_filtered: Input[Dataset] = None):
    """Join the generated shards and filter them; every shard of the plan must be committed.

    Args:
        data (Input[Dataset]): the prepared dataset.
        latest (Input[Model]): the latest classifier (features for the filters).
        feedback (Input[Artifact]): extract_feedback's output (plan, class statistics).
        generated (Input[List[Dataset]]): the generate_shard outputs (dsl.Collected).
        filtered (Output[Dataset]): ``synthetic.npz`` (kept), ``filter_report.json``, ``samples.png``.
        samples (Output[HTML]): a grid of real and kept synthetic images per class.
        metrics (Output[Metrics]): generated, kept, per filter.
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/filtered`` instead.
        run_id (str): the KFP run id.
        run_folder (str): when set, write the run's layout under this folder instead (kfp-local: its
            --output), so that a re-run resumes.
        round_index (int): this round (1-based).
        rounds (int): the rounds the pipeline was compiled with.
        previous_filtered (Input[Dataset]): the previous round's filter output (rounds > 1).
    """
    from feedback_synth import storage
    from feedback_synth.orchestration.shared import RunLayout
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import GENERATE_RUN_KEY, close_stage_run, run_table_stage

    url = artifacts.stage_output_url(filtered, workspace_url, run_id, RunLayout.folder("filtered", round_index, rounds),
                                     run_folder)
    inputs = {"data": artifacts.artifact_url(data), "latest": artifacts.artifact_url(latest),
              "feedback": artifacts.artifact_url(feedback),
              "generated": artifacts.unique([artifacts.artifact_url(s) for s in generated])}
    if previous_filtered is not None:
        inputs["previous_filtered"] = artifacts.artifact_url(previous_filtered)
    generation = artifacts.generation_summary([dict(s.metadata) for s in generated])
    # the round's generate run ends with the fan-out it stands for
    close_stage_run(tracking, (feedback.metadata or {}).get(GENERATE_RUN_KEY, ""),
                    {"num_images": generation.get("num_images"), "seconds": generation.get("wall_seconds"),
                     "shards": generation.get("shards"), "skipped": generation.get("skipped")}, url)
    result = run_table_stage(tracking, "filter", inputs, url, round_index, rounds)
    report = result.summary
    artifacts.publish(filtered, url, seconds=result.seconds, rounds_seconds=artifacts.rounds_seconds(
                          previous_filtered, result.seconds), generated=report["generated"], kept=report["kept"],
                      generation=artifacts.rounds_generation(previous_filtered, generation))
    artifacts.log_kfp_metrics(metrics, result.metrics)
    with open(samples.path, "w") as f:
        f.write(artifacts.png_html(storage.read_bytes(storage.join(url, "samples.png")),
                                   "Real and kept synthetic images",
                                   f"{report['kept']} of {report['generated']} generated images kept"))
