"""MLflow tracking, the model registry, and the ``compare`` / ``promote`` verbs.

One parent run per pipeline run (tagged ``kfp.run_id`` when there is one), one nested run per
stage with that stage's resolved config as params. The retrained classifier is logged as an
``mlflow.pyfunc`` model written as *code* (models-from-code: no pickled Python object) whose one
artifact is the checkpoint folder (``model.safetensors`` + ``config.json``), so loading it
unpickles nothing. It is registered as a new version with alias ``challenger``; the gate in
:mod:`feedback_synth.promote` decides whether ``champion`` moves to it.

Where the tracking store lives: ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a
SQLite store in the run's output folder (``<output>/mlflow/mlflow.db``, artifacts beside it), so
``feedback-synth run`` needs no server. An unreachable server fails the run at ``start()``, before
any long work, with a :class:`~feedback_synth.errors.TrackingError`; a server that goes away
mid-run fails the next tracking call the same way after ``tracking.retries`` short retries. Every
stage writes its outputs to the output folder before anything is logged, so nothing is lost.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Iterator, Optional

import numpy as np

from . import io
from .config import PromoteConfig, TrackingConfig
from .errors import ConfigError, DataError, TrackingError
from .promote import CHALLENGER, CHAMPION, TEST_SET_TAG, make_lock, metrics_from_tags, promote_model_version
from .tracking import LAUNCH_TAG

KFP_RUN_ID_ENV = "KFP_RUN_ID"  # set it (e.g. from dsl.PIPELINE_JOB_ID_PLACEHOLDER) to tag the parent run
STAGE_TAG = "feedback_synth.stage"
PIPELINE_STATE_TAG = "feedback_synth.pipeline_state"  # set by the KFP exit handler
PIPELINE_ERROR_TAG = "feedback_synth.pipeline_error"
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                    "ABORTED"}


def _say(msg: str) -> None:
    print(f"feedback-synth: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ where, and retries


def _local_path(url: str) -> Optional[str]:
    """The local path of a ``file://`` URL or plain path, else None (a remote URL)."""
    if "://" not in url:
        return os.path.abspath(url)
    if url.startswith("file://"):
        return os.path.abspath(url[len("file://"):])
    return None


def resolve_tracking_uri(cfg: TrackingConfig, output_url: str) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        if re.match(r"^[a-z][a-z0-9+.-]*:", uri) or uri.startswith("databricks"):
            return uri, None
        return _sqlite_store(os.path.abspath(uri))  # a bare folder: a SQLite store in that folder
    base = _local_path(output_url)
    if base is None:  # a gs:// output: keep the store in the working folder, as MLflow does
        return _sqlite_store(os.path.abspath("mlruns"))
    return _sqlite_store(os.path.join(base, "mlflow"))


def _sqlite_store(folder: str) -> tuple[str, str]:
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}", os.path.join(folder, "artifacts")


def _configure_mlflow_env(cfg: TrackingConfig) -> None:
    """Bound MLflow's own HTTP retries (default: 7 with backoff, ~4 min): we retry ourselves."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(cfg.request_timeout_s))))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is for results (promote --json)


def _backoff(attempt: int) -> float:
    return min(2.0 ** attempt, 4.0)  # 1, 2, 4, 4 ... s: 3 retries wait ~7 s in all


def _is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or type(exc).__module__.startswith(
        ("requests", "urllib3"))


def check_reachable(uri: str, retries: int, timeout_s: float = 3.0) -> None:
    """GET ``<uri>/health`` of an HTTP tracking server, with bounded retries; TrackingError if dead."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    last = ""
    t0 = time.monotonic()
    for attempt in range(retries + 1):
        try:
            resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code} from /health"
        except requests.RequestException as exc:
            last = f"{type(exc).__name__}: {exc}"
        if attempt < retries:
            time.sleep(_backoff(attempt))
    raise TrackingError(
        f"MLflow tracking server {uri} cannot be reached ({last}); tried {retries + 1} times over "
        f"{time.monotonic() - t0:.0f} s. Start it, point tracking.tracking_uri / MLFLOW_TRACKING_URI at a "
        f"running one, or turn tracking off with --set tracking.enabled=false")


class RetryingClient:
    """An ``MlflowClient`` whose calls retry transient failures (connection refused, 5xx) a bounded
    number of times, then raise :class:`TrackingError` naming the server. Other MLflow errors
    (not found, already exists, bad value) pass through unchanged for the caller to handle."""

    def __init__(self, client, retries: int, uri: str, outputs_hint: str = ""):
        self._client, self._retries, self._uri, self._hint = client, retries, uri, outputs_hint

    @property
    def raw(self):
        return self._client

    def __getattr__(self, name: str):
        fn = getattr(self._client, name)
        if not callable(fn):
            return fn

        def call(*args, **kwargs):
            t0 = time.monotonic()
            for attempt in range(self._retries + 1):
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - classified below
                    if not _is_transient(exc):
                        raise
                    if attempt == self._retries:
                        msg = str(getattr(exc, "message", exc)).splitlines()[0][:300]
                        raise TrackingError(
                            f"MLflow tracking server {self._uri} failed '{name}' {self._retries + 1} times over "
                            f"{time.monotonic() - t0:.0f} s ({msg}).{self._hint}") from exc
                    time.sleep(_backoff(attempt))

        return call


def _wrap_mlflow_errors(what: str):
    """Turn an MLflow refusal into a TrackingError that says what was being done."""
    from mlflow.exceptions import MlflowException

    @contextlib.contextmanager
    def ctx():
        try:
            yield
        except MlflowException as exc:
            raise TrackingError(f"MLflow refused to {what}: {exc.message}") from exc

    return ctx()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def _metric_items(metrics: dict[str, Any], prefix: str) -> list[tuple[str, float]]:
    items = []
    for key, value in metrics.items():
        if value is None or isinstance(value, (dict, list, tuple, str)):
            continue
        try:
            value = float(value)  # bools and numpy scalars too
        except (TypeError, ValueError):
            continue
        items.append((_BAD_KEY.sub("_", f"{prefix}{key}"), value))
    return items


# ------------------------------------------------------------------------------ the logged model

_MODEL_CODE = '''"""The feedback-synth classifier as an MLflow pyfunc, written as code (no pickle)."""
import mlflow
from feedback_synth.mlflow_tracking import ClassifierModel

mlflow.models.set_model(ClassifierModel())
'''


def _define_model_class(base):
    class ClassifierModel(base):
        """pyfunc wrapper: float32 images in [0, 1], (N, C, H, W) -> logits (N, num_classes).

        Its artifact ``checkpoint`` is the classifier's checkpoint folder (safetensors +
        config.json), read by :func:`feedback_synth.classifier.load_classifier`.
        """

        def load_context(self, context) -> None:
            from .classifier import load_classifier

            self.clf = load_classifier(context.artifacts["checkpoint"])

        # np.ndarray: a hint MLflow accepts without inferring a schema from it (the explicit
        # signature logged with the model is the contract); no hint at all draws a warning
        def predict(self, context, model_input: np.ndarray, params=None):
            import torch

            if isinstance(model_input, dict) and len(model_input) == 1:
                (model_input,) = model_input.values()
            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            with torch.no_grad():
                return self.clf(x).float().numpy()

    return ClassifierModel


_MODEL_CLASS = None


def _classifier_model_class():
    """Built on first use, so that importing this module (the CLI does) does not import mlflow."""
    global _MODEL_CLASS
    if _MODEL_CLASS is None:
        import mlflow.pyfunc

        _MODEL_CLASS = _define_model_class(mlflow.pyfunc.PythonModel)
    return _MODEL_CLASS


def __getattr__(name: str):  # PEP 562: ``from feedback_synth.mlflow_tracking import ClassifierModel``
    if name == "ClassifierModel":
        return _classifier_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _download_checkpoint(model_url: str, dest: str) -> dict[str, Any]:
    """Copy the checkpoint folder (any fsspec URL) to ``dest``; returns its config.json."""
    if not io.exists(io.join(model_url, "config.json")) or not io.exists(io.join(model_url, "model.safetensors")):
        raise DataError(f"not a classifier checkpoint (needs model.safetensors + config.json): {model_url}")
    os.makedirs(dest, exist_ok=True)
    for name in ("model.safetensors", "config.json", "train_config.yaml"):
        url = io.join(model_url, name)
        if io.exists(url):
            with open(os.path.join(dest, name), "wb") as f:
                f.write(io.read_bytes(url))
    return io.read_json(io.join(model_url, "config.json"))


def checkpoint_test_set(model_url: str) -> Optional[str]:
    """Which test set a checkpoint's metrics come from: its dataset and split (train_config.yaml)."""
    url = io.join(model_url, "train_config.yaml")
    if not io.exists(url):
        return None
    data = (io.read_yaml(url) or {}).get("data") or {}
    if not data.get("dataset"):
        return None
    return f"{data['dataset']} split_seed={data.get('split_seed')} image_size={data.get('image_size')}"


def save_pyfunc(checkpoint_dir: str, spec: dict[str, Any], path: str) -> None:
    """Write the pyfunc model folder (MLmodel, code, signature, input example) to ``path``."""
    import mlflow.pyfunc
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    shape = (-1, spec["in_chans"], spec["image_size"], spec["image_size"])
    # unnamed tensor specs: predict() gets the array itself, not a {name: array} dict
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), shape)]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec["num_classes"]))]))
    # batch of 2 (a batch of 1 hides batch-dimension bugs); [0, 1] like real inputs
    example = np.random.default_rng(0).random((2, *shape[1:]), dtype=np.float32)
    code = os.path.join(os.path.dirname(path), "feedback_synth_classifier.py")
    with open(code, "w") as f:
        f.write(_MODEL_CODE)
    mlflow.pyfunc.save_model(
        path, python_model=code, artifacts={"checkpoint": checkpoint_dir}, signature=signature,
        input_example=example, pip_requirements=_requirements(),
        metadata={"class_names": spec.get("class_names", []), "timm_model": spec.get("model"),
                  "input": "float32 images in [0, 1], (N, C, H, W); output: logits"})


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "timm", "safetensors", "numpy", "mlflow", "feedback-synth"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


# ------------------------------------------------------------------------------ the tracker


class _RunLogger:
    """What ``stage()`` yields: the tracker interface bound to one (nested) run."""

    def __init__(self, tracker: "MLflowTracker", run_id: str):
        self._tracker, self.run_id = tracker, run_id

    @contextlib.contextmanager
    def stage(self, name: str, params: Optional[dict[str, Any]] = None):
        with self._tracker.stage(name, params) as log:
            yield log

    def log_metrics(self, metrics, step=None, prefix=""):
        self._tracker._log_metrics(self.run_id, metrics, step, prefix)

    def log_artifact_url(self, url, artifact_path=None):
        self._tracker._log_artifact_url(self.run_id, url, artifact_path)

    def log_text(self, text, name):
        self._tracker._log_text(self.run_id, text, name)

    def set_tags(self, tags):
        self._tracker._set_tags(self.run_id, tags)

    def finish(self, status: str = "FINISHED") -> None:
        """A stage logger does not end the parent run."""

    def register_and_promote(self, model_url, report, cfg):
        return self._tracker.register_and_promote(model_url, report, cfg, run_id=self.run_id)


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
        self._client: Optional[RetryingClient] = None

    # -- the run ------------------------------------------------------------------------------
    @property
    def client(self) -> RetryingClient:
        if self._client is None:
            raise TrackingError("MLflowTracker: call start() before logging")
        return self._client

    def _current(self) -> str:
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

        self._connect()
        tags = dict(tags or {})
        if "kfp.run_id" in tags and not self.kfp_run_id:
            self.kfp_run_id = tags["kfp.run_id"]
        with _wrap_mlflow_errors("open the parent run"):
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
                    self._set_tags(self.run_id, tags)
            else:
                self.experiment_id = self._experiment_id()
                run = self.client.create_run(self.experiment_id, run_name=run_name,
                                             tags={**self._base_tags(), **tags})
                self.run_id, self._created_parent = run.info.run_id, True
                self._log_params(self.run_id, _flatten(config))
                self._log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        where = self.tracking_uri
        if where.startswith("sqlite:///"):
            where += f"  (see it: mlflow ui --backend-store-uri {where}; feedback-synth compare --tracking-uri {where})"
        _say(f"MLflow run {self.run_id} at {where}")

    def _connect(self) -> None:
        from mlflow import MlflowClient

        _configure_mlflow_env(self.cfg)
        check_reachable(self.tracking_uri, self.cfg.retries)  # before any long work
        hint = f" The run's outputs are kept in {self.output_url}." if self.output_url else ""
        self._client = RetryingClient(MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri),
                                      self.cfg.retries, self.tracking_uri, hint)

    def close_pipeline_runs(self, kfp_run_id: Optional[str], succeeded: bool, message: str = "",
                            launch_id: Optional[str] = None) -> dict[str, Any]:
        """Close what one KFP run left open (its exit handler calls this, whatever happened). The
        run is ``kfp_run_id``, or (a local run, whose id the runner does not know) the one whose
        parent run carries the ``launch_id`` tag.

        The parent run, still RUNNING when a stage failed before ``promote`` closed it, ends FAILED
        (or FINISHED if the pipeline succeeded), tagged with the pipeline's state and error. A stage
        run still RUNNING belonged to a pod that died without closing it (OOM-killed, preempted,
        retried): it ends KILLED. Returns what was closed.
        """
        self._connect()
        closed: dict[str, Any] = {"parent": None, "killed_stages": []}
        with _wrap_mlflow_errors("close the runs of the pipeline run"):
            exp = self.client.get_experiment_by_name(self.cfg.experiment)
            if exp is None:
                return closed
            if launch_id:
                parents = self.client.raw.search_runs([exp.experiment_id],
                                                      filter_string=f"tags.`{LAUNCH_TAG}` = '{launch_id}'")
                kfp_run_id = parents[0].data.tags.get("kfp.run_id") if parents else None
            if not kfp_run_id:
                return closed
            runs = self.client.raw.search_runs(
                [exp.experiment_id], max_results=1000,
                filter_string=f"tags.`kfp.run_id` = '{kfp_run_id}' and attributes.status = 'RUNNING'")
            for run in runs:
                run_id = run.info.run_id
                if "mlflow.parentRunId" in run.data.tags:
                    self.client.set_terminated(run_id, "KILLED")
                    closed["killed_stages"].append(run.data.tags.get(STAGE_TAG, run.info.run_name))
                    continue
                status = "FINISHED" if succeeded else "FAILED"
                tags = {PIPELINE_STATE_TAG: "SUCCEEDED" if succeeded else "FAILED"}
                if message:
                    tags[PIPELINE_ERROR_TAG] = message[:4900]
                self._set_tags(run_id, tags)
                self.client.set_terminated(run_id, status)
                closed["parent"] = {"run_id": run_id, "status": status}
        return closed

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self._artifact_location:
            os.makedirs(self._artifact_location, exist_ok=True)
            location = "file://" + os.path.abspath(self._artifact_location)
        try:
            return self.client.create_experiment(self.cfg.experiment, artifact_location=location)
        except MlflowException as exc:  # created by a concurrent run
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.cfg.experiment).experiment_id

    @contextlib.contextmanager
    def stage(self, name: str, params: Optional[dict[str, Any]] = None) -> Iterator[_RunLogger]:
        """A nested run for one stage; its params are the stage's resolved config."""
        parent = self._current()
        with _wrap_mlflow_errors(f"open the run of stage '{name}'"):
            run = self.client.create_run(self.experiment_id, run_name=name,
                                         tags={"mlflow.parentRunId": parent, STAGE_TAG: name, **self._base_tags()})
            run_id = run.info.run_id
            if params:
                self._log_params(run_id, _flatten(params))
        self._stack.append(run_id)
        status = "FAILED"
        try:
            yield _RunLogger(self, run_id)
            status = "FINISHED"
        finally:
            self._stack.remove(run_id)
            if status == "FINISHED":
                with _wrap_mlflow_errors(f"close the run of stage '{name}'"):
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
                with _wrap_mlflow_errors("close the parent run"):
                    self.client.set_terminated(self.run_id, status)
            else:
                self._best_effort(self.client.raw.set_terminated, self.run_id, status)

    @staticmethod
    def _best_effort(fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reporting only; the original error propagates
            _say(f"warning: could not record in MLflow ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")

    # -- the interface, on the current run ----------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None, prefix: str = "") -> None:
        self._log_metrics(self._current(), metrics, step, prefix)

    def log_artifact_url(self, url: str, artifact_path: Optional[str] = None) -> None:
        self._log_artifact_url(self._current(), url, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self._log_text(self._current(), text, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._set_tags(self._current(), tags)

    # -- on a given run ------------------------------------------------------------------------
    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _log_metrics(self, run_id: str, metrics: dict[str, Any], step: Optional[int], prefix: str) -> None:
        from mlflow.entities import Metric

        items = _metric_items(metrics, prefix)
        if not items:
            return
        ts = int(time.time() * 1000)
        with _wrap_mlflow_errors("log metrics"):
            self.client.log_batch(run_id, metrics=[Metric(k, v, ts, int(step or 0)) for k, v in items])

    def _log_artifact_url(self, run_id: str, url: str, artifact_path: Optional[str]) -> None:
        if not io.exists(url):
            _say(f"warning: artifact not found, not logged: {url}")
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, url.rstrip("/").rsplit("/", 1)[-1])
            with open(local, "wb") as f:
                f.write(io.read_bytes(url))
            with _wrap_mlflow_errors(f"store the artifact {url}"):
                self.client.log_artifact(run_id, local, artifact_path)

    def _log_text(self, run_id: str, text: str, name: str) -> None:
        with _wrap_mlflow_errors(f"store the artifact {name}"):
            self.client.log_text(run_id, text, name)

    def _set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        with _wrap_mlflow_errors("set tags"):
            for key, value in tags.items():
                self.client.set_tag(run_id, key, str(value)[:5000])

    # -- the registry ---------------------------------------------------------------------------
    def log_model(self, model_url: str, run_id: Optional[str] = None) -> tuple[str, dict[str, Any]]:
        """Log the checkpoint at ``model_url`` as a pyfunc model under ``model/`` of the run;
        returns (``runs:/<id>/model``, the checkpoint's config.json)."""
        run_id = run_id or self._current()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "checkpoint")
            spec = _download_checkpoint(model_url, ckpt)
            model_dir = os.path.join(tmp, "model")
            save_pyfunc(ckpt, spec, model_dir)
            with _wrap_mlflow_errors("store the model"):
                self.client.log_artifacts(run_id, model_dir, "model")
        return f"runs:/{run_id}/model", spec

    def register(self, source: str, run_id: str, description: str = "") -> str:
        """A new version of ``tracking.registered_model`` from ``source``; returns its number."""
        from mlflow.exceptions import MlflowException

        name = self.cfg.registered_model
        with _wrap_mlflow_errors(f"register the model '{name}'"):
            try:
                self.client.create_registered_model(name, description="feedback-synth retrained classifier "
                                                                        "(champion/challenger aliases)")
            except MlflowException as exc:  # exists already, or a concurrent run created it just now
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    try:  # a concurrent first creation can fail with another code (a unique violation)
                        self.client.get_registered_model(name)
                    except MlflowException:
                        raise exc from None
            mv = self.client.create_model_version(name, source=source, run_id=run_id, description=description)
        return str(mv.version)

    def register_and_promote(self, model_url: str, report: dict[str, Any], cfg: PromoteConfig,
                             run_id: Optional[str] = None) -> dict[str, Any]:
        """Log + register the retrained model, then apply the champion/challenger gate.

        ``report`` is ``stages.evaluate_run``'s output: the candidate's metrics are
        ``report['retrained']``, the no-champion reference is ``report['baseline']``.
        """
        cfg.validate()
        run_id = run_id or self._current()
        name = self.cfg.registered_model
        source, _ = self.log_model(model_url, run_id)
        version = self.register(source, run_id, description=f"from {model_url}")
        lock = make_lock(cfg.lock_uri, self.tracking_uri, name)
        run_ids = list(dict.fromkeys(r for r in (run_id, self.run_id) if r))
        with _wrap_mlflow_errors(f"promote '{name}' v{version}"):
            result = promote_model_version(self.client, name, version, report["retrained"], cfg, lock=lock,
                                           baseline_metrics=report.get("baseline"), run_ids=run_ids,
                                           test_set=checkpoint_test_set(model_url), tracking_uri=self.tracking_uri)
        self._log_metrics(run_id, {"promoted": int(result["promoted"]), "model_version": int(version)}, None, "")
        _say(f"registry: {name} v{version} {'promoted to champion' if result['promoted'] else 'stays challenger'} "
             f"({result['reason']})")
        return result


# ------------------------------------------------------------------------------ compare / promote verbs


def _registry_client(uri: str, retries: int = 3):
    from mlflow import MlflowClient

    _configure_mlflow_env(TrackingConfig())
    check_reachable(uri, retries)
    return RetryingClient(MlflowClient(tracking_uri=uri, registry_uri=uri), retries, uri)


def compare_versions(client, name: str) -> dict[str, Any]:
    """Champion and challenger of ``name`` from the registry: versions, metric tags, decisions."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        raise TrackingError(f"no registered model '{name}': {exc.message}") from None
    aliases = {k: str(v) for k, v in (model.aliases or {}).items()}
    out: dict[str, Any] = {"model_name": name}
    for alias in (CHAMPION, CHALLENGER):
        version = aliases.get(alias)
        if version is None:
            out[alias] = None
            continue
        mv = client.get_model_version(name, version)
        tags = mv.tags or {}
        out[alias] = {"version": version, "metrics": metrics_from_tags(tags), "test_set": tags.get(TEST_SET_TAG),
                      "decision": tags.get("promotion.decision"), "reason": tags.get("promotion.reason"),
                      "run_id": mv.run_id}
    return out


def format_comparison(cmp: dict[str, Any]) -> str:
    champ, chall = cmp.get(CHAMPION), cmp.get(CHALLENGER)
    head = lambda who, v: f"{who} v{v['version']}" if v else f"{who} (none)"  # noqa: E731
    keys = [k for k in ("overall", "many", "medium", "few", "worst_class", "average_group", "worst_group")
            if any(v and k in v["metrics"] for v in (champ, chall))]
    lines = [f"registered model {cmp['model_name']}", "",
             f"{'metric':<14}{head('champion', champ):>16}{head('challenger', chall):>18}{'delta':>10}"]
    for k in keys:
        a = champ["metrics"].get(k) if champ else None
        b = chall["metrics"].get(k) if chall else None
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        delta = f"{b - a:+.4f}" if a is not None and b is not None else "-"
        lines.append(f"{k:<14}{fmt(a):>16}{fmt(b):>18}{delta:>10}")
    if champ and chall and champ["version"] == chall["version"]:
        lines += ["", f"the challenger v{chall['version']} is the champion"]
    for who, v in (("champion", champ), ("challenger", chall)):
        if v and v.get("decision"):
            lines.append(f"{who} v{v['version']}: {v['decision']} ({v['reason']})")
    tests = {v["test_set"] for v in (champ, chall) if v and v.get("test_set")}
    if len(tests) > 1:
        lines.append("warning: measured on different test sets: " + " | ".join(sorted(tests)))
    return "\n".join(lines)


def _tracking_uri_arg(args) -> str:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri and getattr(args, "output", None):
        uri, _ = resolve_tracking_uri(TrackingConfig(), args.output)
    if not uri:
        raise ConfigError("no tracking store: pass --tracking-uri URI (a run's local store is "
                          "sqlite:///RUN_FOLDER/mlflow/mlflow.db), --output RUN_FOLDER, or set MLFLOW_TRACKING_URI")
    return uri


def cmd_compare(args) -> int:
    uri = _tracking_uri_arg(args)
    client = _registry_client(uri)
    cmp = compare_versions(client, args.model)
    if args.json:
        print(json.dumps(cmp, indent=2))
    else:
        print(f"tracking {uri}")
        print(format_comparison(cmp))
    return 0


def _read_report(url: str) -> dict[str, Any]:
    if not url.endswith(".json"):
        url = io.join(url, "report.json")
    if not io.exists(url):
        raise DataError(f"evaluation report not found: {url}")
    report = io.read_json(url)
    if not isinstance(report, dict) or "retrained" not in report:
        raise DataError(f"{url} is not an evaluation report (no 'retrained' metrics)")
    return report


def cmd_promote(args) -> int:
    from dataclasses import asdict

    from .cli import _load_config

    cfg = _load_config(args)
    if args.tracking_uri:
        cfg.tracking.tracking_uri = args.tracking_uri
    if args.registered_model:
        cfg.tracking.registered_model = args.registered_model
    report = _read_report(args.report)
    output = args.output or "."
    if not (cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or args.output):
        raise ConfigError("promote: pass --tracking-uri (or tracking.tracking_uri / MLFLOW_TRACKING_URI), or "
                          "--output RUN_FOLDER to use that run's local store")
    tracker = MLflowTracker(cfg.tracking, output, parent_run_id=args.parent_run_id, kfp_run_id=args.kfp_run_id)
    tracker.start(args.run_name or "promote", {"tracking": asdict(cfg.tracking), "promote": asdict(cfg.promote)})
    status = "FAILED"
    try:
        with tracker.stage("promote", asdict(cfg.promote)) as log:
            result = log.register_and_promote(args.model, report, cfg.promote)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    print(json.dumps(result, indent=2))
    if args.result:
        io.write_json(args.result, result)
    return 0


def add_registry_commands(subparsers) -> None:
    """``feedback-synth compare`` and ``feedback-synth promote`` (called by cli.build_parser)."""
    default_name = TrackingConfig().registered_model
    p = subparsers.add_parser("compare", help="print champion vs challenger of a registered model, from the registry")
    p.add_argument("--model", default=default_name, help=f"registered model name (default: {default_name})")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--output", help="a run folder: use its local store (<RUN>/mlflow/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("promote", help="register a model folder with its metrics and apply the "
                                              "champion/challenger gate (the promote stage alone)")
    p.add_argument("--model", required=True, help="checkpoint folder URL (model.safetensors + config.json)")
    p.add_argument("--report", required=True,
                   help="evaluation report: report.json or the evaluate stage's output folder URL")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.tracking_uri, $MLFLOW_TRACKING_URI)")
    p.add_argument("--registered-model", help="registered model name (default: tracking.registered_model)")
    p.add_argument("--parent-run-id", help="attach to this MLflow parent run (a KFP component)")
    p.add_argument("--kfp-run-id", help=f"tag the run with this KFP run id (default: ${KFP_RUN_ID_ENV})")
    p.add_argument("--run-name", help="name of a new parent run (without --parent-run-id)")
    p.add_argument("--result", help="also write the decision as JSON to this URL")
    p.add_argument("--config", help="YAML file (its tracking and promote sections are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set promote.min_gain=0.02 (repeatable)")
    p.add_argument("--output", help="run folder whose local store to use when no tracking URI is set")
    p.set_defaults(func=cmd_promote)


__all__ = ["MLflowTracker", "ClassifierModel", "RetryingClient", "add_registry_commands", "check_reachable",
           "compare_versions", "format_comparison", "resolve_tracking_uri"]
