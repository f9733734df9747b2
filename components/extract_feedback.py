"""extract_feedback: class statistics of the frozen classifier and the generation plan
(feedback_synth.stages.extract_feedback)."""
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from . import image_for


@dsl.component(base_image=image_for("extract_feedback"), install_kfp_package=False)
def extract_feedback(data: Input[Dataset], latest: Input[Model], feedback: Output[Artifact],
                     tracking: Input[Artifact], workspace_url: str = "", run_id: str = "",
                     run_folder: str = "", round_index: int = 1,
                     rounds: int = 1, previous_feedback: Input[Artifact] = None) -> List[int]:
    """Freeze the latest model, fit the class statistics of ``hardness`` and plan the generation
    (of round ``round_index`` of ``rounds``: the pipeline is compiled with its rounds unrolled).

    Args:
        data (Input[Dataset]): the prepared dataset.
        latest (Input[Model]): the latest model: the baseline in round 1, the previous round's
            retrain output after that.
        feedback (Output[Artifact]): ``class_stats.safetensors``, ``plan.json``.
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/...`` instead.
        run_id (str): the KFP run id.
        run_folder (str): when set, write the run's layout under this folder instead (kfp-local: its
            --output), so that a re-run resumes.
        round_index (int): this round (1-based).
        rounds (int): the rounds the pipeline was compiled with.
        previous_feedback (Input[Artifact]): the previous round's feedback output (rounds > 1).

    Returns:
        List[int]: the shard ids of the plan (the generation fan-out).
    """
    from feedback_synth.errors import ConfigError
    from feedback_synth.orchestration.shared import RunLayout
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import GENERATE_RUN_KEY, config_from_artifact, open_stage_run, run_table_stage

    cfg = config_from_artifact(tracking)
    if cfg.feedback.rounds != rounds:
        raise ConfigError(f"config field 'feedback.rounds': {cfg.feedback.rounds}, but this pipeline was compiled with "
                          f"{rounds} round(s); compile it with `feedback-synth compile --rounds {cfg.feedback.rounds}`")
    url = artifacts.stage_output_url(feedback, workspace_url, run_id, RunLayout.folder("feedback", round_index, rounds),
                                     run_folder)
    inputs = {"data": artifacts.artifact_url(data), "latest": artifacts.artifact_url(latest)}
    if previous_feedback is not None:
        inputs["previous_feedback"] = artifacts.artifact_url(previous_feedback)
    result = run_table_stage(tracking, "extract_feedback", inputs, url, round_index, rounds)
    # the round's generate run, as in process; the shard tasks nest under it, filter_synthetic closes it
    generate_run = open_stage_run(tracking, RunLayout.run_name("generate", round_index, rounds), url)
    artifacts.publish(feedback, url, seconds=result.seconds, rounds_seconds=artifacts.rounds_seconds(
                          previous_feedback, result.seconds), planned_images=result.summary["num_images"],
                      shards=result.summary["num_shards"], **{GENERATE_RUN_KEY: generate_run})
    return list(range(result.summary["num_shards"]))
