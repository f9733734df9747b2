"""``feedback-synth run --runner kfp-local``: the KFP pipeline itself, through the KFP local runner.

Every stage runs as its KFP component, each in its own Python process (``SubprocessRunner`` with
``use_venv=False``: this environment, where feedback_synth is installed), with artifacts passed as
KFP passes them. The result has the same keys as the in-process runner's (``run.run_pipeline``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict
from typing import Any, Optional

from . import io
from .config import RunConfig
from .errors import FeedbackSynthError
from .kfp_support import artifact_url, finish_tracking, tracking_context
from .tracking import LAUNCH_ENV

log = logging.getLogger(__name__)


class KFPRunError(FeedbackSynthError, RuntimeError):
    """A task of the pipeline failed in the KFP local runner (its log is printed above)."""


# RunConfig section -> {config field: pipeline parameter}; every other field goes to the
# section's JSON override parameter (``<section>_overrides``) when it differs from its default.
NAMED_PARAMETERS: dict[str, dict[str, str]] = {
    "data": {"dataset": "dataset"},
    "train": {"model": "classifier_model"},
    "feedback": {"budget_fraction": "budget_fraction", "shard_size": "shard_size"},
    "generate": {"generator": "generator", "criterion": "criterion", "scale": "scale", "guide_every": "guide_every",
                 "device": "gpu_device"},
    "filter": {},
    "retrain": {"device": "gpu_device"},
    "promote": {"gate_metric": "gate_metric", "min_gain": "min_gain", "max_overall_drop": "max_overall_drop"},
}

# pipeline output -> the in-process runner's stage name (``timings`` keys)
_TIMED = (("data", "prepare_data"), ("baseline", "train_baseline"), ("feedback", "extract_feedback"),
          ("filtered", "filter"), ("retrained", "retrain"), ("evaluation", "evaluate"), ("decision", "promote"))


def pipeline_arguments(cfg: RunConfig, mlflow_tracking_uri: str = "", workspace_url: str = "") -> dict[str, Any]:
    """The pipeline parameters that reproduce ``cfg`` exactly."""
    args: dict[str, Any] = {"workspace_url": workspace_url, "mlflow_tracking_uri": mlflow_tracking_uri,
                            "mlflow_experiment": cfg.tracking.experiment,
                            "registered_model": cfg.tracking.registered_model}
    for section, named in NAMED_PARAMETERS.items():
        for field, param in named.items():
            args.setdefault(param, getattr(getattr(cfg, section), field))  # gpu_device: generate's device
    for section, named in NAMED_PARAMETERS.items():
        value = getattr(cfg, section)
        defaults = type(value)()
        overrides = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                     if getattr(value, f.name) != (args[named[f.name]] if f.name in named else getattr(defaults, f.name))}
        args[f"{section}_overrides"] = json.dumps(overrides, sort_keys=True)
    return args


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _local_path(url: str) -> str:
    return os.path.abspath(url[len("file://"):] if url.startswith("file://") else url)


def _tracking_uri(cfg: RunConfig, output_url: str) -> str:
    """The MLflow URI the pipeline gets; '' (tracking off) unless tracking is on and available.

    As in process: ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite store
    in the run's folder, passed as that folder (``<output>/mlflow``: every task then finds the
    store and its artifact folder there).
    """
    if not cfg.tracking.enabled:
        return ""
    try:
        from . import mlflow_tracking  # noqa: F401
    except ImportError as exc:
        log.warning("MLflow tracking is unavailable (%s): the pipeline runs without it", exc)
        return ""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return os.path.join(_local_path(output_url), "mlflow") if _is_local(output_url) else os.path.abspath("mlruns")


def _num(v: Any) -> Any:
    """Artifact metadata comes back as floats: integral ones become ints again."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def run_kfp_local(cfg: RunConfig, output_url: str, parallelism: Optional[int] = None) -> dict[str, Any]:
    """Run the pipeline through the KFP local runner; returns the report of ``run.run_pipeline``.

    Args:
        cfg: the resolved run config (every stage's config is passed as pipeline parameters).
        output_url: the run's folder. A local folder holds the KFP pipeline root (``kfp/``) and the
            stages write into their artifacts there; for a remote URL (gs://...) the stages write
            under ``<output_url>/<run id>/`` (the pipeline's ``workspace_url``) and the pipeline root is
            a temporary local folder.
        parallelism: generation shards running at once (default: half the CPU cores, at least 1).
    """
    import kfp.local

    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import PipelineSettings, build_pipeline

    from .run import preflight

    preflight(cfg)
    io.write_yaml(io.join(output_url, "config.yaml"), asdict(cfg))
    if _is_local(output_url):
        root, workspace = os.path.join(_local_path(output_url), "kfp"), ""
    else:
        root, workspace = tempfile.mkdtemp(prefix="feedback-synth-kfp-"), output_url
    parallelism = parallelism or max(1, (os.cpu_count() or 2) // 2)
    # no retries here: a failure on this machine is not a preempted node
    pipeline = build_pipeline(PipelineSettings(parallelism=parallelism, gpu_retries=0, exit_handler=False))
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=True)
    t0 = time.time()
    tracking_uri = _tracking_uri(cfg, output_url)
    # compiled without the exit handler (its outputs are read below): a failed run's MLflow runs
    # are closed here instead, found by a launch id that start_tracking tags on the parent run
    launch_id = uuid.uuid4().hex
    before = os.environ.get(LAUNCH_ENV)
    os.environ[LAUNCH_ENV] = launch_id  # the task processes inherit it
    try:
        with warnings.catch_warnings():
            # expected here: our images' components run in this environment, and the local runner
            # ignores the Kubernetes settings (resources, accelerators, display names)
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            task = pipeline(**pipeline_arguments(cfg, tracking_uri, workspace))
    except RuntimeError as exc:
        message = f"the pipeline failed in the KFP local runner: {exc} (task logs above; outputs under {root})"
        try:
            finish_tracking(tracking_uri, cfg.tracking.experiment, None, "FAILED", message, launch_id=launch_id)
        except FeedbackSynthError as close_error:  # the pipeline's own error matters more
            log.warning("could not close the MLflow runs of the failed run: %s", close_error)
        raise KFPRunError(message) from None
    finally:
        if before is None:
            os.environ.pop(LAUNCH_ENV, None)
        else:
            os.environ[LAUNCH_ENV] = before
    out = task.outputs
    urls = {name: artifact_url(out[name]) for name in ("data", "baseline", "feedback", "filtered", "retrained",
                                                        "evaluation")}
    report = io.read_json(io.join(urls["evaluation"], "report.json"))
    generation = {k: _num(v) for k, v in dict(out["filtered"].metadata.get("generation", {})).items()}
    timings = {stage: round(float(out[name].metadata["seconds"]), 2) for name, stage in _TIMED
               if "seconds" in out[name].metadata}
    if generation.get("wall_seconds") is not None:
        timings = {**{k: v for k, v in timings.items() if k in ("prepare_data", "train_baseline", "extract_feedback")},
                   "generate": generation["wall_seconds"],
                   **{k: v for k, v in timings.items() if k not in ("prepare_data", "train_baseline", "extract_feedback")}}
    promotion = json.loads(out["decision"].metadata.get("promotion") or "null")
    tracking = tracking_context(out["tracking"])
    report.update({
        "timings": timings, "pipeline_seconds": round(time.time() - t0, 2), "generation": generation,
        "outputs": {"data": urls["data"], "baseline": urls["baseline"], "feedback": urls["feedback"],
                    "filtered": urls["filtered"], "retrained": urls["retrained"],
                    "report": urls["evaluation"], "kfp_pipeline_root": root},
        "promotion": promotion, "mlflow_run_id": json.loads(tracking)["parent_run_id"] if tracking else None})
    io.write_json(io.join(urls["evaluation"], "run_summary.json"), {k: v for k, v in report.items() if k != "per_class"})
    return report
