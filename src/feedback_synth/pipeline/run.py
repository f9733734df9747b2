"""The whole pipeline, in process: every stage in order, on one machine."""
from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any, Callable, Optional

from feedback_synth import storage
from feedback_synth.config import RunConfig
from feedback_synth.pipeline import stages
from feedback_synth.pipeline.preflight import preflight
from feedback_synth.pipeline.result import StageResult, log_stage_result
from feedback_synth.tracking.base import NullTracker, make_tracker

STAGE_DIRS = ("data", "baseline", "feedback", "generated", "filtered", "retrained", "report")


def stage_urls(output_url: str) -> dict[str, str]:
    return {name: storage.join(output_url, name) for name in STAGE_DIRS}


def run_pipeline(cfg: RunConfig, output_url: str, tracker: Optional[NullTracker] = None,
                 run_name: Optional[str] = None) -> dict[str, Any]:
    """Run every stage in this process; returns the evaluation report plus timings and paths.

    Stages: prepare data -> train baseline -> extract feedback -> generate -> filter -> retrain ->
    evaluate -> promote (when tracking is on). The resolved config is saved as ``config.yaml``.
    """
    from feedback_synth.registry.register import register_and_promote

    preflight(cfg)
    urls = stage_urls(output_url)
    storage.write_yaml(storage.join(output_url, "config.yaml"), asdict(cfg))
    tracker = tracker or make_tracker(cfg.tracking, output_url)
    tracker.start(run_name or output_url.rstrip("/").rsplit("/", 1)[-1], asdict(cfg))
    timings: dict[str, float] = {}
    status = "FAILED"

    def stage(name: str, params: dict[str, Any], fn: Callable[..., StageResult], *args, epochs: bool = False,
              **kwargs) -> StageResult:
        """Run one stage in its own nested run and log its result."""
        t0 = time.time()
        with tracker.stage(name, params) as log:
            if epochs:
                kwargs["on_epoch"] = lambda r: log.log_metrics(r, step=r["epoch"])
            result = fn(*args, **kwargs)
            timings[name] = round(time.time() - t0, 2)
            log_stage_result(log, result)
            log.log_metrics({"seconds": timings[name]})
        return result

    try:
        model = stages.model_url(urls["baseline"])
        stage("prepare_data", asdict(cfg.data), stages.prepare_data, cfg.data, urls["data"])
        stage("train_baseline", asdict(cfg.train), stages.train_baseline, urls["data"], urls["baseline"], cfg.train,
              cfg.data, epochs=True)
        stage("extract_feedback", asdict(cfg.feedback), stages.extract_feedback, urls["data"], model, urls["feedback"],
              cfg.feedback)
        gen = stage("generate", asdict(cfg.generate), stages.generate, urls["data"], model, urls["feedback"],
                    urls["generated"], cfg.generate)
        stage("filter", asdict(cfg.filter), stages.filter_synthetic, urls["data"], model, urls["feedback"],
              urls["generated"], urls["filtered"], cfg.filter)
        stage("retrain", asdict(cfg.retrain), stages.retrain, urls["data"], model, urls["filtered"], urls["retrained"],
              cfg.retrain, cfg.data, epochs=True)
        evaluation = stage("evaluate", {}, stages.evaluate_run, urls["data"], urls["baseline"], urls["retrained"],
                           urls["filtered"], urls["report"], cfg.data)
        report = evaluation.summary
        tracker.log_metrics({k: v for k, v in evaluation.metrics.items() if not k.startswith("delta_")})
        promotion = None
        if tracker.run_id is not None:  # a registry to promote in
            t0 = time.time()
            with tracker.stage("promote", asdict(cfg.promote)) as log:
                promotion = register_and_promote(tracker, stages.model_url(urls["retrained"]), report, cfg.promote,
                                                 run_id=log.run_id)
            timings["promote"] = round(time.time() - t0, 2)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    report.update({"timings": timings, "generation": gen.summary, "outputs": urls, "promotion": promotion,
                   "mlflow_run_id": tracker.run_id})
    storage.write_json(storage.join(urls["report"], "run_summary.json"), {k: v for k, v in report.items() if k != "per_class"})
    return report
