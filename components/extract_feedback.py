"""extract_feedback: class statistics of the frozen classifier and the generation plan
(feedback_synth.pipeline.stages.extract_feedback)."""
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def extract_feedback(data: Input[Dataset], baseline: Input[Model], budget_fraction: float, shard_size: int,
                     feedback_overrides: str, feedback: Output[Artifact], tracking: Input[Artifact],
                     workspace_url: str = "", run_id: str = "") -> List[int]:
    """Freeze the baseline, fit the class statistics of ``hardness`` and plan the generation.

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Input[Model]): train_baseline's output.
        budget_fraction (float): scale of the reference rule's per-class counts (0.5 = half budget).
        shard_size (int): images per generation shard (one shard = one GPU pod).
        feedback_overrides (str): JSON object of further FeedbackConfig fields, applied last.
        feedback (Output[Artifact]): ``plan.json``, ``class_stats.*``, ``feedback_config.json``.
        tracking (Input[Artifact]): start_tracking's output (the MLflow parent run, if any).
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/feedback`` instead.
        run_id (str): the KFP run id.

    Returns:
        List[int]: the shard ids of the plan (the generation fan-out).
    """
    from dataclasses import asdict

    from feedback_synth.pipeline import stages
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.parameters import section_config
    from feedback_synth_kfp.tracking import stage_run

    cfg = section_config("feedback", feedback_overrides, budget_fraction=budget_fraction, shard_size=shard_size)
    url = artifacts.stage_output_url(feedback, workspace_url, run_id, "feedback")
    with stage_run(tracking, "extract_feedback", asdict(cfg), url) as run:
        result = stages.extract_feedback(artifacts.artifact_url(data),
                                         stages.model_url(artifacts.artifact_url(baseline)), url, cfg)
        run.log_result(result)
    artifacts.publish(feedback, url, started=run.t0, seconds=run.seconds, planned_images=result.summary["num_images"],
                      shards=result.summary["num_shards"])
    return list(range(result.summary["num_shards"]))
