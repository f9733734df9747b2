"""generate_shard: one shard of feedback-guided synthesis (feedback_synth.generate.generate_shard)."""
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from . import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def generate_shard(data: Input[Dataset], baseline: Input[Model], feedback: Input[Artifact], shard_id: int,
                   generator: str, criterion: str, scale: float, guide_every: int, device: str,
                   generate_overrides: str, shard: Output[Dataset], tracking: Input[Artifact],
                   workspace_url: str = "", run_id: str = ""):
    """Generate one shard of the plan with feedback guidance; a committed shard is skipped.

    Idempotent: with a ``workspace_url`` every shard task of a run writes to the same stable folder,
    so a retried pod skips a committed shard and redoes a half-written one.

    Args:
        data (Input[Dataset]): the prepared dataset (real images to condition on).
        baseline (Input[Model]): the frozen baseline classifier (the feedback).
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
    """
    from dataclasses import asdict

    from feedback_synth import kfp_support as k
    from feedback_synth import stages
    from feedback_synth.config import GenerateConfig, stage_config
    from feedback_synth.feedback import GenerationPlan
    from feedback_synth.generate import generate_shard as generate_one

    cfg = stage_config(GenerateConfig, k.stage_params(
        generate_overrides, generator=generator, criterion=criterion, scale=scale, guide_every=guide_every,
        device=device), "generate")
    feedback_url = k.artifact_url(feedback)
    url = k.stage_output_url(shard, workspace_url, run_id, "generated")
    with k.stage_run(tracking, f"generate_shard_{shard_id}", {**asdict(cfg), "shard_id": shard_id}, url) as run:
        result = generate_one(GenerationPlan.load(stages.plan_url(feedback_url)), shard_id, k.artifact_url(data),
                              stages.model_url(k.artifact_url(baseline)), feedback_url, url, cfg)
        run.log_metrics({"generated_images": result["num_images"], "generation_seconds": result["seconds"],
                         "mean_criterion_value": result["mean_criterion_value"]})
    k.publish(shard, url, started=run.t0, seconds=run.seconds, shard_id=shard_id, num_images=result["num_images"],
              generation_seconds=result["seconds"], skipped=result["skipped"], criterion=result["criterion"])
