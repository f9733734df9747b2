"""The whole pipeline, in process: every stage in order, on one machine.

    prepare data -> train baseline -> [extract feedback -> generate -> filter -> retrain] x rounds
    -> evaluate -> promote

A run owns its output folder: ``config.yaml`` (the resolved config), ``run.json`` (which process
writes it, and its MLflow parent run), one folder per stage (``data/``, ``baseline/``,
``feedback/``, ``generated/``, ``filtered/``, ``retrained/``, ``report/``; with feedback in rounds,
``rounds/round-<r>/{feedback,generated,filtered,retrained}``) and, for a local store, ``mlflow/``.

Re-running the same command into the same folder resumes: every finished stage (and shard) is
skipped by its fingerprint (``pipeline.resume``), and the MLflow runs that the dead process left
RUNNING are closed KILLED. Another config into a folder that holds a run is refused, naming the
fields that differ; ``overwrite=True`` (``--overwrite``) starts over in it.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from feedback_synth import storage
from feedback_synth.config import RunConfig
from feedback_synth.errors import ConfigError
from feedback_synth.fingerprints import differences
from feedback_synth.pipeline import stages
from feedback_synth.pipeline.preflight import preflight
from feedback_synth.pipeline.result import StageResult, log_stage_result
from feedback_synth.reporting.tables import format_report
from feedback_synth.tracking.base import NullTracker

RESUMED_TAG = "feedback_synth.resumed"


@dataclass
class RoundUrls:
    feedback: str
    generated: str
    filtered: str
    retrained: str


@dataclass
class RunLayout:
    """Where a run's stages write, under its output folder."""

    output: str
    rounds: int = 1

    def stage(self, name: str) -> str:
        return storage.join(self.output, name)

    def round(self, r: int) -> RoundUrls:
        base = self.output if self.rounds == 1 else storage.join(self.output, "rounds", f"round-{r}")
        return RoundUrls(*(storage.join(base, n) for n in ("feedback", "generated", "filtered", "retrained")))

    def stage_folders(self) -> list[str]:
        return ["data", "baseline", "feedback", "generated", "filtered", "retrained", "rounds", "report"]


def stage_urls(output_url: str, rounds: int = 1) -> dict[str, str]:
    """The run's main outputs: data, baseline, the last round's feedback .. retrained, report."""
    layout = RunLayout(output_url, rounds)
    last = layout.round(rounds)
    return {"data": layout.stage("data"), "baseline": layout.stage("baseline"), "feedback": last.feedback,
            "generated": last.generated, "filtered": last.filtered, "retrained": last.retrained,
            "report": layout.stage("report")}


# ------------------------------------------------------------------------------ owning the output


def make_tracker(cfg, output_url: str):
    """The tracker for a run: MLflow when ``cfg.enabled`` (``cfg``: the run's TrackingConfig), else
    the null tracker."""
    if not cfg.enabled:
        return NullTracker()
    from feedback_synth.tracking.mlflow_tracker import MLflowTracker  # mlflow only when tracking

    return MLflowTracker(cfg, output_url)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_output(cfg: RunConfig, output_url: str, overwrite: bool) -> Optional[dict[str, Any]]:
    """Make ``output_url`` this run's: refuse a folder that holds a run with another config (naming
    the fields) or one that a live process is writing; with ``overwrite`` empty it first (the local
    MLflow store stays: it is the history). Returns the previous process's record (``run.json``)."""
    config_url, record_url = storage.join(output_url, "config.yaml"), storage.join(output_url, "run.json")
    previous = storage.read_json(record_url) if storage.exists(record_url) else None
    if previous and previous.get("host") == socket.gethostname() and previous.get("pid") != os.getpid() \
            and _alive(int(previous.get("pid", -1))) and previous.get("state") == "running":
        raise ConfigError(f"output {output_url} is being written by process {previous['pid']} (started "
                          f"{previous.get('started')}); wait for it, or use another --output")
    if storage.exists(config_url):
        changed = differences(storage.read_yaml(config_url) or {}, asdict(cfg))
        if changed and not overwrite:
            shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
            raise ConfigError(f"output {output_url} holds a run with another config ({shown}); use another --output, "
                              f"or --overwrite to start over there")
        if changed or overwrite:
            for name in RunLayout(output_url).stage_folders():
                storage.remove(storage.join(output_url, name))
    return previous


def write_record(output_url: str, state: str, tracker: Any) -> None:
    storage.write_json(storage.join(output_url, "run.json"), {
        "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "state": state, "tracking_uri": getattr(tracker, "tracking_uri", None), "parent_run_id": tracker.run_id})


def close_stale_runs(tracker: Any, output_url: str, previous: Optional[dict[str, Any]]) -> list[str]:
    """The MLflow runs a dead earlier process left RUNNING in this output: closed KILLED."""
    from feedback_synth.tracking.stale import close_runs_of_output

    if previous is None or previous.get("state") != "running" or not getattr(tracker, "tracking_uri", None):
        return []
    return close_runs_of_output(tracker.tracking_uri, tracker.cfg.experiment, output_url, exclude=[tracker.run_id])


# ------------------------------------------------------------------------------ the run


def run_pipeline(cfg: RunConfig, output_url: str, tracker: Optional[NullTracker] = None,
                 run_name: Optional[str] = None, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage in this process; returns the evaluation report plus timings and paths.

    Args:
        cfg: the resolved run config.
        output_url: the run's folder (any fsspec URL); see the module docstring for its layout.
        tracker: where to log (default: MLflow when ``cfg.tracking.enabled``, else nothing).
        run_name: the MLflow parent run's name (default: the folder's name).
        overwrite: start over in a folder that holds a run with another config.
    """
    from feedback_synth.registry.register import register_and_promote

    preflight(cfg, output_url)
    previous = claim_output(cfg, output_url, overwrite)
    layout = RunLayout(output_url, cfg.feedback.rounds)
    tracker = tracker or make_tracker(cfg.tracking, output_url)
    tracker.start(run_name or output_url.rstrip("/").rsplit("/", 1)[-1], asdict(cfg))  # an unreachable server stops here
    storage.write_yaml(storage.join(output_url, "config.yaml"), asdict(cfg))
    closed = close_stale_runs(tracker, output_url, previous)
    if closed:
        tracker.set_tags({"feedback_synth.closed_stale_runs": str(len(closed))})
    write_record(output_url, "running", tracker)
    timings: dict[str, float] = {}
    status = "FAILED"

    def stage(parent: Any, name: str, params: dict[str, Any], fn: Callable[..., StageResult], *args,
              epochs: bool = False, **kwargs) -> StageResult:
        """Run one stage in its own nested run under ``parent`` and log its result (a resumed
        stage logs the result it finished with, tagged resumed)."""
        t0 = time.time()
        with parent.stage(name, params) as log:
            if epochs:
                kwargs["on_epoch"] = lambda r: log.log_metrics(r, step=r["epoch"])
            result = fn(*args, **kwargs)
            timings[name] = round(timings.get(name, 0.0) + time.time() - t0, 2)
            log_stage_result(log, result)
            if result.summary.get("resumed"):
                log.set_tags({RESUMED_TAG: "true"})
            log.log_metrics({"seconds": round(time.time() - t0, 2)})
        return result

    try:
        data, baseline = layout.stage("data"), layout.stage("baseline")
        stage(tracker, "prepare_data", asdict(cfg.data), stages.prepare_data, cfg.data, data)
        stage(tracker, "train_baseline", asdict(cfg.train), stages.train_baseline, data, baseline, cfg.train,
              cfg.data, epochs=True)
        gen, retrained, filtered = synthesis_rounds(cfg, layout, data, stages.model_url(baseline), tracker, stage)
        evaluation = stage(tracker, "evaluate", {}, stages.evaluate_run, data, baseline, retrained, filtered,
                           layout.stage("report"), cfg.data)
        report = evaluation.summary
        tracker.log_metrics(evaluation.metrics)  # the parent run: no synthesis, with synthesis, difference
        tracker.log_text(format_report(report), "report.md")
        for r in report["rounds"]:
            tracker.log_metrics({f"round_{k}": r[k] for k in ("few", "worst_class", "worst_group", "overall") if k in r},
                                step=r["round"])
        promotion = None
        if tracker.run_id is not None:  # a registry to promote in
            promotion = promote_once(tracker, cfg, layout, retrained, report, register_and_promote, timings)
        status = "FINISHED"
    finally:
        tracker.finish(status)
        write_record(output_url, "finished" if status == "FINISHED" else "failed", tracker)
    report.update({"timings": timings, "generation": gen, "outputs": stage_urls(output_url, cfg.feedback.rounds),
                   "promotion": promotion, "mlflow_run_id": tracker.run_id, "closed_stale_runs": len(closed)})
    storage.write_json(storage.join(layout.stage("report"), "run_summary.json"),
                       {k: v for k, v in report.items() if k != "per_class"})
    return report


def synthesis_rounds(cfg: RunConfig, layout: RunLayout, data: str, baseline_model: str, tracker: Any,
                     stage: Callable[..., StageResult]) -> tuple[dict[str, Any], str, str]:
    """Feedback, generation, filtering and retraining, once (``feedback.rounds`` 1) or in rounds.

    Round r extracts feedback from the latest model (the baseline, then the previous round's
    retrained model), generates its share of the budget with guidance from that model, filters,
    and retrains (from scratch, with the baseline's recipe) on real + every image kept so far.
    Returns (generation summary over all rounds, the last retrained output, the last filter output).
    """
    rounds = cfg.feedback.rounds
    latest, previous = baseline_model, None
    generation = {"shards": 0, "skipped": 0, "num_images": 0, "seconds": 0.0, "criterion": cfg.generate.criterion}
    for r in range(1, rounds + 1):
        urls = layout.round(r)
        scope = contextlib.nullcontext(tracker) if rounds == 1 else tracker.stage(f"round_{r}", {"round": r})
        with scope as parent:
            stage(parent, "extract_feedback", {**asdict(cfg.feedback), "round": r}, stages.extract_feedback, data,
                  latest, urls.feedback, cfg.feedback, r, previous.feedback if previous else None)
            gen = stage(parent, "generate", asdict(cfg.generate), stages.generate, data, latest, urls.feedback,
                        urls.generated, cfg.generate)
            stage(parent, "filter", asdict(cfg.filter), stages.filter_synthetic, data, latest, urls.feedback,
                  urls.generated, urls.filtered, cfg.filter, previous.filtered if previous else None)
            result = stage(parent, "retrain", asdict(cfg.retrain), stages.retrain, data, baseline_model, urls.filtered,
                           urls.retrained, cfg.retrain, cfg.data, epochs=True,
                           previous_retrained_url=previous.retrained if previous else None, round_index=r)
            if rounds > 1:
                parent.log_metrics({k: v for k, v in result.metrics.items() if k.startswith("test_")})
        for key in ("shards", "skipped", "num_images"):
            generation[key] += gen.summary[key]
        generation["seconds"] = round(generation["seconds"] + gen.summary["seconds"], 3)
        latest, previous = stages.model_url(urls.retrained), urls
    return generation, previous.retrained, previous.filtered


def promote_once(tracker: Any, cfg: RunConfig, layout: RunLayout, retrained: str, report: dict[str, Any],
                 register_and_promote: Callable, timings: dict[str, float]) -> dict[str, Any]:
    """Register and gate the retrained model, once per finished evaluation: a resumed run whose
    promotion was decided already reports that decision instead of registering a second version."""
    from feedback_synth.fingerprints import digest_of, read_marker

    decision_url = storage.join(layout.stage("report"), "promotion.json")
    key = digest_of({"evaluation": (read_marker(layout.stage("report")) or {}).get("digest"),
                     "promote": asdict(cfg.promote), "tracking": asdict(cfg.tracking)})
    if storage.exists(decision_url):
        done = storage.read_json(decision_url)
        if done.get("key") == key:
            return {**done["promotion"], "resumed": True}
    t0 = time.time()
    with tracker.stage("promote", asdict(cfg.promote)) as log:
        promotion = register_and_promote(tracker, stages.model_url(retrained), report, cfg.promote, run_id=log.run_id,
                                         test_dataset_url=layout.stage("data"))
    timings["promote"] = round(time.time() - t0, 2)
    storage.write_json(decision_url, {"key": key, "promotion": promotion})
    return promotion
