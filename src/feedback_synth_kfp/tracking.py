"""MLflow from KFP tasks: the parent run of a pipeline run, a nested run per task, the exit handler."""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict
from typing import Any, Callable, Iterator, Optional

from feedback_synth.config import RunConfig, TrackingConfig
from feedback_synth.errors import ConfigError, FeedbackSynthError
from feedback_synth.orchestration.shared import log_run_epilogue, run_logged_stage
from feedback_synth.stages.promote import promote_once
from feedback_synth.stages.result import StageResult
from feedback_synth.tracking.base import NullTracker
from feedback_synth.tracking.client import mlflow_errors
from feedback_synth.tracking.mlflow_tracker import PIPELINE_ERROR_TAG, PIPELINE_STATE_TAG, STAGE_TAG, MLflowTracker
from feedback_synth.tracking.stale import running_runs

log = logging.getLogger(__name__)


# A local KFP run (``run --runner kfp-local``) sets this in the environment of its task processes;
# start_tracking tags the parent run with it, so that the runner finds the run if the pipeline fails.
LAUNCH_ENV, LAUNCH_TAG = "FEEDBACK_SYNTH_LAUNCH_ID", "feedback_synth.launch_id"
# ... and this: a file where a task that fails with a one-line error writes it, for the runner to report
TASK_ERRORS_ENV = "FEEDBACK_SYNTH_TASK_ERRORS"


def start_tracking(mlflow_tracking_uri: str, experiment: str, registered_model: str, run_name: str,
                   kfp_run_id: str, config: dict[str, Any], output_url: str = "") -> str:
    """Open the MLflow parent run of one pipeline run (left open: ``promote`` closes it); returns
    the tracking context the stage tasks take (JSON with ``parent_run_id``), or '' when tracking is
    off (empty URI)."""
    if not mlflow_tracking_uri:
        return ""
    # the run's own tracking settings (retries, timeouts) where the config carries them
    cfg = TrackingConfig(**{**(config.get("tracking") or {}), "tracking_uri": mlflow_tracking_uri,
                            "experiment": experiment, "registered_model": registered_model})
    tracker = MLflowTracker(cfg, output_url, kfp_run_id=kfp_run_id or None)
    launch = os.environ.get(LAUNCH_ENV)  # set by the local runner, to find this run if the pipeline fails
    tracker.start(run_name, config, tags={LAUNCH_TAG: launch} if launch else None)
    return json.dumps({"tracking": asdict(cfg), "parent_run_id": tracker.run_id, "kfp_run_id": kfp_run_id})


def finish_tracking(mlflow_tracking_uri: str, experiment: str, kfp_run_id: Optional[str], state: str,
                    error_message: str = "", launch_id: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The pipeline's exit handler: close the MLflow runs this KFP run left open (see
    ``close_pipeline_runs``; ``launch_id`` finds a local run instead). ``state`` is
    KFP's final state of the pipeline (``SUCCEEDED``, ``FAILED``, ``CANCELED``...). None when
    tracking is off."""
    if not mlflow_tracking_uri:
        return None
    cfg = TrackingConfig(tracking_uri=mlflow_tracking_uri, experiment=experiment)
    return close_pipeline_runs(MLflowTracker(cfg, ""), kfp_run_id, state == "SUCCEEDED", error_message, launch_id)


TRACKING_KEY = "context"  # metadata key of start_tracking's artifact: the tracking context (JSON, '' = off)


def tracking_context(tracking: Any) -> str:
    """The tracking context: start_tracking's output artifact (its metadata), or the JSON itself.

    An artifact, not a string parameter, because the KFP local runner (2.17) hands the loop item
    to every task-output parameter inside a ParallelFor: a string would not reach the shard tasks.
    """
    if hasattr(tracking, "metadata"):
        return (tracking.metadata or {}).get(TRACKING_KEY, "")
    return tracking or ""


CONFIG_KEY = "config"  # metadata key of start_tracking's artifact: the run's resolved RunConfig (asdict)


def config_from_artifact(tracking: Any) -> RunConfig:
    """The run's configuration as start_tracking resolved it from the pipeline's parameters (the
    device as asked: ``run_config`` resolves it for a task)."""
    from feedback_synth_kfp.parameters import config_from_dict

    config = (tracking.metadata or {}).get(CONFIG_KEY) if hasattr(tracking, "metadata") else tracking
    if not config:
        raise ConfigError("the tracking artifact carries no run configuration (was it made by start_tracking?)")
    return config_from_dict(json.loads(config) if isinstance(config, str) else config)


def run_config(tracking: Any, stage: str) -> RunConfig:
    """The run's configuration, as start_tracking resolved it once from the pipeline's parameters:
    every task reads its stage's section from here, with the devices resolved on the task's own pod
    (``config.resolve_devices``). A GPU task (``placement.GPU_STAGES``) resolves the run's device:
    auto is CUDA where the pod has it, and a device the pod lacks is one line here, before any
    work. Every other task runs on its CPU pod's CPU."""
    import dataclasses

    from feedback_synth.config import SECTION_DEVICES, resolve_devices
    from feedback_synth_kfp.placement import on_gpu

    cfg = config_from_artifact(tracking)
    if not on_gpu(stage):
        cfg = dataclasses.replace(cfg, device="cpu", **{name: dataclasses.replace(getattr(cfg, name), device="cpu")
                                                        for name in SECTION_DEVICES})
    return resolve_devices(cfg)


@contextlib.contextmanager
def attached(tracking: Any, output_url: str) -> Iterator[Any]:
    """A tracker attached to the pipeline's parent run (the null tracker when tracking is off);
    the parent run stays open when the task ends."""
    context = tracking_context(tracking)
    if not context:
        yield NullTracker()
        return
    ctx = json.loads(context)
    tracker = MLflowTracker(TrackingConfig(**ctx["tracking"]), output_url, parent_run_id=ctx["parent_run_id"],
                            kfp_run_id=ctx.get("kfp_run_id") or None)
    tracker.start("", {})
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    finally:
        tracker.finish(status)


# metadata key of extract_feedback's output: the round's generate run, where the shard tasks log
GENERATE_RUN_KEY = "generate_run_id"


def open_stage_run(tracking: Any, name: str, output_url: str) -> str:
    """Open a stage run under the pipeline's parent run and leave it open, for a fan-out's tasks to
    log under (``under_run``) and a later task to close (``close_stage_run``); its id, '' when
    tracking is off. The in-process runner's one ``generate`` run per round is, on KFP, this run
    with a ``generate_shard_N`` child per shard."""
    with attached(tracking, output_url) as tracker:
        return tracker.open_stage(name)


def under_run(tracking: Any, run_id: str) -> Any:
    """start_tracking's artifact as the tasks read it, with ``run_id`` as the run their stage runs
    nest under (the parent run when ``run_id`` is '')."""
    from types import SimpleNamespace

    context = tracking_context(tracking)
    if not context or not run_id:
        return tracking
    metadata = dict(getattr(tracking, "metadata", None) or {})
    metadata[TRACKING_KEY] = json.dumps({**json.loads(context), "parent_run_id": run_id})
    return SimpleNamespace(metadata=metadata)


def close_stage_run(tracking: Any, run_id: str, metrics: dict[str, Any], output_url: str) -> None:
    """Log ``metrics`` to a run ``open_stage_run`` opened, and end it FINISHED."""
    if not run_id or not tracking_context(tracking):
        return
    with attached(under_run(tracking, run_id), output_url) as tracker:
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.client.set_terminated(run_id, "FINISHED")


def run_task_stage(tracking: Any, name: str, params: dict[str, Any], output_url: str,
                   work: Callable[[Any], StageResult]) -> StageResult:
    """One stage task: the stage's work, logged as the in-process runner logs it
    (``orchestration.shared.run_logged_stage``: a nested run under the pipeline's parent run)."""
    with reported_errors(name):
        with attached(tracking, output_url) as tracker:
            return run_logged_stage(tracker, name, params, work)


@contextlib.contextmanager
def reported_errors(name: str) -> Iterator[None]:
    """A task's one-line error (a FeedbackSynthError) is also written where the runner reads it back
    (the local runner: ``$TASK_ERRORS_ENV``), so that the run ends with that line, not KFP's."""
    try:
        yield
    except FeedbackSynthError as exc:
        errors = os.environ.get(TASK_ERRORS_ENV)
        if errors:
            with open(errors, "a", encoding="utf-8") as f:
                f.write(f"{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n")
        raise


def log_epilogue(tracking: Any, output_url: str, evaluation: StageResult) -> None:
    """The parent run's epilogue (``orchestration.shared.log_run_epilogue``: the evaluation's metrics,
    ``report.md``, the rounds), as the in-process runner logs it."""
    with attached(tracking, output_url) as tracker:
        log_run_epilogue(tracker, evaluation)


def run_table_stage(tracking: Any, name: str, inputs: dict[str, Any], output_url: str, round_index: int = 1,
                    rounds: int = 1, shard_ids: Optional[list[int]] = None,
                    run_name: Optional[str] = None) -> StageResult:
    """A stage task's whole body: its row of the stage table (``orchestration.stage_table``) called with
    the run's config (resolved on this pod, ``run_config``), its inputs' URLs by name and its
    output, logged as the in-process runner logs it (``run_task_stage``)."""
    from dataclasses import replace

    from feedback_synth.orchestration.shared import RunLayout
    from feedback_synth.orchestration.stage_table import StageContext, stage

    row = stage(name)
    ctx = StageContext(run_config(tracking, name), inputs, output_url, round_index, shard_ids=shard_ids)
    return run_task_stage(tracking, run_name or RunLayout.run_name(name, round_index, rounds), row.params(ctx),
                          output_url, lambda on_epoch: row.call(replace(ctx, on_epoch=on_epoch)))


def promote(tracking: Any, model_url: str, report_url: str, report: dict[str, Any], cfg: RunConfig,
            test_dataset_url: str) -> Optional[dict[str, Any]]:
    """Register the retrained model and gate it, once (``stages.promote.promote_once``, as in
    process); then close the parent run, the pipeline's last step. None when tracking is off
    (there is no registry to promote in)."""
    if not tracking_context(tracking):
        return None
    with attached(tracking, report_url) as tracker:
        result = promote_once(tracker, model_url, report_url, report, cfg.promote, tracker.cfg, test_dataset_url)
        tracker.client.set_terminated(tracker.run_id, "FINISHED")
    return result


def close_pipeline_runs(tracker, kfp_run_id: Optional[str], succeeded: bool, message: str = "",
                        launch_id: Optional[str] = None) -> dict[str, Any]:
    """Close what one KFP run left open (its exit handler calls this, whatever happened). The
    run is ``kfp_run_id``, or (a local run, whose id the runner does not know) the one whose
    parent run carries the ``launch_id`` tag.

    The parent run, still RUNNING when a stage failed before ``promote`` closed it, ends FAILED
    (or FINISHED if the pipeline succeeded), tagged with the pipeline's state and error. A stage
    run still RUNNING belonged to a pod that died without closing it (OOM-killed, preempted,
    retried): it ends KILLED. Returns what was closed.
    """
    tracker.connect()
    closed: dict[str, Any] = {"parent": None, "killed_stages": []}
    with mlflow_errors("close the runs of the pipeline run"):
        exp = tracker.client.get_experiment_by_name(tracker.cfg.experiment)
        if exp is None:
            return closed
        if launch_id:
            parents = tracker.client.raw.search_runs([exp.experiment_id],
                                                  filter_string=f"tags.`{LAUNCH_TAG}` = '{launch_id}'")
            kfp_run_id = parents[0].data.tags.get("kfp.run_id") if parents else None
        if not kfp_run_id:
            return closed
        for run in running_runs(tracker.client.raw, exp.experiment_id, "kfp.run_id", kfp_run_id):
            run_id = run.info.run_id
            if "mlflow.parentRunId" in run.data.tags:
                tracker.client.set_terminated(run_id, "KILLED")
                closed["killed_stages"].append(run.data.tags.get(STAGE_TAG, run.info.run_name))
                continue
            status = "FINISHED" if succeeded else "FAILED"
            tags = {PIPELINE_STATE_TAG: "SUCCEEDED" if succeeded else "FAILED"}
            if message:
                tags[PIPELINE_ERROR_TAG] = message[:4900]
            tracker.set_run_tags(run_id, tags)
            tracker.client.set_terminated(run_id, status)
            closed["parent"] = {"run_id": run_id, "status": status}
    return closed
