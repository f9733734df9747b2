"""The pipeline's stages as plain functions: each reads and writes fsspec URLs, takes one typed
config, and returns a small JSON-able summary. The CLI, the in-process runner and the KFP
components all call these.

    prepare_data -> train_baseline -> extract_feedback -> generate (sharded) -> filter_synthetic
    -> retrain -> evaluate_run -> (promote: see feedback_synth.promote)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Callable, Optional

import numpy as np
import yaml

from . import io, plots
from .classifier import load_classifier, save_classifier
from .config import DataConfig, FeedbackConfig, FilterConfig, RetrainConfig, TrainConfig
from .data import ImageSet, load_info, load_split, prepare_dataset
from .errors import DataError
from .evaluate import evaluate, predict_logits, summary
from .feedback import GenerationPlan, extract_features, fit_class_stats, load_class_stats, make_plan, save_class_stats
from .filtering import FilterInputs, apply_filters
from .generate import generate, load_generated  # noqa: F401  (re-exported: a stage)
from .train import train_classifier

log = logging.getLogger(__name__)

EpochHook = Optional[Callable[[dict[str, Any]], None]]


def model_url(stage_output_url: str) -> str:
    """Where a training stage puts its checkpoint folder."""
    return io.join(stage_output_url, "model")


def prepare_data(cfg: DataConfig, output_url: str) -> dict[str, Any]:
    """Load and check the dataset (built-in or URL) and write its splits to ``output_url``."""
    info = prepare_dataset(cfg, output_url)
    return asdict(info)


def _val_eval(dataset_url: str, data_cfg: DataConfig) -> Optional[Callable]:
    info = load_info(dataset_url)
    if "val" not in info.splits:
        return None
    val = load_split(dataset_url, "val")

    def fn(clf) -> dict[str, float]:
        m = evaluate(clf, val, data_cfg)
        return {"val_accuracy": m["overall"], **({"val_few": m["few"]} if m.get("few") is not None else {})}

    return fn


def _finish_training(clf, history, dataset_url: str, output_url: str, cfg: Any, data_cfg: DataConfig,
                     extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    test = load_split(dataset_url, "test")
    metrics = evaluate(clf, test, data_cfg)
    save_classifier(clf, model_url(output_url), {"train_config.yaml": yaml.safe_dump(
        {"train": asdict(cfg), "data": asdict(data_cfg), **(extra or {})}, sort_keys=False)})
    io.write_json(io.join(output_url, "metrics.json"), metrics)
    io.write_json(io.join(output_url, "history.json"), history)
    return metrics


def train_baseline(dataset_url: str, output_url: str, cfg: TrainConfig, data_cfg: DataConfig,
                   on_epoch: EpochHook = None) -> dict[str, Any]:
    """Train the baseline classifier on the real (imbalanced) data and evaluate it on the test set.

    Writes ``model/`` (safetensors + config.json + train_config.yaml), ``metrics.json`` and
    ``history.json`` (per-epoch metrics) under ``output_url``.
    """
    cfg.validate()
    train = load_split(dataset_url, "train")
    clf, history = train_classifier(train, cfg, cfg.model, loss=cfg.loss, balanced_sampler=cfg.balanced_sampler,
                                    on_epoch=on_epoch, eval_fn=_val_eval(dataset_url, data_cfg), desc="baseline")
    return _finish_training(clf, history, dataset_url, output_url, cfg, data_cfg)


def extract_feedback(dataset_url: str, baseline_model_url: str, output_url: str, cfg: FeedbackConfig) -> dict[str, Any]:
    """Freeze the classifier, fit the class statistics of ``hardness``, and plan the generation."""
    cfg.validate()
    train = load_split(dataset_url, "train")
    clf = load_classifier(baseline_model_url)
    reference = None
    if "val" in load_info(dataset_url).splits:  # held-out real images: the off_support yardstick
        val = load_split(dataset_url, "val")
        reference = (extract_features(clf, val), val.labels)
    stats = fit_class_stats(extract_features(clf, train), train.labels, train.num_classes, cfg.shrinkage, reference)
    save_class_stats(stats, output_url)
    plan = make_plan(train, cfg)
    plan.save(io.join(output_url, "plan.json"))
    io.write_json(io.join(output_url, "feedback_config.json"), asdict(cfg))
    return {"num_images": plan.total, "num_shards": len(plan.shards), "target": plan.target,
            "shrinkage": stats.shrinkage, "counts": plan.counts}


def plan_url(feedback_url: str) -> str:
    return io.join(feedback_url, "plan.json")


def filter_synthetic(dataset_url: str, baseline_model_url: str, feedback_url: str, generated_url: str | list[str],
                     output_url: str, cfg: FilterConfig) -> dict[str, Any]:
    """Filter the generated images (``generated_url``: the generate output, or one per shard task); writes ``synthetic.npz`` (kept), ``metadata.csv`` rows of the kept
    images, ``filter_report.json`` and a sample grid ``samples.png``."""
    cfg.validate()
    train = load_split(dataset_url, "train")
    plan = GenerationPlan.load(plan_url(feedback_url))
    generated, rows = load_generated(generated_url, plan, train)
    clf = load_classifier(baseline_model_url)
    inp = FilterInputs(generated.images, generated.labels, np.array([r["finite"] for r in rows], bool),
                       extract_features(clf, generated), extract_features(clf, train), train.labels,
                       load_class_stats(feedback_url))
    keep, report = apply_filters(inp, cfg, train.class_names)
    kept = generated.subset(np.flatnonzero(keep))
    kept.save(io.join(output_url, "synthetic.npz"))
    io.write_json(io.join(output_url, "kept_metadata.json"), [r for r, k in zip(rows, keep) if k])
    crit = [r["criterion_value"] for r in rows]
    report["mean_criterion_value"] = float(np.mean(crit)) if crit else None
    report["criterion"] = rows[0]["criterion"] if rows else None
    io.write_json(io.join(output_url, "filter_report.json"), report)
    io.write_bytes(io.join(output_url, "samples.png"), plots.sample_grid(
        {"real (train)": (train.images, train.labels), "synthetic (kept)": (kept.images, kept.labels)},
        train.class_names, title="Real training images and kept synthetic images per class"))
    return report


def retrain(dataset_url: str, baseline_model_url: str, filtered_url: str, output_url: str, cfg: RetrainConfig,
            data_cfg: DataConfig, on_epoch: EpochHook = None) -> dict[str, Any]:
    """Retrain the baseline's architecture from scratch on real + kept synthetic images."""
    cfg.validate()
    train = load_split(dataset_url, "train")
    synthetic = ImageSet.load(io.join(filtered_url, "synthetic.npz"))
    if synthetic.class_names != train.class_names:
        raise DataError(f"synthetic images in {filtered_url} have classes {synthetic.class_names[:5]}..., "
                        f"the dataset has {train.class_names[:5]}...")
    model = load_classifier(baseline_model_url).spec.model
    clf, history = train_classifier(train, cfg, model, synthetic=synthetic, synthetic_fraction=cfg.synthetic_fraction,
                                    on_epoch=on_epoch, eval_fn=_val_eval(dataset_url, data_cfg), desc="retrain")
    metrics = _finish_training(clf, history, dataset_url, output_url, cfg, data_cfg,
                               {"model": model, "num_synthetic": len(synthetic)})
    metrics["num_synthetic"] = len(synthetic)
    return metrics


def cache_dir() -> str:
    """Where work that does not depend on the run is kept between runs: ``$FEEDBACK_SYNTH_CACHE``,
    else ``$XDG_CACHE_HOME/feedback-synth`` (``~/.cache/feedback-synth``). Any fsspec URL."""
    if os.environ.get("FEEDBACK_SYNTH_CACHE"):
        return os.environ["FEEDBACK_SYNTH_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "feedback-synth")


def oracle_cache_key(split: ImageSet, model: str, cfg: RetrainConfig) -> str:
    """The oracle is a function of its training data, model and config (and this code's version)."""
    from . import __version__

    h = hashlib.sha256()
    for part in (split.images, split.labels, split.groups):
        h.update(np.ascontiguousarray(part).tobytes())
    h.update(json.dumps({"model": model, "train": asdict(cfg), "version": __version__}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def fidelity(dataset_url: str, synthetic: ImageSet, model: str, seed: int = 0,
             oracle_url: Optional[str] = None) -> Optional[float]:
    """Share of synthetic images that an oracle (trained on balanced real task data, the dataset's
    ``oracle`` split) labels as their intended class; None when the dataset has no oracle split.

    The oracle is trained once per (oracle split, model, config) and kept in ``cache_dir()``; a copy
    goes to ``oracle_url``."""
    info = load_info(dataset_url)
    if "oracle" not in info.splits or len(synthetic) == 0:
        return None
    if oracle_url and io.exists(io.join(oracle_url, "config.json")):
        oracle = load_classifier(oracle_url)
    else:
        split, cfg = load_split(dataset_url, "oracle"), RetrainConfig(seed=seed)
        cached = io.join(cache_dir(), "oracles", oracle_cache_key(split, model, cfg))
        if io.exists(io.join(cached, "config.json")):
            oracle = load_classifier(cached)
        else:
            oracle, _ = train_classifier(split, cfg, model, desc="oracle")
            try:
                save_classifier(oracle, cached)
            except OSError as exc:  # a read-only home in a pod: the run goes on without the cache
                log.warning("could not cache the fidelity oracle in %s: %s", cached, exc)
        if oracle_url:
            save_classifier(oracle, oracle_url)
    preds = predict_logits(oracle, synthetic).argmax(1)
    return float((preds == synthetic.labels).mean())


def evaluate_run(dataset_url: str, baseline_url: str, retrained_url: str, filtered_url: str, output_url: str,
                 data_cfg: DataConfig) -> dict[str, Any]:
    """Compare baseline and retrained models; write ``report.json``, ``report.md`` and the plots."""
    t0 = time.time()
    before = io.read_json(io.join(baseline_url, "metrics.json"))
    after = io.read_json(io.join(retrained_url, "metrics.json"))
    info = load_info(dataset_url)
    synthetic = ImageSet.load(io.join(filtered_url, "synthetic.npz"))
    filter_report = io.read_json(io.join(filtered_url, "filter_report.json"))
    model = load_classifier(model_url(baseline_url)).spec.model
    fid = fidelity(dataset_url, synthetic, model, oracle_url=io.join(output_url, "oracle"))
    io.write_bytes(io.join(output_url, "per_class_accuracy.png"), plots.per_class_accuracy(
        before["per_class"], after["per_class"], info.class_names, info.train_class_counts))
    for name, m in (("baseline", before), ("retrained", after)):
        io.write_bytes(io.join(output_url, f"confusion_{name}.png"),
                       plots.confusion_matrix(m["confusion_matrix"], info.class_names, f"{name} (test)"))
    report = {"baseline": summary(before), "retrained": summary(after),
              "delta": {k: after_v - summary(before)[k] for k, after_v in summary(after).items() if k in summary(before)},
              "generated": filter_report["generated"], "kept": filter_report["kept"], "fidelity": fid,
              "per_class": {"baseline": before["per_class"], "retrained": after["per_class"]},
              "class_names": info.class_names, "train_class_counts": info.train_class_counts}
    io.write_json(io.join(output_url, "report.json"), report)
    io.write_text(io.join(output_url, "report.md"), format_report(report))
    report["seconds"] = round(time.time() - t0, 2)
    return report


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """The baseline vs retrained table (Markdown, also readable in a terminal)."""
    keys = [k for k in ("overall", "many", "medium", "few", "worst_class", "average_group", "worst_group")
            if k in report["baseline"]]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name in ("baseline", "retrained"):
        lines.append(f"| {name} | " + " | ".join(_fmt(report[name].get(k)) for k in keys) + " |")
    lines.append("| delta | " + " | ".join(f"{report['delta'][k]:+.3f}" if k in report["delta"] else "-" for k in keys) + " |")
    fid = report.get("fidelity")
    lines += ["", f"synthetic images: {report['generated']} generated, {report['kept']} kept"
              + (f"; fidelity (oracle agrees with the intended class): {fid:.3f}" if fid is not None else "")]
    return "\n".join(lines) + "\n"
