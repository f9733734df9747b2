"""Fixtures for the MLflow tests: real ``mlflow server`` processes on loopback, a PostgreSQL-backed
one for the promotion tests, and a small trained checkpoint.

Servers take ~7 s of CPU and ~13-20 s to answer /health on 2 cores, so each shared kind (SQLite,
PostgreSQL) is started once per test run: the first xdist worker that needs one launches every
shared kind the selected tests need together (their start-up overlaps) and records them in
``mlflow-servers/pool.json`` under the run's temp folder; the other worker uses them. Each is
stopped by its process group id (it was started in a new session): by the session's finaliser
without xdist, else by the controller at the end of the run (``tests/conftest.py``). Tests use
unique registered model names, so the servers are shared safely. The server that a test stops
mid-run is that test's own.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

PG_ENV = "FEEDBACK_SYNTH_TEST_PG_URI"
# fixture name -> server kind; collection records which kinds the selected tests need
SERVER_FIXTURES = {"mlflow_server": "sqlite", "pg_mlflow_server": "postgres"}
POOL_FOLDER = "mlflow-servers"  # under the run's temp folder: the shared servers and pool.json
_NEEDED: set[str] = set()


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, kind in SERVER_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                _NEEDED.add(kind)


@pytest.fixture(autouse=True)
def _mlflow_globals_restored():
    """Every MLflow test leaves MLflow's global tracking and registry URIs, and their environment
    variables, as it found them. Saving what ``mlflow.get_tracking_uri()`` / ``get_registry_uri()``
    return and setting it back is not that: unset, they return MLflow's default, ``./mlflow.db``
    of the working folder (the repository root under pytest), and setting it pins it (and
    $MLFLOW_REGISTRY_URI) for every later test and subprocess: runs and promotions of other tests
    then wrote mlflow.db, promote.lock and promote.lock.holder into the repository root."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    tracking, registry, env = tracking_utils._tracking_uri, registry_utils._registry_uri, {
        n: os.environ.get(n) for n in names}
    yield
    mlflow.set_tracking_uri(tracking)  # None: unset again, not the resolved default
    mlflow.set_registry_uri(registry)
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    return exe if os.path.exists(exe) else (shutil.which("mlflow") or "mlflow")


class MlflowServer:
    """One ``mlflow server`` process (1 worker, proxied artifacts, no job runner) on 127.0.0.1."""

    def __init__(self, backend_uri: str, workdir: str, port: int = 0, pid: int = 0):
        self.backend_uri = backend_uri
        self.workdir = workdir
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, "server.log")
        self.proc: subprocess.Popen | None = None
        self.pid = pid  # the process (and its group) of a server another worker started

    def record(self) -> dict:
        return {"backend_uri": self.backend_uri, "workdir": self.workdir, "port": self.port,
                "pid": self.proc.pid if self.proc else self.pid}

    def _exited(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        try:
            os.kill(self.pid, 0)
            return False
        except ProcessLookupError:
            return True

    def start(self) -> "MlflowServer":
        os.makedirs(self.workdir, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # 7 fewer processes to start
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [_mlflow_exe(), "server", "--backend-store-uri", self.backend_uri, "--serve-artifacts",
                 "--artifacts-destination", os.path.join(self.workdir, "artifacts"), "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait(self, timeout: float = 120.0) -> "MlflowServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._exited():
                raise RuntimeError(f"mlflow server ({self.backend_uri}) exited:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.25)
        raise RuntimeError(f"mlflow server ({self.backend_uri}) not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self._exited():
            return
        pgid = self.proc.pid if self.proc is not None else self.pid  # start_new_session: its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if self.proc is not None:
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # uvicorn's worker is in the same group (and a server another process started is not our
        # child to wait for): wait for the group to go, then kill what is left of it
        for _ in range(60):
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.25)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _pg_uri_or_none() -> str | None:
    return os.environ.get(PG_ENV) or None


def _require_pg() -> str:
    uri = _pg_uri_or_none()
    if uri:
        return uri
    if os.environ.get("CI"):
        pytest.fail(f"{PG_ENV} is not set in CI: run `eval \"$(bash scripts/ci-postgres.sh)\"` first")
    pytest.skip(f"needs PostgreSQL: set {PG_ENV} (e.g. `eval \"$(bash scripts/ci-postgres.sh)\"`)")


def _start_pool(root) -> dict[str, MlflowServer]:
    """Launch every shared server kind the selected tests need, at once."""
    servers: dict[str, MlflowServer] = {}
    for kind in sorted(_NEEDED):
        if kind == "postgres":
            uri = _pg_uri_or_none()
            if not uri:
                continue
            servers[kind] = MlflowServer(uri, str(root / kind))
        else:
            servers[kind] = MlflowServer(f"sqlite:///{root / kind / 'mlflow.db'}", str(root / kind))
    try:
        for server in servers.values():
            server.start()
    except BaseException:
        stop_servers([server.record() for server in servers.values() if server.proc is not None])
        raise
    return servers


def stop_servers(records: list[dict]) -> None:
    """Stop the servers of ``records`` (``MlflowServer.record``), each by its process group."""
    for record in records:
        MlflowServer(record["backend_uri"], record["workdir"], record["port"], record["pid"]).stop()


@pytest.fixture(scope="session")
def _server_pool(tmp_path_factory):
    """The shared servers, {kind: MlflowServer}: started by the first worker of the run to ask (or
    by this process without xdist), recorded in pool.json for the other."""
    import filelock
    from builders import run_temp_folder

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = run_temp_folder(tmp_path_factory) / POOL_FOLDER
    root.mkdir(exist_ok=True)
    record = root / "pool.json"
    with filelock.FileLock(str(root / "pool.lock")):
        if record.exists():
            servers = {kind: MlflowServer(r["backend_uri"], r["workdir"], r["port"], r["pid"])
                       for kind, r in json.loads(record.read_text()).items()}
        else:
            servers = _start_pool(root)
            record.write_text(json.dumps({kind: server.record() for kind, server in servers.items()}))
    try:
        yield servers
    finally:
        if not worker:  # with xdist, the controller stops them once every worker is done
            stop_servers([server.record() for server in servers.values()])


def _server(pool: dict, kind: str) -> MlflowServer:
    if kind not in pool:  # requested by a test that collection did not see (e.g. via getfixturevalue)
        raise RuntimeError(f"no '{kind}' server was launched")
    return pool[kind].wait()


@pytest.fixture(scope="session")
def mlflow_server(_server_pool) -> MlflowServer:
    """A real MLflow tracking server on loopback (SQLite backend, proxied artifacts)."""
    return _server(_server_pool, "sqlite")


@pytest.fixture(scope="session")
def pg_uri() -> str:
    """The PostgreSQL database of the promotion tests (scripts/ci-postgres.sh)."""
    uri = _require_pg()
    import psycopg2

    from feedback_synth.registry.locks import psycopg2_dsn

    try:
        psycopg2.connect(psycopg2_dsn(uri), connect_timeout=5).close()
    except psycopg2.OperationalError as exc:
        pytest.fail(f"{PG_ENV}={uri} cannot be reached: {exc}")
    return uri


@pytest.fixture(scope="session")
def pg_mlflow_server(pg_uri, _server_pool) -> MlflowServer:
    """A real MLflow tracking server whose backend store is the PostgreSQL database."""
    return _server(_server_pool, "postgres")


@pytest.fixture
def doomed_mlflow_server(tmp_path) -> MlflowServer:
    """A server of its own, for the one test that stops it mid-run."""
    server = MlflowServer(f"sqlite:///{tmp_path / 'doomed' / 'mlflow.db'}", str(tmp_path / "doomed")).start()
    try:
        yield server.wait()
    finally:
        server.stop()


@pytest.fixture
def model_name(request) -> str:
    """A registered model name no other test (or earlier session on the same database) uses."""
    return f"{request.node.name[:40]}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """(classifier, checkpoint folder, test images (N,1,16,16) float32) from 1 epoch on digits-lt."""
    import torch
    from builders import build_small_classifier

    from feedback_synth.data.digits import make_digits_lt
    from feedback_synth.training.classifier import save_classifier

    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    ds = make_digits_lt()
    url = str(tmp_path_factory.mktemp("ckpt") / "model")
    clf = build_small_classifier(ds["train"], url, epochs=1)
    save_classifier(clf, url, {"train_config.yaml": "data:\n  dataset: digits-lt\n  split_seed: 0\n  image_size: 16\n"})
    import numpy as np

    images = ds["test"].subset(np.arange(0, 500, 25)).to_tensor().numpy()
    return clf.eval(), url, images


@pytest.fixture(scope="session")
def prepared_dataset(tmp_path_factory) -> str:
    """The prepared digits-lt dataset folder (``<split>.npz`` + ``info.json``) the checkpoint was trained on."""
    from feedback_synth.config import DataConfig
    from feedback_synth.data.prepare import prepare_dataset

    url = str(tmp_path_factory.mktemp("data") / "digits-lt")
    prepare_dataset(DataConfig(), url)
    return url


def _make_report(few: float, overall: float, base_few: float = 0.2, base_overall: float = 0.6) -> dict:
    return {"no_synthesis": {"overall": base_overall, "many": 0.9, "medium": 0.5, "few": base_few, "worst_class": 0.0},
            "retrained": {"overall": overall, "many": 0.9, "medium": 0.55, "few": few, "worst_class": 0.1},
            "fidelity": 0.9, "generated": 100, "kept": 90}


@pytest.fixture
def make_report():
    """make_report(few, overall, base_few=0.2, base_overall=0.6): an evaluate_run-like report."""
    return _make_report
