"""Where the MLflow store is, and an MlflowClient whose failures are bounded and named.

Retries are MLflow's own: every HTTP request of the MLflow client goes through a ``requests``
session with urllib3's ``Retry`` (connection errors, 408, 429, 5xx), set by
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` (from ``tracking.retries``), ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``
(:data:`BACKOFF_FACTOR` unless set) and ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (from
``tracking.request_timeout_s``). urllib3 waits 0, 2f, 4f, ... s between tries: with 3 retries and
f = 3 a dead server fails after ~18 s. :class:`TrackingClient` applies a tracker's settings to
each of its calls and turns what is left of a transient failure into a
:class:`~feedback_synth.errors.TrackingError` naming the server.

Non-idempotent creates (``create_run``, ``create_model_version``, ``create_logged_model``) are
not retried blindly: each goes out once (MLflow's retries off for that request), and before a
new try :meth:`TrackingClient.create_once` looks for what an earlier try may have created (by a
request id the caller puts in its tags), so a lost response never makes a second run or version.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from typing import Any, Callable, Iterator, Optional, TypeVar

from feedback_synth import storage
from feedback_synth.config import TrackingConfig
from feedback_synth.errors import ConfigError, TrackingError
from feedback_synth.interrupts import deferred

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value

BACKOFF_FACTOR = 3  # MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR unless set: waits 0, 6, 12 s (3 retries: ~18 s)

REQUEST_ID_TAG = "feedback_synth.request_id"  # on what a create made, to find it after a lost response

MAX_RETRIES = 10  # MLflow refuses more (_MLFLOW_HTTP_REQUEST_MAX_RETRIES_LIMIT)

PROBE_TIMEOUT_S = 10  # per try of the reachability probe (a blackholed host must not take 4 x 30 s)

RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
BACKOFF_ENV = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"

# MlflowException codes that mean "try later"; what MLflow raises once its HTTP retries are spent on
# a connection error, a timeout or a 5xx is an INTERNAL_ERROR "API request to ... failed with ..."
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}
_HTTP_FAILURE = "API request to "

T = TypeVar("T")


def say(msg: str) -> None:
    print(f"feedback-synth: {msg}", file=sys.stderr, flush=True)


def tracking_location(cfg: TrackingConfig, output_url: str) -> str:
    """Where a run tracks, as one string that can travel (a KFP parameter): ``tracking.tracking_uri``,
    else ``$MLFLOW_TRACKING_URI``, else the folder of a local store in the run's output
    (``<output>/mlflow``; ``./mlruns`` for a remote output)."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    base = storage.local_path(output_url)
    return os.path.join(base, "mlflow") if base is not None else os.path.abspath("mlruns")


def resolve_tracking_uri(cfg: TrackingConfig, output_url: str) -> tuple[str, Optional[str]]:
    """(tracking URI, artifact location for a new experiment or None to let the server decide),
    from ``tracking_location``: a bare folder is a SQLite store in that folder."""
    uri = tracking_location(cfg, output_url)
    if re.match(r"^[a-z][a-z0-9+.-]*:", uri) or uri.startswith("databricks"):
        db = sqlite_file(uri)  # a SQLite store named by URI keeps a new experiment's artifacts beside it,
        # not in MLflow's default ./mlruns of whatever folder the command runs in
        return uri, (os.path.join(os.path.dirname(os.path.abspath(db)), "artifacts") if db else None)
    check_local_store(cfg, output_url)
    return _sqlite_store(os.path.abspath(uri))


def check_local_store(cfg: TrackingConfig, output_url: str) -> None:
    """A local store's folder must be one a ``sqlite:///`` URI can name: SQLAlchemy unquotes a URL's
    path (``a%41b`` opens ``aAb``) and MLflow does not, so no URI serves a path with '%' and two hex
    digits (a lone '%' is fine). A one-line ConfigError before any work, instead of retries and a
    traceback."""
    uri = tracking_location(cfg, output_url)
    if not (re.match(r"^[a-z][a-z0-9+.-]*:", uri) or uri.startswith("databricks")) \
            and re.search(r"%[0-9A-Fa-f]{2}", os.path.abspath(uri)):
        raise ConfigError(f"a local MLflow store cannot be kept in {os.path.abspath(uri)}: its path holds '%XX', which "
                          f"SQLAlchemy and MLflow read differently; use an --output without '%', set "
                          f"tracking.tracking_uri, or --set tracking.enabled=false")


def _sqlite_store(folder: str) -> tuple[str, str]:
    os.makedirs(folder, exist_ok=True)
    return f"sqlite:///{os.path.join(folder, 'mlflow.db')}", os.path.join(folder, "artifacts")


def sqlite_file(uri: str) -> Optional[str]:
    """The database file of a ``sqlite:///`` tracking URI, as SQLAlchemy reads it (None for another
    kind of store or an in-memory one)."""
    from urllib.parse import unquote

    if not uri.startswith("sqlite://"):
        return None
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri[len("sqlite://"):]
    path = unquote(path.split("?", 1)[0])
    return path if path and path != ":memory:" else None


# -- MLflow's HTTP settings ----------------------------------------------------------------------------


def backoff_factor() -> int:
    try:
        return int(os.environ.get(BACKOFF_ENV) or BACKOFF_FACTOR)
    except ValueError:
        return BACKOFF_FACTOR


def retry_wait_s(attempt: int) -> float:
    """urllib3's wait before retry ``attempt`` (1-based): 0, then 2f, 4f, ... s (f: the backoff factor)."""
    return 0.0 if attempt <= 1 else float(backoff_factor() * 2 ** (attempt - 1))


def total_wait_s(retries: int) -> float:
    """How long ``retries`` retries wait in all (before MLflow's jitter of up to 1 s a retry)."""
    return sum(retry_wait_s(a) for a in range(1, retries + 1))


def http_env(retries: int, timeout_s: float) -> dict[str, str]:
    """MLflow's HTTP settings for ``retries`` retries and a per-request timeout of ``timeout_s``."""
    return {RETRIES_ENV: str(min(max(0, int(retries)), MAX_RETRIES)), BACKOFF_ENV: str(backoff_factor()),
            TIMEOUT_ENV: str(max(1, math.ceil(timeout_s)))}


@contextlib.contextmanager
def scoped_environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the code inside (and the processes it starts); what was
    there before comes back after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def mlflow_http(retries: int, timeout_s: float) -> Iterator[None]:
    """MLflow's HTTP retries and timeout for the calls inside (MLflow reads them at each request);
    SIGINT and SIGTERM wait until the calls are done (:mod:`feedback_synth.interrupts`)."""
    with scoped_environ(http_env(retries, timeout_s)), deferred():  # no signal half-way through a write
        yield


def configure_mlflow_env(cfg: TrackingConfig) -> None:
    """MLflow's HTTP retries and timeout for this process (also for MLflow calls made outside a
    :class:`TrackingClient`, e.g. ``mlflow.pyfunc.load_model``); quiet progress bars and URLs."""
    os.environ.setdefault(BACKOFF_ENV, str(BACKOFF_FACTOR))
    os.environ.update(http_env(cfg.retries, cfg.request_timeout_s))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout is for results (promote --json)


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI is ``uri`` inside (for MLflow's fluent functions such as
    ``mlflow.pyfunc.log_model``, which take no client); the previous one (and
    ``$MLFLOW_TRACKING_URI``) afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_uri, old_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:  # set_tracking_uri sets $MLFLOW_TRACKING_URI too: a later run must not inherit it
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


# -- failures ------------------------------------------------------------------------------------------


def is_transient(exc: BaseException) -> bool:
    """A failure that another try might not have: the server unreachable, overloaded or erroring."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES or (
            exc.error_code == "INTERNAL_ERROR" and str(exc.message).startswith(_HTTP_FAILURE))
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) or type(exc).__module__.startswith(
        ("requests", "urllib3"))


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "message", exc)).splitlines()[0][:300] if str(exc) else type(exc).__name__


def check_reachable(uri: str, retries: int, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """One cheap MLflow call to an HTTP tracking server, with MLflow's retries; TrackingError if it
    cannot be reached (or refuses us) before any long work starts. Local stores are not probed."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    t0 = time.monotonic()
    try:
        with mlflow_http(retries, min(timeout_s, PROBE_TIMEOUT_S)):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - classified below
        if is_transient(exc):
            raise TrackingError(
                f"MLflow tracking server {uri} cannot be reached ({_first_line(exc)}); tried {retries + 1} times "
                f"over {time.monotonic() - t0:.0f} s. Start it, point tracking.tracking_uri / MLFLOW_TRACKING_URI at "
                f"a running one, or turn tracking off with --set tracking.enabled=false") from None
        if isinstance(exc, MlflowException):
            raise TrackingError(f"MLflow tracking server {uri} refused us: {exc.message}") from None
        raise


class TrackingClient:
    """An ``MlflowClient`` whose calls run with this tracker's MLflow HTTP settings (``retries``
    retries with backoff, ``timeout_s`` per request) and whose transient failures, once MLflow's
    retries are spent, raise :class:`TrackingError` naming the server. Other MLflow errors (not
    found, already exists, bad value) pass through unchanged for the caller to handle.

    The non-idempotent creates go out once per call; use :meth:`create_once` to retry them safely.
    """

    NON_IDEMPOTENT = frozenset({"create_run", "create_model_version", "create_logged_model"})

    def __init__(self, client, retries: int, uri: str, outputs_hint: str = "", timeout_s: float = 30.0):
        self._client, self._retries, self._uri, self._hint = client, int(retries), uri, outputs_hint
        self._timeout_s = timeout_s

    @property
    def raw(self):
        """The MlflowClient itself (the process's MLflow settings, no translation)."""
        return self._client

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def retries(self) -> int:
        return self._retries

    def http(self, retries: Optional[int] = None):
        """This client's MLflow HTTP settings (``retries`` instead of its own if given), e.g. around
        MLflow's fluent calls made for this tracker."""
        return mlflow_http(self._retries if retries is None else retries, self._timeout_s)

    def failure(self, what: str, tries: int, t0: float, exc: BaseException) -> TrackingError:
        return TrackingError(f"MLflow tracking server {self._uri} failed '{what}' {tries} times over "
                             f"{time.monotonic() - t0:.0f} s ({_first_line(exc)}).{self._hint}")

    def call(self, what: str, fn: Callable[[], T], retries: Optional[int] = None) -> T:
        """``fn()`` (MLflow calls) with this client's settings; a transient failure -> TrackingError."""
        retries = self._retries if retries is None else retries
        t0 = time.monotonic()
        try:
            with self.http(retries):
                return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc):
                raise
            raise self.failure(what, retries + 1, t0, exc) from exc

    def __getattr__(self, name: str):
        fn = getattr(self._client, name)
        if not callable(fn):
            return fn
        retries = 0 if name in self.NON_IDEMPOTENT else None

        def call(*args, **kwargs):
            return self.call(name, lambda: fn(*args, **kwargs), retries)

        return call

    def create_once(self, what: str, create: Callable[[], T], find: Callable[[], Optional[T]]) -> T:
        """A create that is never blindly retried. Each try of ``create()`` is one request; after a
        transient failure, and the same waits as MLflow's retries, ``find()`` looks for what that
        try may have made (by the request id the caller put in its tags) before trying again.
        ``tracking.retries`` retries in all; then TrackingError naming the server."""
        t0 = time.monotonic()
        last: Optional[BaseException] = None
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(retry_wait_s(attempt))
                try:
                    with self.http(0):
                        found = find()
                except Exception as exc:  # noqa: BLE001 - classified below
                    if not is_transient(exc):
                        raise
                    last = exc
                    continue
                if found is not None:
                    return found
            try:
                with self.http(0):
                    return create()
            except Exception as exc:  # noqa: BLE001 - classified below
                if not is_transient(exc):
                    raise
                last = exc
        assert last is not None
        raise self.failure(what, self._retries + 1, t0, last) from last


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


def make_client(uri: str, cfg: TrackingConfig, outputs_hint: str = "") -> TrackingClient:
    """A :class:`TrackingClient` for ``uri`` with ``cfg``'s retries and timeout, after checking
    that an HTTP server answers (TrackingError if not)."""
    from mlflow import MlflowClient

    configure_mlflow_env(cfg)
    check_reachable(uri, cfg.retries, cfg.request_timeout_s)  # before any long work
    return TrackingClient(MlflowClient(tracking_uri=uri, registry_uri=uri), cfg.retries, uri, outputs_hint,
                          cfg.request_timeout_s)


def registry_client(uri: str, retries: int = 3) -> TrackingClient:
    return make_client(uri, TrackingConfig(retries=retries))
