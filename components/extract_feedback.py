"""extract_feedback: class statistics of the frozen classifier and the generation plan
(feedback_synth.stages.extract_feedback)."""
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

    from feedback_synth import kfp_support as k
    from feedback_synth import stages
    from feedback_synth.config import FeedbackConfig, stage_config
    from feedback_synth.feedback import GenerationPlan

    cfg = stage_config(FeedbackConfig, k.stage_params(feedback_overrides, budget_fraction=budget_fraction,
                                                      shard_size=shard_size), "feedback")
    url = k.stage_output_url(feedback, workspace_url, run_id, "feedback")
    with k.stage_run(tracking, "extract_feedback", asdict(cfg), url) as run:
        result = stages.extract_feedback(k.artifact_url(data), stages.model_url(k.artifact_url(baseline)), url, cfg)
        run.log_metrics({"planned_images": result["num_images"], "shards": result["num_shards"],
                         "shrinkage": result["shrinkage"]})
    k.publish(feedback, url, started=run.t0, seconds=run.seconds, planned_images=result["num_images"],
              shards=result["num_shards"])
    return [s.shard_id for s in GenerationPlan.load(stages.plan_url(url)).shards]
