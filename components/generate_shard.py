"""generate_shard: one shard of feedback-guided synthesis (feedback_synth.stages.generate)."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from . import image_for


@dsl.component(base_image=image_for("generate"), install_kfp_package=False)
def generate_shard(data: Input[Dataset], latest: Input[Model], adapted: Input[Model], feedback: Input[Artifact],
                   shard_id: int, shard: Output[Dataset], tracking: Input[Artifact], workspace_url: str = "",
                   run_id: str = "", run_folder: str = "", round_index: int = 1, rounds: int = 1):
    """Generate one shard of the plan with feedback guidance; a committed shard is skipped.

    Idempotent: with a ``workspace_url`` every shard task of a run writes to the same stable folder,
    so a retried pod skips a committed shard and redoes a half-written one.

    Args:
        data (Input[Dataset]): the prepared dataset (real images to condition on).
        latest (Input[Model]): the frozen latest classifier (the feedback): the baseline in round 1.
        adapted (Input[Model]): adapt_generator's output (the generator to sample from: stage_table.generate_config).
        feedback (Input[Artifact]): extract_feedback's output (plan, class statistics).
        shard_id (int): which shard of the plan.
        shard (Output[Dataset]): ``shards/shard-NNNNN/`` (images.npz, metadata.csv, _SUCCESS).
        tracking (Input[Artifact]): start_tracking's output: the run's config and MLflow parent run.
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/generated`` instead.
        run_id (str): the KFP run id.
        run_folder (str): when set, write the run's layout under this folder instead (kfp-local: its
            --output), so that a re-run resumes.
        round_index (int): this round (1-based).
        rounds (int): the rounds the pipeline was compiled with.
    """
    import time

    from feedback_synth.orchestration.shared import RunLayout
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.tracking import GENERATE_RUN_KEY, run_table_stage, under_run

    t0 = time.time()
    url = artifacts.stage_output_url(shard, workspace_url, run_id, RunLayout.folder("generated", round_index, rounds),
                                     run_folder)
    inputs = {name: artifacts.artifact_url(a) for name, a in (("data", data), ("latest", latest), ("adapted", adapted),
                                                              ("feedback", feedback))}
    # one run per shard, under the round's generate run (extract_feedback opened it): the fan-out of
    # the in-process runner's one 'generate' run
    generate_run = (feedback.metadata or {}).get(GENERATE_RUN_KEY, "")
    result = run_table_stage(under_run(tracking, generate_run), "generate", inputs, url, round_index, rounds,
                             shard_ids=[shard_id],
                             run_name=RunLayout.run_name(f"generate_shard_{shard_id}", round_index, rounds))
    s = result.summary
    artifacts.publish(shard, url, started=t0, seconds=result.seconds, shard_id=shard_id, num_images=s["num_images"],
                      generation_seconds=s["seconds"], skipped=bool(s["skipped"]), criterion=s["criterion"])
