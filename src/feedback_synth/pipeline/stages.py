"""The pipeline's stages as plain functions: each reads and writes fsspec URLs, takes one typed
config, and returns a ``StageResult``. The CLI, the in-process runner and the KFP components all
call these (docs/method.md: the system).

    prepare_data -> train_baseline -> extract_feedback -> generate (sharded) -> filter_synthetic
    -> retrain -> evaluate_run -> promote (feedback_synth.registry)

Heavy libraries (timm, diffusers, scikit-learn) are imported inside the stage that needs them: a
KFP task imports only its own stage's, which keeps its start-up short.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Optional

from feedback_synth import storage
from feedback_synth.config import DataConfig, FeedbackConfig, FilterConfig, GenerateConfig, RetrainConfig, TrainConfig
from feedback_synth.data.imageset import ImageSet, load_info, load_split
from feedback_synth.errors import DataError
from feedback_synth.pipeline.result import StageResult, scalar_metrics

EpochHook = Optional[Callable[[dict[str, Any]], None]]


def model_url(stage_output_url: str) -> str:
    """Where a training stage puts its checkpoint folder."""
    return storage.join(stage_output_url, "model")


def plan_url(feedback_url: str) -> str:
    """Where extract_feedback puts the generation plan."""
    return storage.join(feedback_url, "plan.json")


def prepare_data(cfg: DataConfig, output_url: str) -> StageResult:
    """Load and check the dataset (built-in or URL) and write its splits to ``output_url``."""
    from feedback_synth.data.prepare import prepare_dataset

    info = prepare_dataset(cfg, output_url)
    return StageResult("prepare_data", asdict(info), {"train_images": float(sum(info.train_class_counts)),
                                                       "classes": float(len(info.class_names))})


def _val_eval(dataset_url: str, data_cfg: DataConfig) -> Optional[Callable]:
    from feedback_synth.training.evaluate import evaluate

    if "val" not in load_info(dataset_url).splits:
        return None
    val = load_split(dataset_url, "val")

    def fn(clf) -> dict[str, float]:
        m = evaluate(clf, val, data_cfg)
        return {"val_accuracy": m["overall"], **({"val_few": m["few"]} if m.get("few") is not None else {})}

    return fn


def _finish_training(stage: str, clf, history, dataset_url: str, output_url: str, cfg: Any, data_cfg: DataConfig,
                     extra: Optional[dict[str, Any]] = None) -> StageResult:
    import yaml

    from feedback_synth.training.classifier import save_classifier
    from feedback_synth.training.evaluate import evaluate

    metrics = evaluate(clf, load_split(dataset_url, "test"), data_cfg)
    save_classifier(clf, model_url(output_url), {"train_config.yaml": yaml.safe_dump(
        {"train": asdict(cfg), "data": asdict(data_cfg), **(extra or {})}, sort_keys=False)})
    storage.write_json(storage.join(output_url, "metrics.json"), metrics)
    storage.write_json(storage.join(output_url, "history.json"), history)
    return StageResult(stage, {**metrics, **(extra or {})}, scalar_metrics(metrics, "test_"))


def train_baseline(dataset_url: str, output_url: str, cfg: TrainConfig, data_cfg: DataConfig,
                   on_epoch: EpochHook = None) -> StageResult:
    """Train the baseline classifier on the real (imbalanced) data and evaluate it on the test set.

    Writes ``model/`` (safetensors + config.json + train_config.yaml), ``metrics.json`` and
    ``history.json`` (per-epoch metrics) under ``output_url``.
    """
    from feedback_synth.training.train import train_classifier

    train = load_split(dataset_url, "train")
    clf, history = train_classifier(train, cfg, cfg.model, recipe=baseline_recipe(cfg), on_epoch=on_epoch,
                                    eval_fn=_val_eval(dataset_url, data_cfg), desc="baseline")
    return _finish_training("train_baseline", clf, history, dataset_url, output_url, cfg, data_cfg)


def baseline_recipe(cfg: TrainConfig):
    """The baseline's loss and sampler (``training.train.Recipe``)."""
    from feedback_synth.training.losses import LOSSES
    from feedback_synth.training.train import Recipe

    return Recipe(LOSSES.check(cfg.loss, "train.loss"), cfg.tau, cfg.balanced_sampler)


def retrain_recipe(cfg: RetrainConfig, baseline_model_url: str):
    """Retraining's loss and sampler: its own where set, else the baseline's (read from the
    baseline checkpoint's ``train_config.yaml``), so that the run's delta is the gain of synthesis
    over the same recipe without it."""
    from feedback_synth.training.losses import LOSSES
    from feedback_synth.training.train import Recipe

    base = (storage.read_yaml(storage.join(baseline_model_url, "train_config.yaml")) or {}).get("train") or {}
    loss = cfg.loss or base.get("loss", "ce")
    return Recipe(LOSSES.check(loss, "retrain.loss"), cfg.tau if cfg.tau is not None else float(base.get("tau", 1.0)),
                  cfg.balanced_sampler if cfg.balanced_sampler is not None else bool(base.get("balanced_sampler")),
                  cfg.prior)


def extract_feedback(dataset_url: str, baseline_model_url: str, output_url: str, cfg: FeedbackConfig) -> StageResult:
    """Freeze the classifier, fit the class statistics of ``hardness``, and plan the generation."""
    from feedback_synth.synthesis.feedback import extract_features, fit_class_stats, save_class_stats
    from feedback_synth.synthesis.plan import make_plan
    from feedback_synth.training.classifier import load_classifier

    train = load_split(dataset_url, "train")
    clf = load_classifier(baseline_model_url)
    reference = None
    if "val" in load_info(dataset_url).splits:  # held-out real images: the off_support yardstick
        val = load_split(dataset_url, "val")
        reference = (extract_features(clf, val), val.labels)
    stats = fit_class_stats(extract_features(clf, train), train.labels, train.num_classes, cfg.shrinkage, reference)
    save_class_stats(stats, output_url)
    plan = make_plan(train, cfg)
    plan.save(plan_url(output_url))
    storage.write_json(storage.join(output_url, "feedback_config.json"), asdict(cfg))
    summary = {"num_images": plan.total, "num_shards": len(plan.shards), "target": plan.target,
               "shrinkage": stats.shrinkage, "counts": plan.counts}
    return StageResult("extract_feedback", summary, {"planned_images": float(plan.total),
                                                     "shards": float(len(plan.shards)), "shrinkage": stats.shrinkage})


def generate(dataset_url: str, baseline_model_url: str, feedback_url: str, output_url: str, cfg: GenerateConfig,
             shard_ids: Optional[list[int]] = None) -> StageResult:
    """Generate every shard of the plan (or ``shard_ids``) in this process; finished ones are skipped."""
    from feedback_synth.generation.shards import generate as generate_shards
    from feedback_synth.guidance.criteria import CRITERIA

    CRITERIA.check(cfg.criterion, "generate.criterion")
    summary = generate_shards(plan_url(feedback_url), dataset_url, baseline_model_url, feedback_url, output_url, cfg,
                              shard_ids=shard_ids)
    return StageResult("generate", summary, {"generated_images": float(summary["num_images"]),
                                             "generation_seconds": float(summary["seconds"])})


def filter_synthetic(dataset_url: str, baseline_model_url: str, feedback_url: str, generated_url: str | list[str],
                     output_url: str, cfg: FilterConfig) -> StageResult:
    """Filter the generated images (``generated_url``: the generate output, or one per shard task).

    Writes ``synthetic.npz`` (kept), ``kept_metadata.json`` (their metadata rows),
    ``filter_report.json`` (per class: dropped by which filter and why) and ``samples.png``.
    """
    import numpy as np

    from feedback_synth.generation.shards import load_generated
    from feedback_synth.reporting import plots
    from feedback_synth.synthesis.feedback import extract_features, load_class_stats
    from feedback_synth.synthesis.filtering import FilterInputs, apply_filters
    from feedback_synth.synthesis.plan import GenerationPlan
    from feedback_synth.training.classifier import load_classifier

    train = load_split(dataset_url, "train")
    plan = GenerationPlan.load(plan_url(feedback_url))
    generated, rows = load_generated(generated_url, plan, train)
    clf = load_classifier(baseline_model_url)
    inp = FilterInputs(generated.images, generated.labels, np.array([r["finite"] for r in rows], bool),
                       extract_features(clf, generated), extract_features(clf, train), train.labels,
                       load_class_stats(feedback_url))
    keep, report = apply_filters(inp, cfg, train.class_names)
    kept = generated.subset(np.flatnonzero(keep))
    kept.save(storage.join(output_url, "synthetic.npz"))
    storage.write_json(storage.join(output_url, "kept_metadata.json"), [r for r, k in zip(rows, keep) if k])
    crit = [r["criterion_value"] for r in rows]
    report["mean_criterion_value"] = float(np.mean(crit)) if crit else None
    report["criterion"] = rows[0]["criterion"] if rows else None
    storage.write_json(storage.join(output_url, "filter_report.json"), report)
    storage.write_bytes(storage.join(output_url, "samples.png"), plots.sample_grid(
        {"real (train)": (train.images, train.labels), "synthetic (kept)": (kept.images, kept.labels)},
        train.class_names, title="Real training images and kept synthetic images per class"))
    return StageResult("filter", report, scalar_metrics({"generated": report["generated"], "kept": report["kept"],
                                                         "mean_criterion_value": report["mean_criterion_value"]}),
                       [storage.join(output_url, "filter_report.json"), storage.join(output_url, "samples.png")])


def retrain(dataset_url: str, baseline_model_url: str, filtered_url: str, output_url: str, cfg: RetrainConfig,
            data_cfg: DataConfig, on_epoch: EpochHook = None) -> StageResult:
    """Retrain the baseline's architecture from scratch on real + kept synthetic images."""
    from feedback_synth.training.classifier import load_classifier
    from feedback_synth.training.train import train_classifier

    train = load_split(dataset_url, "train")
    synthetic = ImageSet.load(storage.join(filtered_url, "synthetic.npz"))
    if synthetic.class_names != train.class_names:
        raise DataError(f"synthetic images in {filtered_url} have classes {synthetic.class_names[:5]}..., "
                        f"the dataset has {train.class_names[:5]}...")
    model = load_classifier(baseline_model_url).spec.model
    recipe = retrain_recipe(cfg, baseline_model_url)
    clf, history = train_classifier(train, cfg, model, synthetic=synthetic, synthetic_fraction=cfg.synthetic_fraction,
                                    recipe=recipe, on_epoch=on_epoch, eval_fn=_val_eval(dataset_url, data_cfg),
                                    desc="retrain")
    result = _finish_training("retrain", clf, history, dataset_url, output_url, cfg, data_cfg,
                              {"model": model, "num_synthetic": len(synthetic), "recipe": asdict(recipe)})
    result.metrics["num_synthetic"] = float(len(synthetic))
    return result


REPORT_FILES = ("report.md", "per_class_accuracy.png", "confusion_baseline.png", "confusion_retrained.png")


def evaluate_run(dataset_url: str, baseline_url: str, retrained_url: str, filtered_url: str, output_url: str,
                 data_cfg: DataConfig) -> StageResult:
    """Compare baseline and retrained models; write ``report.json``, ``report.md`` and the plots."""
    from feedback_synth.pipeline.oracle import fidelity
    from feedback_synth.reporting import plots
    from feedback_synth.reporting.tables import format_report
    from feedback_synth.training.classifier import load_classifier
    from feedback_synth.training.evaluate import summary

    before = storage.read_json(storage.join(baseline_url, "metrics.json"))
    after = storage.read_json(storage.join(retrained_url, "metrics.json"))
    info = load_info(dataset_url)
    synthetic = ImageSet.load(storage.join(filtered_url, "synthetic.npz"))
    filter_report = storage.read_json(storage.join(filtered_url, "filter_report.json"))
    model = load_classifier(model_url(baseline_url)).spec.model
    fid = fidelity(dataset_url, synthetic, model, oracle_url=storage.join(output_url, "oracle"))
    storage.write_bytes(storage.join(output_url, "per_class_accuracy.png"), plots.per_class_accuracy(
        before["per_class"], after["per_class"], info.class_names, info.train_class_counts))
    for name, m in (("baseline", before), ("retrained", after)):
        storage.write_bytes(storage.join(output_url, f"confusion_{name}.png"),
                            plots.confusion_matrix(m["confusion_matrix"], info.class_names, f"{name} (test)"))
    b, a = summary(before), summary(after)
    report = {"baseline": b, "retrained": a, "delta": {k: v - b[k] for k, v in a.items() if k in b},
              "generated": filter_report["generated"], "kept": filter_report["kept"], "fidelity": fid,
              "per_class": {"baseline": before["per_class"], "retrained": after["per_class"]},
              "class_names": info.class_names, "train_class_counts": info.train_class_counts}
    storage.write_json(storage.join(output_url, "report.json"), report)
    storage.write_text(storage.join(output_url, "report.md"), format_report(report))
    metrics = {**scalar_metrics(b, "baseline_"), **scalar_metrics(a, "retrained_"),
               **scalar_metrics(report["delta"], "delta_"),
               **scalar_metrics({"fidelity": fid, "generated": report["generated"], "kept": report["kept"]})}
    return StageResult("evaluate", report, metrics, [storage.join(output_url, n) for n in REPORT_FILES])
