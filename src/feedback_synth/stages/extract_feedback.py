"""The extract_feedback stage: freeze the classifier, fit the class statistics, plan the generation."""
from __future__ import annotations

from typing import Optional

from feedback_synth import storage
from feedback_synth.config import FeedbackConfig, result_settings
from feedback_synth.data.imageset import ImageSet, load_info, load_split
from feedback_synth.devices import resolve_device
from feedback_synth.stages.outputs import plan_url
from feedback_synth.stages.result import StageResult
from feedback_synth.stages.resume import digests, run_stage
from feedback_synth.tracking.descriptors import splits


def extract_feedback(dataset_url: str, latest_model_url: str, output_url: str, cfg: FeedbackConfig,
                     round_index: int = 1, previous_feedback_url: Optional[str] = None,
                     overwrite: bool = False) -> StageResult:
    """Freeze the classifier, fit the class statistics of ``hardness``, and plan the generation.

    ``latest_model_url`` is the latest model (the baseline in
    round 1, the previous round's retrained model after that), its validation mistakes per cell
    steer the round's share of the budget, and ``previous_feedback_url`` (the previous round's
    output) says where each cell's image indices continue (synthesis.plan).
    """
    return run_stage("extract_feedback", output_url, {"feedback": result_settings(cfg), "round": round_index},
                     digests(data=dataset_url, model=latest_model_url, previous=previous_feedback_url),
                     lambda: _extract_feedback(dataset_url, latest_model_url, output_url, cfg, round_index,
                                               previous_feedback_url), overwrite)


def _extract_feedback(dataset_url: str, latest_model_url: str, output_url: str, cfg: FeedbackConfig,
                     round_index: int = 1, previous_feedback_url: Optional[str] = None) -> StageResult:
    from feedback_synth.synthesis.feedback import extract_features, fit_class_stats, save_class_stats
    from feedback_synth.synthesis.plan import GenerationPlan, make_plan
    from feedback_synth.training.classifier import load_classifier

    train = load_split(dataset_url, "train")
    clf = load_classifier(latest_model_url, resolve_device(cfg.device, "feedback.device"))
    reference, val_errors = None, None
    if "val" in load_info(dataset_url).splits:  # held-out real images: the off_support yardstick
        val = load_split(dataset_url, "val")
        val_feats = extract_features(clf, val)
        reference = (val_feats, val.labels)
        if round_index > 1:
            val_errors = cell_errors(clf, val, cfg.per_group)
    stats = fit_class_stats(extract_features(clf, train), train.labels, train.num_classes, cfg.shrinkage, reference)
    save_class_stats(stats, output_url)
    offsets = GenerationPlan.load(plan_url(previous_feedback_url)).next_offsets() if previous_feedback_url else None
    plan = make_plan(train, cfg, round_index, val_errors, offsets)
    plan.save(plan_url(output_url))
    storage.write_json(storage.join(output_url, "feedback_config.json"), result_settings(cfg))
    summary = {"num_images": plan.total, "num_shards": len(plan.shards), "target": plan.target,
               "shrinkage": stats.shrinkage, "counts": plan.counts, "round": round_index, "rounds": cfg.rounds,
               "steered_by_validation": val_errors is not None}
    return StageResult("extract_feedback", summary, {"planned_images": float(plan.total),
                                                     "shards": float(len(plan.shards)), "shrinkage": stats.shrinkage},
                       datasets=[splits(dataset_url, "train", "val")])


def cell_errors(clf, data: ImageSet, per_group: bool) -> dict[str, tuple[int, int]]:
    """``{cell key: (mistakes, images)}`` of ``clf`` on ``data``, per class or per (class, group)."""
    from feedback_synth.training.evaluate import predict_logits

    wrong = predict_logits(clf, data).argmax(1) != data.labels
    out = {}
    for c in range(data.num_classes):
        for g in range(data.num_groups if per_group else 1):
            mask = (data.labels == c) & ((data.groups == g) if per_group else True)
            key = f"{data.class_names[c]}/{data.group_names[g]}" if per_group else data.class_names[c]
            out[key] = (int(wrong[mask].sum()), int(mask.sum()))
    return out
