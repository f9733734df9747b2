"""``feedback-synth run --runner kfp-local``: the KFP pipeline itself, through the KFP local runner.

Every stage runs as its KFP component, each in its own Python process (``SubprocessRunner`` with
``use_venv=False``: this environment, where feedback_synth is installed), with artifacts passed as
KFP passes them. The result has the same keys as the in-process runner's (``feedback_synth.orchestration.run.run_pipeline``).
Each task process hands its work to a forked child of one warm process (``task_server``), so that
a task does not import torch, timm, diffusers and MLflow again; ``FEEDBACK_SYNTH_KFP_WARM_TASKS=0``
starts every task process cold instead.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import asdict
from typing import Any, Callable, Optional

from feedback_synth import storage
from feedback_synth.config import RunConfig
from feedback_synth.errors import FeedbackSynthError
from feedback_synth.orchestration.shared import write_run_summary
from feedback_synth.orchestration.stage_table import STAGE_NAMES, STAGES
from feedback_synth.tracking.client import scoped_environ, tracking_location
from feedback_synth_kfp.artifacts import artifact_url
from feedback_synth_kfp.launcher import LAUNCHER_ENV, launcher_alive, launcher_id, stop_tasks
from feedback_synth_kfp.parameters import pipeline_arguments
from feedback_synth_kfp.task_server import warm_tasks
from feedback_synth_kfp.tracking import LAUNCH_ENV, TASK_ERRORS_ENV, finish_tracking, tracking_context

log = logging.getLogger(__name__)


class KFPRunError(FeedbackSynthError, RuntimeError):
    """A task of the pipeline failed in the KFP local runner (its log is printed above)."""


# pipeline output -> its stage's name (``timings`` keys), from the stage table; a sharded stage's
# time is the wall time of its fan-out (the filter's ``generation`` metadata)
_TIMED = tuple((s.output, s.name) for s in STAGES if not s.sharded)
STAGE_ORDER = STAGE_NAMES
# "0" starts every task process cold, as KFP does without our task server (task_server.py)
WARM_TASKS_ENV = "FEEDBACK_SYNTH_KFP_WARM_TASKS"


def _num(v: Any) -> Any:
    """Artifact metadata comes back as floats: integral ones become ints again."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def run_kfp_local(cfg: RunConfig, output_url: str, parallelism: Optional[int] = None,
                  overwrite: bool = False) -> dict[str, Any]:
    """Run the pipeline through the KFP local runner; returns the report of ``run.run_pipeline``.

    Args:
        cfg: the resolved run config (every stage's config is passed as pipeline parameters).
        output_url: the run's folder. The stages write the in-process runner's layout into it (the
            pipeline's ``run_folder``), so that a re-run resumes from the stages' fingerprints and
            ``--overwrite`` treats it as it treats an in-process run; a local folder also holds the
            KFP pipeline root (``kfp/``: the tasks' executor records), a remote one (gs://...) gets
            a temporary local pipeline root.
        parallelism: generation shards running at once (default: half the CPU cores, at least 1).
        overwrite: start over in a folder that holds a run with another config.
    """
    from feedback_synth.orchestration.run import owned_output

    # started first: the server imports torch & co. while the pipeline is built
    with warm_tasks(_warm()) as warm, owned_output(cfg, output_url, overwrite) as previous:
        return _run_kfp_local(cfg, output_url, parallelism, previous, warm)


def _warm() -> bool:
    return os.environ.get(WARM_TASKS_ENV, "1") != "0"


def _pipeline_root(output_url: str) -> str:
    """Where the local runner keeps its task records: ``<output>/kfp`` for a local output, a
    temporary folder for a remote one (gs://...)."""
    if storage.local_path(output_url):
        return os.path.join(storage.local_path(output_url), "kfp")
    return tempfile.mkdtemp(prefix="feedback-synth-kfp-")


def _mark_record(output_url: str, launch_id: str) -> None:
    """Add to the claim's ``run.json`` (``orchestration.run.owned_output`` writes it, and settles its state
    when the run ends) the launch id that finds this run's MLflow runs if it dies."""
    record_url = storage.join(output_url, "run.json")
    record = storage.read_json(record_url) if storage.exists(record_url) else {}
    storage.write_json(record_url, {**record, "runner": "kfp-local", "launch_id": launch_id})


def _run_kfp_local(cfg: RunConfig, output_url: str, parallelism: Optional[int],
                   previous: Optional[dict[str, Any]] = None, warm: Optional[dict[str, str]] = None) -> dict[str, Any]:
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import PipelineSettings, build_pipeline

    storage.write_yaml(storage.join(output_url, "config.yaml"), asdict(cfg))
    root = _pipeline_root(output_url)
    parallelism = parallelism or max(1, (os.cpu_count() or 2) // 2)  # half the cores, at least one
    # no retries here: a failure on this machine is not a preempted node
    pipeline = build_pipeline(PipelineSettings(parallelism=parallelism, gpu_retries=0, exit_handler=False,
                                               rounds=cfg.feedback.rounds))
    t0 = time.time()
    tracking_uri = tracking_location(cfg.tracking, output_url) if cfg.tracking.enabled else ""
    # compiled without the exit handler (its outputs are read below): a failed run's MLflow runs
    # are closed here instead, found by a launch id that start_tracking tags on the parent run
    launch_id = uuid.uuid4().hex
    if tracking_uri and previous and previous.get("state") == "running" and previous.get("launch_id"):
        _close_launch(cfg, tracking_uri, previous["launch_id"], "killed: closed by a re-run into the same output",
                      "the killed run")
    _mark_record(output_url, launch_id)
    task = _run_tasks(lambda: pipeline(**pipeline_arguments(cfg, tracking_uri, ""), run_folder=output_url), cfg,
                      tracking_uri, launch_id, root, warm=warm)
    return _summary_of(task.outputs, root, t0)


def _close_launch(cfg: RunConfig, tracking_uri: str, launch_id: str, message: str, which: str) -> None:
    """Close the MLflow runs of launch ``launch_id`` as FAILED with ``message`` (best effort:
    what stopped the run matters more than a failure to close its runs)."""
    if not tracking_uri:
        return
    try:
        finish_tracking(tracking_uri, cfg.tracking.experiment, None, "FAILED", message, launch_id=launch_id)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        log.warning("could not close the MLflow runs of %s: %s", which, exc)


SCRATCH_PREFIX = "feedback-synth-kfp-scratch-"  # a launch's temporary folder (``_run_tasks``)
SCRATCH_OWNER = "launcher"  # the file in a scratch folder that names the launch's process (``launcher_id``)


def remove_orphaned_scratch(temp_dir: Optional[str] = None) -> list[str]:
    """Remove the scratch folders of launches whose process is gone (killed with SIGKILL, or a
    machine that lost power: no ``finally`` ran) from ``temp_dir`` (default: the temp folder).
    A folder whose owner file is missing or unreadable is left alone (it may be being made now).
    Returns the folders removed."""
    temp_dir = temp_dir or tempfile.gettempdir()
    removed = []
    for name in os.listdir(temp_dir):
        folder = os.path.join(temp_dir, name)
        if not name.startswith(SCRATCH_PREFIX) or not os.path.isdir(folder):
            continue
        try:
            with open(os.path.join(folder, SCRATCH_OWNER), encoding="utf-8") as f:
                owner = f.read().strip()
        except OSError:
            continue
        if owner and not launcher_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _run_tasks(run: Callable[[], Any], cfg: RunConfig, tracking_uri: str, launch_id: str, root: str,
               what: str = "pipeline", warm: Optional[dict[str, str]] = None):
    """Run a pipeline's tasks in the KFP local runner, its records under ``root`` (``run``: the
    pipeline called with its arguments); on a failure or an interrupt, close the launch's MLflow
    runs and stop its tasks.
    ``warm``: the environment that sends the task processes to a warm task server (``warm_tasks``).
    Returns what ``run`` returns (the pipeline task: its outputs)."""
    import kfp.local

    # this launch's scratch folder, removed at the end: the file a failing task writes its line to,
    # and KFP's workspace (kfp.local.init would make a /tmp/kfp-workspace-* and leave it there).
    # A launch killed before its end cannot remove its own: the next launch does (the owner file).
    for folder in remove_orphaned_scratch():
        log.info("removed the scratch folder of a killed launch: %s", folder)
    scratch = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
    try:
        with open(os.path.join(scratch, SCRATCH_OWNER), "w", encoding="utf-8") as f:
            f.write(launcher_id())
        errors_file, workspace = os.path.join(scratch, "errors.txt"), os.path.join(scratch, "workspace")
        os.makedirs(workspace)
        kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=root, workspace_root=workspace,
                       raise_on_error=True)
        return _run_initialised(run, cfg, tracking_uri, launch_id, root, what, warm, errors_file)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_initialised(run: Callable[[], Any], cfg: RunConfig, tracking_uri: str, launch_id: str, root: str, what: str,
                     warm: Optional[dict[str, str]], errors_file: str):
    """``_run_tasks``' body once the KFP local runner is initialised (``errors_file``: where a
    failing task writes its one-line error)."""
    try:
        # what the task processes inherit: the launch id, where a task writes its one-line error,
        # and this process's identity (a task ends when its launcher is gone: launcher.py)
        task_env = {LAUNCH_ENV: launch_id, TASK_ERRORS_ENV: errors_file, LAUNCHER_ENV: launcher_id()}
        # with ``warm``, the tasks fork from one warm process instead of importing torch & co. each
        with scoped_environ({**task_env, **(warm or {})}), warnings.catch_warnings():
            # expected here: our images' components run in this environment, and the local runner
            # ignores the Kubernetes settings (resources, accelerators, display names)
            warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
            warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
            return run()
    except RuntimeError as exc:
        reported = open(errors_file, encoding="utf-8").read().strip().splitlines() if os.path.exists(errors_file) else []
        # a task's own one-line error when it gave one (as the in-process runner reports it), else KFP's
        message = reported[-1] if reported else \
            f"the {what} failed in the KFP local runner: {exc} (task logs above; outputs under {root})"
        _close_launch(cfg, tracking_uri, launch_id, message, f"the failed {what}")
        raise KFPRunError(message) from None
    except BaseException:  # Ctrl-C or SIGTERM: the parent run and the open stage runs are closed too
        stop_tasks()  # a signal sent to this process alone would leave the running task at work
        _close_launch(cfg, tracking_uri, launch_id, "interrupted", f"the interrupted {what}")
        raise


def _summary_of(out, root: str, t0: float) -> dict[str, Any]:
    """The run's summary from the pipeline's outputs, as the in-process runner returns it."""
    urls = {name: artifact_url(out[name]) for name in ("data", "baseline", "adapted", "feedback", "filtered",
                                                        "retrained", "evaluation")}
    report = storage.read_json(storage.join(urls["evaluation"], "report.json"))
    generation = {k: _num(v) for k, v in dict(out["filtered"].metadata.get("generation", {})).items()}
    # per-round tasks carry their seconds over the rounds so far, as the in-process timings sum them
    timings = {stage: round(float(out[name].metadata.get("rounds_seconds", out[name].metadata["seconds"])), 2)
               for name, stage in _TIMED if "seconds" in out[name].metadata}
    if generation.get("wall_seconds") is not None:
        timings["generate"] = generation["wall_seconds"]
    promotion = json.loads(out["decision"].metadata.get("promotion") or "null")
    if promotion and promotion.get("resumed"):
        timings.pop("promote", None)
    timings = {stage: timings[stage] for stage in STAGE_ORDER if stage in timings}
    tracking = tracking_context(out["tracking"])
    outputs = {k: urls[k] for k in ("data", "baseline", "adapted", "feedback", "filtered", "retrained")}
    return write_run_summary(urls["evaluation"], report, timings=timings, generation=generation,
                             outputs={**outputs, "report": urls["evaluation"], "kfp_pipeline_root": root},
                             promotion=promotion, mlflow_run_id=json.loads(tracking)["parent_run_id"] if tracking else None,
                             pipeline_seconds=round(time.time() - t0, 2))


def run_pilot_kfp_local(cfg: RunConfig, output_url: str, grid: dict[str, list[Any]], folds: int, epochs: int,
                        parallelism: Optional[int] = None) -> dict[str, Any]:
    """The pilot through the KFP local runner (``pipelines/pilot_pipeline.py``: the folds and the
    cells fanned out, as on Kubeflow); returns the report of ``orchestration.tune.run_pilot``. The
    run's config travels as one value (the ``config`` parameter); the tasks write the in-process
    pilot's layout under ``output_url``, so either runner resumes the other's work."""
    with warm_tasks(_warm()) as warm:  # started first: the server imports torch & co. while the pipeline is built
        return _run_pilot_kfp_local(cfg, output_url, grid, folds, epochs, parallelism, warm)


def _run_pilot_kfp_local(cfg: RunConfig, output_url: str, grid: dict[str, list[Any]], folds: int, epochs: int,
                         parallelism: Optional[int], warm: dict[str, str]) -> dict[str, Any]:
    from feedback_synth_kfp.pipelines.pilot_pipeline import PilotSettings, build_pilot_pipeline

    root = _pipeline_root(output_url)
    parallelism = parallelism or max(1, (os.cpu_count() or 2) // 2)  # half the cores, at least one
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import PipelineSettings

    # no retries here: a failure on this machine is not a preempted node
    pipeline = build_pilot_pipeline(PilotSettings(pipeline=PipelineSettings(gpu_retries=0, exit_handler=False),
                                                  parallelism=parallelism, exit_handler=False))
    tracking_uri = tracking_location(cfg.tracking, output_url) if cfg.tracking.enabled else ""
    config = {k: v for k, v in asdict(cfg).items() if k != "device"}  # the run's config, one value
    _run_tasks(lambda: pipeline(output=output_url, dataset=cfg.data.dataset, grid=json.dumps(grid), folds=folds,
                                epochs=epochs, mlflow_tracking_uri=tracking_uri, mlflow_experiment=cfg.tracking.experiment,
                                device=cfg.device, config=json.dumps(config)),
               cfg, tracking_uri, uuid.uuid4().hex, root, "pilot", warm)
    return storage.read_json(storage.join(output_url, "tune_report.json"))

