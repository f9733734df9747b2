"""extract_feedback: class statistics of the frozen classifier and the generation plan
(feedback_synth.pipeline.stages.extract_feedback)."""
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from . import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def extract_feedback(data: Input[Dataset], baseline: Input[Model], budget_fraction: float, shard_size: int,
                     feedback_overrides: str, feedback: Output[Artifact], tracking: Input[Artifact],
                     workspace_url: str = "", run_id: str = "", round_index: int = 1, rounds: int = 1,
                     previous_feedback: Input[Artifact] = None) -> List[int]:
    """Freeze the latest model, fit the class statistics of ``hardness`` and plan the generation
    (of round ``round_index`` of ``rounds``: the pipeline is compiled with its rounds unrolled).

    Args:
        data (Input[Dataset]): the prepared dataset.
        baseline (Input[Model]): the latest model: train_baseline's output in round 1, the previous
            round's retrain output after that.
        budget_fraction (float): scale of the reference rule's per-class counts (0.5 = half budget).
        shard_size (int): images per generation shard (one shard = one GPU pod).
        feedback_overrides (str): JSON object of further FeedbackConfig fields, applied last.
        feedback (Output[Artifact]): ``plan.json``, ``class_stats.*``, ``feedback_config.json``.
        tracking (Input[Artifact]): start_tracking's output (the MLflow parent run, if any).
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/feedback`` instead.
        run_id (str): the KFP run id.
        round_index (int): this round (1-based).
        rounds (int): the rounds the pipeline was compiled with (must equal feedback.rounds).
        previous_feedback (Input[Artifact]): the previous round's extract_feedback output (None in round 1).

    Returns:
        List[int]: the shard ids of the plan (the generation fan-out).
    """
    from dataclasses import asdict

    from feedback_synth.errors import ConfigError
    from feedback_synth.pipeline import stages
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.parameters import section_config
    from feedback_synth_kfp.tracking import stage_run

    cfg = section_config("feedback", feedback_overrides, budget_fraction=budget_fraction, shard_size=shard_size)
    if cfg.rounds != rounds:
        raise ConfigError(f"config field 'feedback.rounds': {cfg.rounds}, but this pipeline was compiled with {rounds} "
                          f"round(s); compile it with `feedback-synth compile --rounds {cfg.rounds}`")
    url = artifacts.stage_output_url(feedback, workspace_url, run_id, artifacts.round_folder("feedback", round_index,
                                                                                            rounds))
    previous = artifacts.artifact_url(previous_feedback) if previous_feedback is not None else None
    with stage_run(tracking, artifacts.round_name("extract_feedback", round_index, rounds),
                   {**asdict(cfg), "round": round_index}, url) as run:
        result = stages.extract_feedback(artifacts.artifact_url(data),
                                         stages.model_url(artifacts.artifact_url(baseline)), url, cfg, round_index,
                                         previous)
        run.log_result(result)
    artifacts.publish(feedback, url, started=run.t0, seconds=run.seconds, planned_images=result.summary["num_images"],
                      shards=result.summary["num_shards"])
    return list(range(result.summary["num_shards"]))
