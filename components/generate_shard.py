"""generate_shard: one shard of feedback-guided synthesis (feedback_synth.generation.shards.generate_shard)."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from . import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def generate_shard(data: Input[Dataset], baseline: Input[Model], feedback: Input[Artifact], shard_id: int,
                   generator: str, criterion: str, scale: float, guide_every: int, device: str,
                   generate_overrides: str, shard: Output[Dataset], tracking: Input[Artifact],
                   workspace_url: str = "", run_id: str = "", round_index: int = 1, rounds: int = 1):
    """Generate one shard of the plan with feedback guidance; a committed shard is skipped.

    Idempotent: with a ``workspace_url`` every shard task of a run writes to the same stable folder,
    so a retried pod skips a committed shard and redoes a half-written one.

    Args:
        data (Input[Dataset]): the prepared dataset (real images to condition on).
        baseline (Input[Model]): the frozen latest classifier (the feedback): the baseline in round 1.
        feedback (Input[Artifact]): extract_feedback's output (plan, class statistics).
        shard_id (int): which shard of the plan.
        generator (str): 'builtin' (bundled digits generator) or a diffusers model folder URL.
        criterion (str): feedback criterion: loss | entropy | hardness | none (unguided).
        scale (float): feedback step size s.
        guide_every (int): guide at every k-th denoising step.
        device (str): torch device (cuda on GPU nodes).
        generate_overrides (str): JSON object of further GenerateConfig fields, applied last.
        shard (Output[Dataset]): ``shards/shard-NNNNN/`` (images.npz, metadata.csv, _SUCCESS).
        tracking (Input[Artifact]): start_tracking's output (the MLflow parent run, if any).
        workspace_url (str): when set, write under ``<workspace_url>/<run_id>/generated`` instead.
        run_id (str): the KFP run id.
        round_index (int): this round (1-based).
        rounds (int): the rounds the pipeline was compiled with.
    """
    from dataclasses import asdict

    from feedback_synth.pipeline import stages
    from feedback_synth_kfp import artifacts
    from feedback_synth_kfp.parameters import section_config
    from feedback_synth_kfp.tracking import stage_run

    cfg = section_config("generate", generate_overrides, generator=generator, criterion=criterion, scale=scale,
                         guide_every=guide_every, device=device)
    url = artifacts.stage_output_url(shard, workspace_url, run_id, artifacts.round_folder("generated", round_index, rounds))
    name = artifacts.round_name(f"generate_shard_{shard_id}", round_index, rounds)
    with stage_run(tracking, name, {**asdict(cfg), "shard_id": shard_id}, url) as run:
        result = stages.generate(artifacts.artifact_url(data), stages.model_url(artifacts.artifact_url(baseline)),
                                 artifacts.artifact_url(feedback), url, cfg, shard_ids=[shard_id])
        run.log_result(result)
    s = result.summary
    artifacts.publish(shard, url, started=run.t0, seconds=run.seconds, shard_id=shard_id, num_images=s["num_images"],
                      generation_seconds=s["seconds"], skipped=bool(s["skipped"]), criterion=s["criterion"])
