"""What the KFP components share: where a stage writes, how its config and tracking reach it.

The components in ``components/`` call one stage function each; this module holds the plumbing
around that call, so that it is tested here and not copied into nine component bodies:

- ``stage_output_url``: a stage writes under ``<workspace_url>/<run id>/<stage>`` when the
  pipeline has a workspace (a stable location: a retried shard pod resumes there), else into its
  own output artifact. ``artifact_url`` reads the location back on the consuming side.
- ``stage_params``: a stage config from the named pipeline parameters plus a JSON override.
- ``start_tracking`` / ``stage_run`` / ``promote``: one MLflow parent run per pipeline run, one
  nested run per stage task; all of it off when the pipeline's ``mlflow_tracking_uri`` is empty.
"""
from __future__ import annotations

import base64
import contextlib
import html
import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Iterator, Optional

import yaml

from . import io
from .config import PromoteConfig, TrackingConfig
from .errors import ConfigError
from .tracking import LAUNCH_ENV, LAUNCH_TAG, NullTracker

log = logging.getLogger(__name__)

URL_KEY = "url"  # artifact metadata key: where the stage really wrote (a workspace URL)


# ------------------------------------------------------------------------------ locations


def stage_output_url(artifact: Any, workspace_url: str, run_id: str, stage: str) -> str:
    """Where a stage task writes: ``<workspace_url>/<run_id>/<stage>``, or the artifact's own path.

    Shard tasks of one run share ``<workspace_url>/<run_id>/generated`` (each writes its own
    ``shards/shard-NNNNN``), so that a retried pod finds the committed shards of its run.
    """
    if not workspace_url:
        return artifact.path
    if not run_id:
        raise ConfigError("a workspace_url needs the pipeline run id (run_id) to name the run's folder")
    return io.join(workspace_url, run_id, stage)


def artifact_url(artifact: Any) -> str:
    """The URL a stage wrote to: the workspace URL recorded by ``publish``, else the artifact path."""
    return (artifact.metadata or {}).get(URL_KEY) or artifact.path


def publish(artifact: Any, url: str, **metadata: Any) -> None:
    """Record on the output artifact where the stage wrote and a few scalars for the KFP UI."""
    if url != artifact.path:
        artifact.metadata[URL_KEY] = url
    artifact.metadata.update({k: v for k, v in metadata.items() if v is not None})


# ------------------------------------------------------------------------------ configs


def stage_params(overrides: str, **named: Any) -> dict[str, Any]:
    """A stage's config dict: the named pipeline parameters, then the JSON (or YAML) object
    ``overrides`` on top (any field of the stage's config; applied last)."""
    extra = yaml.safe_load(overrides) if overrides and overrides.strip() else {}
    if not isinstance(extra, dict):
        raise ConfigError(f"stage overrides must be a JSON object of config fields, got {overrides!r}")
    return {**named, **extra}


# ------------------------------------------------------------------------------ tracking


def _tracker_class():
    try:
        from .mlflow_tracking import MLflowTracker
    except ImportError as exc:  # the MLflow tracker is not part of this build
        log.warning("MLflow tracking is unavailable (%s): tracking skipped", exc)
        return None
    return MLflowTracker


def start_tracking(mlflow_tracking_uri: str, experiment: str, registered_model: str, run_name: str,
                   kfp_run_id: str, config: dict[str, Any], output_url: str = "") -> str:
    """Open the MLflow parent run of one pipeline run (left open: ``promote`` closes it); returns
    the tracking context the stage tasks take (JSON with ``parent_run_id``), or '' when tracking is
    off (empty URI, or no MLflow tracker)."""
    if not mlflow_tracking_uri:
        return ""
    cls = _tracker_class()
    if cls is None:
        return ""
    cfg = TrackingConfig(tracking_uri=mlflow_tracking_uri, experiment=experiment, registered_model=registered_model)
    cfg.validate()
    tracker = cls(cfg, output_url, kfp_run_id=kfp_run_id or None)
    launch = os.environ.get(LAUNCH_ENV)  # set by the local runner, to find this run if the pipeline fails
    tracker.start(run_name, config, tags={LAUNCH_TAG: launch} if launch else None)
    return json.dumps({"tracking": asdict(cfg), "parent_run_id": tracker.run_id, "kfp_run_id": kfp_run_id})


def finish_tracking(mlflow_tracking_uri: str, experiment: str, kfp_run_id: Optional[str], state: str,
                    error_message: str = "", launch_id: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The pipeline's exit handler: close the MLflow runs this KFP run left open (see
    ``MLflowTracker.close_pipeline_runs``; ``launch_id`` finds a local run instead). ``state`` is
    KFP's final state of the pipeline (``SUCCEEDED``, ``FAILED``, ``CANCELED``...). None when
    tracking is off."""
    if not mlflow_tracking_uri:
        return None
    cls = _tracker_class()
    if cls is None:
        return None
    cfg = TrackingConfig(tracking_uri=mlflow_tracking_uri, experiment=experiment)
    cfg.validate()
    return cls(cfg, "").close_pipeline_runs(kfp_run_id, state == "SUCCEEDED", error_message, launch_id)


TRACKING_KEY = "context"  # metadata key of start_tracking's artifact: the tracking context (JSON, '' = off)


def tracking_context(tracking: Any) -> str:
    """The tracking context: start_tracking's output artifact (its metadata), or the JSON itself.

    An artifact, not a string parameter, because the KFP local runner (2.17) hands the loop item
    to every task-output parameter inside a ParallelFor: a string would not reach the shard tasks.
    """
    if hasattr(tracking, "metadata"):
        return (tracking.metadata or {}).get(TRACKING_KEY, "")
    return tracking or ""


def _attach(tracking: Any, name: str, output_url: str):
    """A tracker attached to the pipeline's parent run (None when tracking is off)."""
    context = tracking_context(tracking)
    if not context:
        return None
    cls = _tracker_class()
    if cls is None:
        return None
    ctx = json.loads(context)
    tracker = cls(TrackingConfig(**ctx["tracking"]), output_url, parent_run_id=ctx["parent_run_id"],
                  kfp_run_id=ctx.get("kfp_run_id") or None)
    tracker.start(name, {})
    return tracker


class StageRun:
    """One stage task: its tracker (a nested MLflow run, or a no-op) and its wall time."""

    def __init__(self, log_to: Any):
        self.log = log_to
        self.t0 = time.time()
        self.seconds: Optional[float] = None

    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None, prefix: str = "") -> None:
        self.log.log_metrics(metrics, step=step, prefix=prefix)

    def on_epoch(self, record: dict[str, Any]) -> None:
        """Per-epoch training metrics (the ``on_epoch`` hook of the training stages)."""
        self.log.log_metrics(record, step=record.get("epoch"))


@contextlib.contextmanager
def stage_run(tracking: Any, name: str, params: dict[str, Any], output_url: str) -> Iterator[StageRun]:
    """A nested MLflow run named ``name`` under the pipeline's parent run (a no-op when tracking
    is off); logs ``params`` and the stage's wall time (``seconds``)."""
    tracker = _attach(tracking, name, output_url)
    if tracker is None:
        run = StageRun(NullTracker())
        yield run
        run.seconds = round(time.time() - run.t0, 2)
        return
    status = "FAILED"
    try:
        with tracker.stage(name, params) as logger:
            run = StageRun(logger)
            yield run
            run.seconds = round(time.time() - run.t0, 2)
            logger.log_metrics({"seconds": run.seconds})
        status = "FINISHED"
    finally:
        tracker.finish(status)  # attached: the parent run stays open


def promote(tracking: Any, model_url: str, report: dict[str, Any], cfg: PromoteConfig,
            output_url: str = "") -> Optional[dict[str, Any]]:
    """Register the retrained model (alias ``challenger``) and move ``champion`` to it if it passes
    the gate, in a nested ``promote`` run; then close the parent run, the pipeline's last step.
    None when tracking is off (there is no registry to promote in)."""
    tracker = _attach(tracking, "promote", output_url)
    if tracker is None:
        return None
    status = "FAILED"
    try:
        with tracker.stage("promote", asdict(cfg)) as logger:
            result = logger.register_and_promote(model_url, report, cfg)
        status = "FINISHED"
    finally:
        tracker.finish(status)
        tracker.client.set_terminated(tracker.run_id, status)
    return result


# ------------------------------------------------------------------------------ KFP UI outputs


def scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of ``values`` (None, lists and dicts dropped), for ``Metrics``."""
    return {f"{prefix}{k}": float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_kfp_metrics(metrics_artifact: Any, values: dict[str, Any], prefix: str = "") -> None:
    for k, v in scalars(values, prefix).items():
        metrics_artifact.log_metric(k, v)


def png_html(png: bytes, title: str, caption: str = "") -> str:
    """A small HTML page showing one PNG (the KFP UI renders HTML artifacts)."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<p>{html.escape(caption)}</p>" if caption else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h3>{html.escape(title)}</h3>{cap}<img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{data}'/></body></html>")


def generation_summary(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The in-process ``generate`` summary, from the metadata of the shard tasks (``publish``ed
    with ``started``, ``seconds`` (task wall time), ``generation_seconds``, ``num_images``,
    ``skipped``, ``criterion``); ``wall_seconds``: first shard start to last shard end."""
    done = [s for s in shards if not s.get("skipped")]
    spans = [(s["started"], s["started"] + s["seconds"]) for s in shards if "started" in s and "seconds" in s]
    return {"shards": len(shards), "skipped": sum(bool(s.get("skipped")) for s in shards),
            "num_images": int(sum(s.get("num_images", 0) for s in shards)),
            "seconds": round(sum(s.get("generation_seconds", 0.0) for s in done), 3),
            "criterion": shards[0].get("criterion") if shards else None,
            "wall_seconds": round(max(e for _, e in spans) - min(b for b, _ in spans), 2) if spans else None}


def promotion_markdown(result: Optional[dict[str, Any]]) -> str:
    """The promote task's decision, for the KFP UI."""
    if result is None:
        return "# Promotion\n\nSkipped: tracking is off (no `mlflow_tracking_uri`), so there is no registry.\n"
    verdict = "promoted to **champion**" if result.get("promoted") else "stays **challenger**"
    return (f"# Promotion\n\n`{result.get('model_name')}` version {result.get('version')}: {verdict}.\n\n"
            f"{result.get('reason', '')}\n")


def unique(urls: list[str]) -> list[str]:
    """``urls`` without repeats, in order (shard tasks that share a workspace folder)."""
    return list(dict.fromkeys(urls))
