"""The promotion gate, the locks and the alias moves, without a tracking server.

Pure gate cases; the file lock across processes; promote_model_version against a local
SQLite registry (lock timeout, test-set mismatch, challenger ordering).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from feedback_synth.config import PromoteConfig, TrackingConfig
from feedback_synth.errors import ConfigError
from feedback_synth.registry.gate import CHALLENGER, CHAMPION, gate_decision, metric_tags, metrics_from_tags
from feedback_synth.registry.locks import (
    FileLock,
    LockTimeout,
    PostgresAdvisoryLock,
    advisory_key,
    make_lock,
    psycopg2_dsn,
)
from feedback_synth.registry.promote import promote_model_version

BASE = {"overall": 0.60, "few": 0.20}


# ------------------------------------------------------------------------------ the gate


@pytest.mark.parametrize("cand, cfg, passed, why", [
    ({"overall": 0.61, "few": 0.30}, PromoteConfig(), True, "passes"),
    ({"overall": 0.60, "few": 0.20}, PromoteConfig(), False, "few"),  # equal: min_gain 0 means strictly up
    ({"overall": 0.60, "few": 0.2 + 1e-12}, PromoteConfig(), False, "few"),  # float noise is not a gain
    ({"overall": 0.59, "few": 0.30}, PromoteConfig(max_overall_drop=0.01), True, "passes"),  # drop == limit
    ({"overall": 0.589, "few": 0.30}, PromoteConfig(max_overall_drop=0.01), False, "overall"),
    ({"overall": 0.70, "few": 0.25}, PromoteConfig(min_gain=0.05), True, "passes"),  # gain == min_gain
    ({"overall": 0.70, "few": 0.249}, PromoteConfig(min_gain=0.05), False, "few"),
    ({"overall": 0.70}, PromoteConfig(), False, "candidate has no 'few'"),
    ({"overall": 0.61, "few": float("nan")}, PromoteConfig(), False, "candidate has no 'few'"),
    ({"overall": 0.61, "few": 0.1, "worst_class": 0.1}, PromoteConfig(gate_metric="worst_class"), False,
     "reference has no 'worst_class'"),
    ({"overall": 0.61, "few": 0.1}, PromoteConfig(gate_metric="overall"), True, "passes"),
])
def test_gate_decision(cand, cfg, passed, why):
    ok, reason = gate_decision(cand, BASE, cfg)
    assert ok is passed, reason
    assert why in reason


def test_gate_reason_names_both_checks_and_failing_one():
    ok, reason = gate_decision({"overall": 0.50, "few": 0.40}, BASE, PromoteConfig(max_overall_drop=0.05))
    assert not ok
    assert reason.startswith("fails: overall 0.6000 -> 0.5000"), reason
    ok, reason = gate_decision({"overall": 0.60, "few": 0.40}, BASE, PromoteConfig())
    assert ok and "few 0.2000 -> 0.4000 (+0.2000, needs > 0)" in reason and "overall" in reason


def test_gate_without_reference_passes():
    assert gate_decision({"overall": 0.1, "few": 0.0}, None, PromoteConfig())[0]


def test_metric_tags_round_trip_full_precision():
    metrics = {"overall": 0.123456789012345, "few": 1, "name": "x", "none": None, "nan": float("nan"), "b": True}
    tags = metric_tags(metrics)
    assert set(tags) == {"metric.overall", "metric.few"}
    assert metrics_from_tags({**tags, "other": "1", "metric.bad": "?"}) == {"overall": 0.123456789012345, "few": 1.0}


# ------------------------------------------------------------------------------ config and lock choice


def test_config_validates_lock_uri_and_timeout():
    for ok in ("", "postgresql://u@h/db", "postgresql+psycopg2://u@h:5/db", "file:///tmp/l"):
        PromoteConfig(lock_uri=ok)
    for bad in ("redis://h", "/tmp/lock"):
        with pytest.raises(ConfigError, match="promote.lock_uri"):
            PromoteConfig(lock_uri=bad)
    with pytest.raises(ConfigError, match="tracking.request_timeout_s"):
        TrackingConfig(request_timeout_s=0)


def test_make_lock_choices(tmp_path, caplog):
    db = tmp_path / "store" / "mlflow.db"
    lock = make_lock("", f"sqlite:///{db}", "m")
    assert isinstance(lock, FileLock) and lock.path == str(tmp_path / "store" / "promote.lock")
    lock = make_lock("", "postgresql+psycopg2://u@db:5432/mlflow", "m")
    assert isinstance(lock, PostgresAdvisoryLock) and lock.dsn == "postgresql://u@db:5432/mlflow"
    lock = make_lock("postgres://u@h/x", "http://server", "m")
    assert isinstance(lock, PostgresAdvisoryLock) and lock.key == advisory_key("feedback-synth/promote/m")
    with pytest.raises(ConfigError, match=r"unsupported lock 'redis://h'; use '', postgresql://\.\.\. or file:///PATH"):
        make_lock("redis://h", "http://server", "m")
    assert isinstance(make_lock("file:///shared/promote.lock", "http://s", "m"), FileLock)
    with caplog.at_level("WARNING"):
        lock = make_lock("", "http://mlflow:5000", "m")
    assert isinstance(lock, FileLock) and "only serialises promotions on this machine" in caplog.text
    assert psycopg2_dsn("postgresql+psycopg2://a:b@h:1/d?sslmode=require") == "postgresql://a:b@h:1/d?sslmode=require"
    with pytest.raises(ConfigError):
        psycopg2_dsn("mysql://h/d")


def test_advisory_key_is_a_stable_signed_int64():
    k = advisory_key("feedback-synth/promote/m")
    assert k == advisory_key("feedback-synth/promote/m") and -2**63 <= k < 2**63
    assert k != advisory_key("feedback-synth/promote/other")


# ------------------------------------------------------------------------------ file lock


@pytest.mark.slow
def test_file_lock_serialises_processes(tmp_path):
    path = str(tmp_path / "promote.lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from feedback_synth.registry.locks import FileLock\n"
                               f"l = FileLock({path!r}); l.acquire(10); print('held', flush=True); time.sleep(2.5); l.release()"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match=r"still held after 0.3 s \(by pid \d+"):
            FileLock(path).acquire(0.3)
        assert time.monotonic() - t0 < 2
        lock = FileLock(path)
        lock.acquire(10)  # waits for the holder to let go
        lock.release()
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------ promote_model_version


@pytest.fixture(scope="module")
def local_registry(tmp_path_factory):
    """A local SQLite tracking + registry store (no server) and a run to register from."""
    from mlflow import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("gate", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(exp)
    return client, uri, run.info.run_id, root


def _new_version(client, name, run_id):
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException:
        pass
    return str(client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id).version)


def test_promotion_flow_on_a_local_registry(local_registry):
    client, uri, run_id, root = local_registry
    name, cfg = "flow", PromoteConfig()
    v1 = _new_version(client, name, run_id)
    r1 = promote_model_version(client, name, v1, {"overall": 0.62, "few": 0.3}, cfg, baseline_metrics=BASE,
                               run_ids=[run_id], test_set="digits-lt s0", tracking_uri=uri)
    assert r1["promoted"] and r1["reference"] == "baseline of the same run" and r1["champion_version"] == v1
    v2 = _new_version(client, name, run_id)
    r2 = promote_model_version(client, name, v2, {"overall": 0.62, "few": 0.3}, cfg, baseline_metrics=BASE,
                               test_set="digits-lt s0", tracking_uri=uri)
    assert not r2["promoted"] and r2["reference"] == f"champion v{v1}" and "needs > 0" in r2["reason"]
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases[CHAMPION] == v1 and aliases[CHALLENGER] == v2
    # the same version again: idempotent
    again = promote_model_version(client, name, v1, {"overall": 0.62, "few": 0.3}, cfg, tracking_uri=uri)
    assert again["promoted"] and again["reason"].endswith("already champion")
    assert str(client.get_registered_model(name).aliases[CHALLENGER]) == v2  # challenger never moves backwards
    # decisions are tags on the version and the run
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "rejected" and tags["metric.few"] == "0.3"
    assert "file lock" in tags["promotion.lock"] and str(root) in tags["promotion.lock"]
    assert client.get_run(run_id).data.tags["promotion.model"] == f"{name}/{v1}"


def test_different_test_set_is_not_comparable(local_registry):
    client, uri, run_id, _ = local_registry
    name = "testsets"
    v1 = _new_version(client, name, run_id)
    r1 = promote_model_version(client, name, v1, {"overall": 0.6, "few": 0.3}, PromoteConfig(), baseline_metrics=BASE,
                               test_set="digits-lt split_seed=0", tracking_uri=uri)
    assert r1["promoted"]
    v2 = _new_version(client, name, run_id)
    r = promote_model_version(client, name, v2, {"overall": 0.9, "few": 0.9}, PromoteConfig(),
                              test_set="imagenet-lt split_seed=0", tracking_uri=uri)
    assert not r["promoted"] and "different test set" in r["reason"]


def test_lock_timeout_leaves_the_version_challenger(local_registry):
    client, uri, run_id, root = local_registry
    name = "locked"
    v1 = _new_version(client, name, run_id)
    promote_model_version(client, name, v1, {"overall": 0.6, "few": 0.3}, PromoteConfig(), baseline_metrics=BASE,
                          tracking_uri=uri)
    other = FileLock(str(root / "promote.lock"))  # another promotion holds it
    other.acquire(5)
    try:
        v2 = _new_version(client, name, run_id)
        t0 = time.monotonic()
        r = promote_model_version(client, name, v2, {"overall": 0.9, "few": 0.9}, PromoteConfig(lock_timeout_s=0.5),
                                  baseline_metrics=BASE, run_ids=[run_id], tracking_uri=uri)
        assert time.monotonic() - t0 < 5
    finally:
        other.release()
    assert not r["promoted"] and r["decision"] == "lock_timeout"
    assert "stays challenger" in r["reason"] and "still held after 0.5 s" in r["reason"]
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases[CHALLENGER] == v2 and aliases[CHAMPION] == v1 and r["champion_version"] == v1
    assert client.get_model_version(name, v2).tags["promotion.decision"] == "lock_timeout"


def test_make_tracker_follows_tracking_enabled(tmp_path, monkeypatch):
    from feedback_synth.orchestration.run import make_tracker
    from feedback_synth.tracking.base import NullTracker
    from feedback_synth.tracking.mlflow_tracker import MLflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert type(make_tracker(TrackingConfig(enabled=False), str(tmp_path))) is NullTracker
    tracker = make_tracker(TrackingConfig(), str(tmp_path))
    assert isinstance(tracker, MLflowTracker) and tracker.tracking_uri == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
