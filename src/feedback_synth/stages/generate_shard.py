"""The generate stage (KFP component ``generate_shard``): the plan's shards, guided by the feedback."""
from __future__ import annotations

from typing import Optional

from feedback_synth.config import GenerateConfig
from feedback_synth.stages.outputs import plan_url
from feedback_synth.stages.result import StageResult
from feedback_synth.tracking.descriptors import splits


def generate(dataset_url: str, latest_model_url: str, feedback_url: str, output_url: str, cfg: GenerateConfig,
             shard_ids: Optional[list[int]] = None, overwrite: bool = False) -> StageResult:
    """Generate every shard of the plan (or ``shard_ids``) in this process. Shards resume on their
    own (``generation.shards``): one committed with the same fingerprint is skipped, one committed
    differently is refused unless ``overwrite``."""
    from feedback_synth.generation.shards import generate as generate_shards
    from feedback_synth.guidance.criteria import CRITERIA

    CRITERIA.check(cfg.criterion, "generate.criterion")
    summary = generate_shards(plan_url(feedback_url), dataset_url, latest_model_url, feedback_url, output_url, cfg,
                              shard_ids=shard_ids, overwrite=overwrite)
    return StageResult("generate", summary, {"generated_images": float(summary["num_images"]),
                                             "generation_seconds": float(summary["seconds"])},
                       datasets=[splits(dataset_url, "train")])
