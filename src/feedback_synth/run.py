"""The whole pipeline, in process: every stage in order, on one machine."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Optional

from . import io, stages
from .config import RunConfig
from .errors import ConfigError, DataError
from .generate import generate
from .generators import BUILTIN_GENERATOR, builtin_generator_path
from .tracking import NullTracker, make_tracker

STAGE_DIRS = ("data", "baseline", "feedback", "generated", "filtered", "retrained", "report")


def stage_urls(output_url: str) -> dict[str, str]:
    return {name: io.join(output_url, name) for name in STAGE_DIRS}


def preflight(cfg: RunConfig) -> None:
    """Checks that need no long work, run before any: a bad value stops the run at once."""
    cfg.validate()
    import os

    import timm

    builtin = cfg.data.dataset in ("digits-lt", "digits-groups")
    if not builtin and not io.exists(cfg.data.dataset):
        raise DataError(f"dataset not found: {cfg.data.dataset}")
    if not timm.is_model(cfg.train.model):
        raise ConfigError(f"config field 'train.model': unknown timm model '{cfg.train.model}'")
    if cfg.generate.generator == BUILTIN_GENERATOR:
        if not builtin:
            raise ConfigError("config field 'generate.generator': the bundled generator only knows the built-in "
                              f"datasets; dataset '{cfg.data.dataset}' needs a diffusers model folder URL")
        if not os.path.isdir(builtin_generator_path(cfg.data.dataset)):
            raise ConfigError(f"config field 'generate.generator': no bundled generator for '{cfg.data.dataset}'")
    elif not io.exists(cfg.generate.generator):
        raise DataError(f"generator model folder not found: {cfg.generate.generator}")
    if cfg.feedback.per_group and cfg.data.dataset == "digits-lt":
        raise ConfigError("config field 'feedback.per_group': digits-lt has no groups")


def run_pipeline(cfg: RunConfig, output_url: str, tracker: Optional[NullTracker] = None,
                 run_name: Optional[str] = None) -> dict[str, Any]:
    """Run every stage in this process; returns the evaluation report plus timings and paths.

    Stages: prepare data -> train baseline -> extract feedback -> generate -> filter -> retrain ->
    evaluate -> promote (when tracking is on). The resolved config is saved as ``config.yaml``.
    """
    preflight(cfg)
    urls = stage_urls(output_url)
    io.write_yaml(io.join(output_url, "config.yaml"), asdict(cfg))
    tracker = tracker or make_tracker(cfg.tracking, output_url)
    tracker.start(run_name or output_url.rstrip("/").rsplit("/", 1)[-1], asdict(cfg))
    timings: dict[str, float] = {}
    status = "FAILED"
    try:
        def timed(name: str, params: dict, fn, *args, **kwargs):
            t0 = time.time()
            with tracker.stage(name, params) as log:
                out = fn(*args, **kwargs) if "on_epoch" not in kwargs else fn(
                    *args, **{**kwargs, "on_epoch": lambda r: log.log_metrics(r, step=r["epoch"])})
                timings[name] = round(time.time() - t0, 2)
                log.log_metrics({"seconds": timings[name]})
                return out, log

        info, log = timed("prepare_data", asdict(cfg.data), stages.prepare_data, cfg.data, urls["data"])
        base, log = timed("train_baseline", asdict(cfg.train), stages.train_baseline, urls["data"], urls["baseline"],
                          cfg.train, cfg.data, on_epoch=None)
        log.log_metrics(base, prefix="test_")
        model = stages.model_url(urls["baseline"])
        fb, log = timed("extract_feedback", asdict(cfg.feedback), stages.extract_feedback, urls["data"], model,
                        urls["feedback"], cfg.feedback)
        log.log_metrics({"planned_images": fb["num_images"], "shards": fb["num_shards"], "shrinkage": fb["shrinkage"]})
        gen, log = timed("generate", asdict(cfg.generate), generate, stages.plan_url(urls["feedback"]), urls["data"],
                         model, urls["feedback"], urls["generated"], cfg.generate)
        log.log_metrics({"generated_images": gen["num_images"], "generation_seconds": gen["seconds"]})
        flt, log = timed("filter", asdict(cfg.filter), stages.filter_synthetic, urls["data"], model, urls["feedback"],
                         urls["generated"], urls["filtered"], cfg.filter)
        log.log_metrics({"generated": flt["generated"], "kept": flt["kept"],
                         "mean_criterion_value": flt.get("mean_criterion_value")})
        log.log_artifact_url(io.join(urls["filtered"], "filter_report.json"))
        log.log_artifact_url(io.join(urls["filtered"], "samples.png"))
        ret, log = timed("retrain", asdict(cfg.retrain), stages.retrain, urls["data"], model, urls["filtered"],
                         urls["retrained"], cfg.retrain, cfg.data, on_epoch=None)
        log.log_metrics(ret, prefix="test_")
        report, log = timed("evaluate", {}, stages.evaluate_run, urls["data"], urls["baseline"], urls["retrained"],
                            urls["filtered"], urls["report"], cfg.data)
        for name in ("report.md", "per_class_accuracy.png", "confusion_baseline.png", "confusion_retrained.png"):
            log.log_artifact_url(io.join(urls["report"], name))
        tracker.log_metrics({**{f"baseline_{k}": v for k, v in report["baseline"].items()},
                             **{f"retrained_{k}": v for k, v in report["retrained"].items()},
                             "fidelity": report["fidelity"], "generated": report["generated"], "kept": report["kept"]})
        promotion = None
        if hasattr(tracker, "register_and_promote"):
            promotion, _ = timed("promote", asdict(cfg.promote), tracker.register_and_promote,
                                 stages.model_url(urls["retrained"]), report, cfg.promote)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    report.update({"timings": timings, "generation": gen, "outputs": urls, "promotion": promotion,
                   "mlflow_run_id": tracker.run_id})
    io.write_json(io.join(urls["report"], "run_summary.json"), {k: v for k, v in report.items() if k != "per_class"})
    return report


def format_summary(report: dict[str, Any]) -> str:
    """What ``feedback-synth run`` prints at the end."""
    urls = report["outputs"]
    lines = ["", stages.format_report(report).rstrip(), ""]
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()))
    lines += ["", "outputs:",
              f"  baseline model     {stages.model_url(urls['baseline'])}",
              f"  retrained model    {stages.model_url(urls['retrained'])}",
              f"  synthetic samples  {io.join(urls['filtered'], 'samples.png')}",
              f"  per-class accuracy {io.join(urls['report'], 'per_class_accuracy.png')}",
              f"  report             {io.join(urls['report'], 'report.md')}"]
    if report.get("promotion"):
        p = report["promotion"]
        lines.append(f"  registry           {p.get('model_name')} v{p.get('version')}: "
                     f"{'promoted to champion' if p.get('promoted') else 'stays challenger'} ({p.get('reason')})")
    if report.get("mlflow_run_id"):
        lines.append(f"  MLflow run         {report['mlflow_run_id']}")
    return "\n".join(lines)
