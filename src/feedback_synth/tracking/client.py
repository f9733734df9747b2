"""Where the MLflow store is, and an MlflowClient whose failures are bounded and named."""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from typing import Any, Optional

from feedback_synth import storage
from feedback_synth.config import TrackingConfig
from feedback_synth.errors import TrackingError

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value

_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                    "ABORTED"}


def say(msg: str) -> None:
    print(f"feedback-synth: {msg}", file=sys.stderr, flush=True)


def resolve_tracking_uri(cfg: TrackingConfig, output_url: str) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        if re.match(r"^[a-z][a-z0-9+.-]*:", uri) or uri.startswith("databricks"):
            return uri, None
        return _sqlite_store(os.path.abspath(uri))  # a bare folder: a SQLite store in that folder
    base = storage.local_path(output_url)
    if base is None:  # a gs:// output: keep the store in the working folder, as MLflow does
        return _sqlite_store(os.path.abspath("mlruns"))
    return _sqlite_store(os.path.join(base, "mlflow"))


def _sqlite_store(folder: str) -> tuple[str, str]:
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}", os.path.join(folder, "artifacts")


def configure_mlflow_env(cfg: TrackingConfig) -> None:
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


def mlflow_errors(what: str):
    """Turn an MLflow refusal into a TrackingError that says what was being done."""
    from mlflow.exceptions import MlflowException

    @contextlib.contextmanager
    def ctx():
        try:
            yield
        except MlflowException as exc:
            raise TrackingError(f"MLflow refused to {what}: {exc.message}") from exc

    return ctx()


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


_BAD_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_items(metrics: dict[str, Any], prefix: str) -> list[tuple[str, float]]:
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


def registry_client(uri: str, retries: int = 3):
    from mlflow import MlflowClient

    configure_mlflow_env(TrackingConfig())
    check_reachable(uri, retries)
    return RetryingClient(MlflowClient(tracking_uri=uri, registry_uri=uri), retries, uri)
