"""The MLflow tracker: one parent run per pipeline run, one nested run per stage.

One parent run per pipeline run (tagged ``kfp.run_id`` when there is one), one nested run per
stage with that stage's resolved config as params, in an experiment tagged
``mlflow.experimentKind`` = ``custom_model_development`` (MLflow's kind for model training; the
3.17 UI itself picks its view from the link's ``?workflowType=machine_learning``, which the run
prints: :func:`ui_url`). The datasets a stage read are MLflow datasets logged as its inputs
and the parent run's (:mod:`feedback_synth.tracking.datasets`). The retrained classifier is an
MLflow 3 LoggedModel (:mod:`feedback_synth.registry.register`): an ``mlflow.pyfunc`` model
written as *code* (models-from-code: no pickled Python object) whose one artifact is the
checkpoint folder (``model.safetensors`` + ``config.json``), so loading it unpickles nothing. It
is registered as a new version with alias ``challenger``; the gate in
:mod:`feedback_synth.registry.promote` decides whether ``champion`` moves to it.

Where the tracking store lives: ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a
SQLite store in the run's output folder (``<output>/mlflow/mlflow.db``, artifacts beside it), so
``feedback-synth run`` needs no server. An unreachable server fails the run at ``start()``, before
any long work, with a :class:`~feedback_synth.errors.TrackingError`; a server that goes away
mid-run fails the next tracking call the same way once MLflow's own HTTP retries
(``tracking.retries``, with backoff: :mod:`feedback_synth.tracking.client`) are spent. Every
stage writes its outputs to the output folder before anything is logged, so nothing is lost.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from feedback_synth import storage
from feedback_synth.config import TrackingConfig
from feedback_synth.errors import TrackingError
from feedback_synth.interrupts import deferred
from feedback_synth.tracking.base import KFP_RUN_ID_ENV  # noqa: F401  (its home is base; used below)
from feedback_synth.tracking.client import (
    MAX_PARAM_LEN,
    REQUEST_ID_TAG,
    TrackingClient,
    flatten,
    make_client,
    metric_items,
    mlflow_errors,
    resolve_tracking_uri,
    say,
)

STAGE_TAG = "feedback_synth.stage"


PIPELINE_STATE_TAG = "feedback_synth.pipeline_state"  # set by the KFP exit handler

PIPELINE_ERROR_TAG = "feedback_synth.pipeline_error"

# MLflow's experiment kind for model training (the other kind is "genai_development"); the UI reads
# it when its workflow selector is off (MLflow 3.17 has it on: the view comes from ?workflowType=)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def relocate_local_store(tracking_uri: str, old_root: str, new_root: str) -> None:
    """Point a local SQLite store's artifact locations from ``old_root`` to ``new_root`` (a run
    folder that was moved or copied, store and artifacts together): the experiments', runs' and
    logged models' artifact locations, and the registered model versions' storage locations and
    sources (where a version's files are read from: ``models:/<name>@champion`` loads from there).
    Only for ``sqlite:///`` stores, whose file is the run folder's own."""
    import sqlite3

    if not tracking_uri.startswith("sqlite:///"):
        return
    old_root, new_root = old_root.rstrip("/"), new_root.rstrip("/")
    below = old_root.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "/%"
    from feedback_synth.tracking.client import sqlite_file

    db = sqlite3.connect(sqlite_file(tracking_uri))
    try:
        with db:
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                                  ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                                  ("model_versions", "source")):
                columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if column in columns:  # the root itself, or a path below it (not a sibling "<root>2")
                    db.execute(f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                               f"WHERE {column} = ? OR {column} LIKE ? ESCAPE '!'",
                               (new_root, len(old_root) + 1, old_root, below))
    finally:
        db.close()


def ui_url(server: str, experiment_id: str, run_id: Optional[str] = None) -> str:
    """The MLflow UI's page of a run (or experiment) in its model-training view. MLflow 3.17's UI
    picks the view from ``?workflowType=`` (else the browser's last choice, GenAI at first), not
    from the experiment's kind tag."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{server.rstrip('/')}/{page}?workflowType=machine_learning"


class _RunLogger:
    """What ``stage()`` yields: the tracker interface bound to one (nested) run."""

    def __init__(self, tracker: "MLflowTracker", run_id: str):
        self.tracker, self.run_id = tracker, run_id

    @contextlib.contextmanager
    def stage(self, name: str, params: Optional[dict[str, Any]] = None):
        with self.tracker.stage(name, params) as log:
            yield log

    def log_metrics(self, metrics, step=None, prefix=""):
        self.tracker.log_metrics_to(self.run_id, metrics, step, prefix)

    def log_artifact_url(self, url, artifact_path=None):
        self.tracker._log_artifact_url(self.run_id, url, artifact_path)

    def log_text(self, text, name):
        self.tracker._log_text(self.run_id, text, name)

    def set_tags(self, tags):
        self.tracker.set_run_tags(self.run_id, tags)

    def log_datasets(self, inputs) -> None:
        """Log MLflow ``DatasetInput``s as inputs of this run and of the parent run."""
        self.tracker.log_datasets_to(self.run_id, inputs)

    def finish(self, status: str = "FINISHED") -> None:
        """A stage logger does not end the parent run."""


class MLflowTracker:
    """The tracker interface of :class:`feedback_synth.tracking.NullTracker`, backed by MLflow.

    ``parent_run_id``: attach to that existing parent run instead of creating one (a KFP component
    in its own pod); ``finish()`` then leaves the parent run open. ``kfp_run_id`` (else
    ``$KFP_RUN_ID``) is tagged on the runs this tracker creates.
    """

    def __init__(self, cfg: TrackingConfig, output_url: str, parent_run_id: Optional[str] = None,
                 kfp_run_id: Optional[str] = None):
        self.cfg = cfg
        self.output_url = output_url
        self.parent_run_id = parent_run_id
        self.kfp_run_id = kfp_run_id or os.environ.get(KFP_RUN_ID_ENV) or None
        self.tracking_uri, self._artifact_location = resolve_tracking_uri(cfg, output_url)
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self._created_parent = False
        self._stack: list[str] = []
        self._client: Optional[TrackingClient] = None

    # -- the run ------------------------------------------------------------------------------
    @property
    def client(self) -> TrackingClient:
        if self._client is None:
            raise TrackingError("MLflowTracker: call start() before logging")
        return self._client

    def current_run_id(self) -> str:
        """The innermost open stage run, else the parent run."""
        if self.run_id is None:
            raise TrackingError("MLflowTracker: call start() before logging")
        return self._stack[-1] if self._stack else self.run_id

    def _base_tags(self) -> dict[str, str]:
        tags = {"feedback_synth.output": self.output_url} if self.output_url else {}
        if self.kfp_run_id:
            tags["kfp.run_id"] = self.kfp_run_id
        return tags

    def start(self, run_name: str, config: dict[str, Any], tags: Optional[dict[str, str]] = None) -> None:
        """Open (or attach to) the parent run; log the resolved config as params and config.yaml."""
        import yaml

        self.connect()
        tags = dict(tags or {})
        if "kfp.run_id" in tags and not self.kfp_run_id:
            self.kfp_run_id = tags["kfp.run_id"]
        with mlflow_errors("open the parent run"):
            if self.parent_run_id:
                try:
                    run = self.client.get_run(self.parent_run_id)
                except TrackingError:
                    raise
                except Exception as exc:  # noqa: BLE001 - MLflow says not found in several ways
                    raise TrackingError(f"parent MLflow run {self.parent_run_id} not found at "
                                        f"{self.tracking_uri}: {getattr(exc, 'message', exc)}") from exc
                self.run_id, self.experiment_id = self.parent_run_id, run.info.experiment_id
                if tags:
                    self.set_run_tags(self.run_id, tags)
            else:
                self.experiment_id = self._experiment_id()
                run = self._create_run(run_name, {**self._base_tags(), **tags})
                self.run_id, self._created_parent = run.info.run_id, True
                self._log_params(self.run_id, flatten(config))
                self._log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        where = self.tracking_uri
        if where.startswith(("http://", "https://")):
            where += f"  (see it: {ui_url(where, self.experiment_id, self.run_id)})"
        elif where.startswith("sqlite:///"):
            where += (f"  (see it: mlflow ui --backend-store-uri {where}, then "
                      f"{ui_url('http://127.0.0.1:5000', self.experiment_id, self.run_id)}; "
                      f"feedback-synth compare --tracking-uri {where})")
        say(f"MLflow run {self.run_id} at {where}")

    def connect(self) -> None:
        """The client, with MLflow's HTTP retries and timeout from the config; an HTTP server is
        probed first (TrackingError if it cannot be reached), before any long work."""
        hint = f" The run's outputs are kept in {self.output_url}." if self.output_url else ""
        self._client = make_client(self.tracking_uri, self.cfg, hint)

    def _experiment_id(self) -> str:
        """The experiment's id, created if need be, tagged as model training (see EXPERIMENT_KIND)."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        location = None
        if self._artifact_location:  # a local store: its artifacts live beside it, whatever the path holds (#, %, é)
            os.makedirs(self._artifact_location, exist_ok=True)
            location = Path(self._artifact_location).absolute().as_uri()
        if exp is not None and location and exp.artifact_location != location:
            # the run folder was moved or copied: its local store follows it (else the artifacts of
            # new runs would go to the old folder)
            relocate_local_store(self.tracking_uri, exp.artifact_location, location)
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            try:  # a retried create that did happen answers "already exists": handled as a concurrent one
                return self.client.create_experiment(self.cfg.experiment, artifact_location=location,
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException as exc:  # created by a concurrent run
                exp = self.client.get_experiment_by_name(self.cfg.experiment)
                if exc.error_code != "RESOURCE_ALREADY_EXISTS" or exp is None:
                    raise
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):  # made by something else: tagged at first use
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    def _create_run(self, run_name: str, tags: dict[str, str]):
        """``create_run``, never blindly retried: a retry first looks for the run by its request id."""
        request_id = uuid.uuid4().hex
        tags = {**tags, REQUEST_ID_TAG: request_id}
        raw = self.client.raw

        def find():
            runs = raw.search_runs([self.experiment_id], filter_string=f"tags.`{REQUEST_ID_TAG}` = '{request_id}'",
                                   max_results=1)
            return runs[0] if runs else None

        return self.client.create_once("create_run", lambda: raw.create_run(self.experiment_id, run_name=run_name,
                                                                            tags=tags), find)

    def open_stage(self, name: str, params: Optional[dict[str, Any]] = None) -> str:
        """A nested run for one stage under the current run, left open (``stage`` closes its own);
        its id; tagged as ``stage`` tags its own."""
        parent = self.current_run_id()
        with mlflow_errors(f"open the run of stage '{name}'"):
            run = self._create_run(name, {"mlflow.parentRunId": parent, STAGE_TAG: name, **self._base_tags()})
            if params:
                self._log_params(run.info.run_id, flatten(params))
        return run.info.run_id

    @contextlib.contextmanager
    def stage(self, name: str, params: Optional[dict[str, Any]] = None) -> Iterator[_RunLogger]:
        """A nested run for one stage; its params are the stage's resolved config."""
        parent = self.current_run_id()
        run_id, status = None, "FAILED"
        try:
            # a signal waits until the new run is on the stack: from there on this block (or
            # finish()) closes it; one raised while its params are logged closes it FAILED
            with deferred():
                with mlflow_errors(f"open the run of stage '{name}'"):
                    run = self._create_run(name, {"mlflow.parentRunId": parent, STAGE_TAG: name, **self._base_tags()})
                run_id = run.info.run_id
                self._stack.append(run_id)
            if params:
                with mlflow_errors(f"open the run of stage '{name}'"):
                    self._log_params(run_id, flatten(params))
            yield _RunLogger(self, run_id)
            status = "FINISHED"
        finally:
            if run_id is not None:  # made: off the stack, and closed
                self._stack.remove(run_id)
                if status == "FINISHED":
                    with mlflow_errors(f"close the run of stage '{name}'"):
                        self.client.set_terminated(run_id, status)
                else:  # the stage's own error matters more than a failure to record it
                    self._best_effort(self.client.raw.set_terminated, run_id, status)

    def finish(self, status: str = "FINISHED") -> None:
        """End the parent run, if this tracker created it (an attached one stays open)."""
        if self._client is None:
            return
        for run_id in reversed(self._stack):
            self._best_effort(self.client.raw.set_terminated, run_id, "FAILED")
        self._stack.clear()
        if self._created_parent and self.run_id:
            if status == "FINISHED":
                with mlflow_errors("close the parent run"):
                    self.client.set_terminated(self.run_id, status)
            else:
                self._best_effort(self.client.raw.set_terminated, self.run_id, status)

    def _best_effort(self, fn, *args) -> None:
        """One try, no retries (the server may be the reason we are failing)."""
        try:
            with self.client.http(0):
                fn(*args)
        except Exception as exc:  # noqa: BLE001 - reporting only; the original error propagates
            say(f"warning: could not record in MLflow ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")

    # -- the interface, on the current run ----------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None, prefix: str = "") -> None:
        self.log_metrics_to(self.current_run_id(), metrics, step, prefix)

    def log_artifact_url(self, url: str, artifact_path: Optional[str] = None) -> None:
        self._log_artifact_url(self.current_run_id(), url, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._log_text(self.current_run_id(), text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.set_run_tags(self.current_run_id(), tags)

    def log_datasets(self, inputs) -> None:
        """Log MLflow ``DatasetInput``s as inputs of the current run (and of the parent run)."""
        self.log_datasets_to(self.current_run_id(), inputs)

    # -- on a given run ------------------------------------------------------------------------
    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics_to(self, run_id: str, metrics: dict[str, Any], step: Optional[int], prefix: str) -> None:
        from mlflow.entities import Metric

        items = metric_items(metrics, prefix)
        if not items:
            return
        ts = int(time.time() * 1000)
        with mlflow_errors("log metrics"):
            self.client.log_batch(run_id, metrics=[Metric(k, v, ts, int(step or 0)) for k, v in items])

    def _log_artifact_url(self, run_id: str, url: str, artifact_path: Optional[str]) -> None:
        if not storage.exists(url):
            say(f"warning: artifact not found, not logged: {url}")
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, url.rstrip("/").rsplit("/", 1)[-1])
            with open(local, "wb") as f:
                f.write(storage.read_bytes(url))
            with mlflow_errors(f"store the artifact {url}"):
                self.client.log_artifact(run_id, local, artifact_path)

    def _log_text(self, run_id: str, text: str, name: str) -> None:
        with mlflow_errors(f"store the artifact {name}"):
            self.client.log_text(run_id, text, name)

    def log_datasets_to(self, run_id: str, inputs, parent: bool = True) -> None:
        """``inputs`` (``mlflow.entities.DatasetInput``, see :mod:`feedback_synth.tracking.datasets`)
        as inputs of ``run_id`` and, with ``parent``, of the parent run too (MLflow keeps one input
        per dataset and run: logging one again is a no-op)."""
        inputs = list(inputs)
        if not inputs:
            return
        with mlflow_errors("log the datasets"):
            for target in dict.fromkeys(r for r in (run_id, self.run_id if parent else None) if r):
                self.client.log_inputs(target, datasets=inputs)

    def set_run_tags(self, run_id: str, tags: dict[str, str]) -> None:
        with mlflow_errors("set tags"):
            for key, value in tags.items():
                self.client.set_tag(run_id, key, str(value)[:5000])
