"""Champion/challenger promotion against an MLflow server whose backend store is PostgreSQL, with
the promotion lock as a PostgreSQL advisory lock on that database.

Needs FEEDBACK_SYNTH_TEST_PG_URI (``eval "$(bash scripts/ci-postgres.sh)"``): skipped without it,
a failure in CI.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from feedback_synth.config import PromoteConfig, TrackingConfig
from feedback_synth.errors import TrackingError
from feedback_synth.registry.gate import CHALLENGER, CHAMPION
from feedback_synth.registry.locks import LockTimeout, PostgresAdvisoryLock, make_lock
from feedback_synth.registry.promote import promote_model_version
from feedback_synth.registry.register import log_model, register_and_promote, register_version
from feedback_synth.tracking.mlflow_tracker import MLflowTracker

pytestmark = [pytest.mark.postgres, pytest.mark.mlflow_server]

BASELINE = {"overall": 0.60, "many": 0.9, "medium": 0.5, "few": 0.20, "worst_class": 0.0}


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def _aliases(client, name):
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def _tracker(server, name, tmp_path):
    t = MLflowTracker(TrackingConfig(tracking_uri=server.url, experiment="promotion-pg", registered_model=name,
                                     retries=1), str(tmp_path))
    t.start(name, {})
    return t


@pytest.mark.slow
def test_first_then_better_then_worse(pg_mlflow_server, pg_uri, checkpoint, model_name, make_report, tmp_path):
    import mlflow

    clf, url, images = checkpoint
    cfg = PromoteConfig(lock_uri=pg_uri, min_gain=0.01, max_overall_drop=0.01)
    tracker = _tracker(pg_mlflow_server, model_name, tmp_path)
    results = []
    for few, overall in ((0.30, 0.61), (0.40, 0.605), (0.45, 0.59)):  # first; better; few up but overall -0.015
        with tracker.stage("promote", {}) as log:
            results.append(register_and_promote(tracker, url, make_report(few=few, overall=overall), cfg,
                                                run_id=log.run_id))
    tracker.finish()
    first, better, worse = results

    assert first["promoted"] and first["reference"] == "baseline of the same run" and first["version"] == "1"
    assert better["promoted"] and better["reference"] == "champion v1"
    assert "few 0.3000 -> 0.4000" in better["reason"]  # the champion's numbers, read back from its tags
    assert not worse["promoted"] and worse["reference"] == "champion v2" and worse["champion_version"] == "2"
    assert "fails: overall 0.6050 -> 0.5900" in worse["reason"]

    client = _client(pg_mlflow_server.url)
    assert _aliases(client, model_name) == {CHAMPION: "2", CHALLENGER: "3"}
    tags = client.get_model_version(model_name, "3").tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.reason"] == worse["reason"]
    assert tags["metric.few"] == "0.45" and tags["test_set"].startswith("digits-lt")
    assert "PostgreSQL advisory lock" in tags["promotion.lock"]
    assert client.get_model_version(model_name, "2").tags["promotion.previous_champion"] == "1"
    models = client.search_logged_models([tracker.experiment_id],
                                         filter_string=f"tags.`promotion.model` LIKE '{model_name}/%'")
    assert sorted(m.tags["promotion.model"] for m in models) == [f"{model_name}/{v}" for v in (1, 2, 3)]
    parent = client.get_run(tracker.run_id).data.tags
    assert parent["promotion.decision"] == "rejected" and parent["promotion.model"] == f"{model_name}/3"

    # the champion loads by alias and predicts as the classifier did before logging (MLflow's global
    # URIs and their environment variables are put back by conftest's _mlflow_globals_restored)
    mlflow.set_tracking_uri(pg_mlflow_server.url)
    mlflow.set_registry_uri(pg_mlflow_server.url)
    got = mlflow.pyfunc.load_model(f"models:/{model_name}@champion").predict(images)
    with torch.no_grad():
        np.testing.assert_allclose(got, clf(torch.from_numpy(images)).numpy(), atol=1e-6, rtol=0)


class SlowReads:
    """A client whose registry reads take ``delay`` s: widens the read-compare-write window the way
    a slow server or a GC pause would."""

    def __init__(self, client, delay: float):
        self._client, self._delay = client, delay

    def __getattr__(self, name):
        fn = getattr(self._client, name)
        if name in ("get_registered_model", "get_model_version"):
            def slow(*a, **kw):
                out = fn(*a, **kw)
                time.sleep(self._delay)
                return out
            return slow
        return fn


class NoLock:
    def acquire(self, timeout):
        pass

    def release(self):
        pass

    def __str__(self):
        return "no lock"


def _race(server, name, versions, pg_uri, locked: bool, first: str):
    """Promote two versions from two threads at once, ``first`` starting 0.2 s before the other;
    every registry read takes 0.6 s, so without a lock both read before either writes."""
    cfg = PromoteConfig(lock_uri=pg_uri, lock_timeout_s=30)
    results, errors = {}, {}

    def promote(label, version, metrics, start_delay):
        time.sleep(start_delay)
        client = SlowReads(_client(server.url), 0.6)
        lock = make_lock(cfg.lock_uri, server.url, name) if locked else NoLock()
        try:
            results[label] = promote_model_version(client, name, version, metrics, cfg, lock=lock,
                                                   baseline_metrics=BASELINE)
        except TrackingError as exc:  # the read-back catching a lost update
            errors[label] = exc

    metrics = {"worse": {"overall": 0.61, "few": 0.30}, "better": {"overall": 0.62, "few": 0.40}}
    threads = [threading.Thread(target=promote, args=(label, versions[label], metrics[label], 0.0 if label == first else 0.2))
               for label in ("worse", "better")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def _two_versions(server, name, checkpoint, tmp_path):
    """Log the model once and register it twice (the 'worse' and the 'better' candidate)."""
    tracker = _tracker(server, name, tmp_path)
    with tracker.stage("register", {}) as log:
        logged = log_model(tracker, checkpoint[1], log.run_id)
        versions = {label: register_version(tracker, logged.source, log.run_id, model_id=logged.model_id)
                    for label in ("worse", "better")}
    tracker.finish()
    return versions


@pytest.mark.slow
def test_concurrent_promotions_are_serialised(pg_mlflow_server, pg_uri, checkpoint, model_name, tmp_path):
    versions = _two_versions(pg_mlflow_server, model_name, checkpoint, tmp_path)
    results, errors = _race(pg_mlflow_server, model_name, versions, pg_uri, locked=True, first="worse")
    assert not errors
    worse, better = results["worse"], results["better"]
    # the worse one took the lock first and beat the baseline; the better one then saw it as champion
    assert worse["promoted"] and worse["reference"] == "baseline of the same run"
    assert better["promoted"] and better["reference"] == f"champion v{versions['worse']}"
    client = _client(pg_mlflow_server.url)
    assert _aliases(client, model_name)[CHAMPION] == versions["better"]
    assert client.get_model_version(model_name, versions["better"]).tags["promotion.decision"] == "promoted"


@pytest.mark.slow
def test_without_the_lock_the_worse_model_can_win(pg_mlflow_server, pg_uri, checkpoint, model_name, tmp_path):
    """Why the lock exists: both read 'no champion', both pass against the baseline, the last alias
    write wins, and that is the worse model's."""
    versions = _two_versions(pg_mlflow_server, model_name, checkpoint, tmp_path)
    results, errors = _race(pg_mlflow_server, model_name, versions, pg_uri, locked=False, first="better")
    assert not errors
    # both compared against the baseline, both think they are champion; the worse one is
    assert results["better"]["promoted"] and results["worse"]["promoted"]
    assert results["worse"]["reference"] == results["better"]["reference"] == "baseline of the same run"
    assert _aliases(_client(pg_mlflow_server.url), model_name)[CHAMPION] == versions["worse"]


@pytest.mark.slow
def test_advisory_lock_holds_across_processes(pg_mlflow_server, pg_uri, model_name, tmp_path):
    key = f"feedback-synth/promote/{model_name}"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from feedback_synth.registry.locks import PostgresAdvisoryLock\n"
                               f"l = PostgresAdvisoryLock({pg_uri!r}, {key!r}); l.acquire(10)\n"
                               "print('held', flush=True); time.sleep(3); l.release()"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match="still held after 0.3 s"):
            PostgresAdvisoryLock(pg_uri, key).acquire(0.3)
        assert time.monotonic() - t0 < 3
        # a promotion meanwhile times out and stays challenger
        client = _client(pg_mlflow_server.url)
        client.create_registered_model(model_name)
        run = client.create_run(client.get_experiment_by_name("promotion-pg").experiment_id
                                if client.get_experiment_by_name("promotion-pg") else client.create_experiment("promotion-pg"))
        v = str(client.create_model_version(model_name, f"runs:/{run.info.run_id}/model", run.info.run_id).version)
        r = promote_model_version(client, model_name, v, {"overall": 0.9, "few": 0.9},
                                  PromoteConfig(lock_uri=pg_uri, lock_timeout_s=0.5), baseline_metrics=BASELINE)
        assert r["decision"] == "lock_timeout" and not r["promoted"] and "stays challenger" in r["reason"]
        assert _aliases(client, model_name) == {CHALLENGER: v}
        lock = PostgresAdvisoryLock(pg_uri, key)
        lock.acquire(10)  # granted once the holder lets go
        lock.release()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_promote_processes_at_once(pg_mlflow_server, pg_uri, checkpoint, model_name, make_report, tmp_path):
    """Two `feedback-synth promote` processes (two pods finishing together) against one registry:
    whichever order the lock grants, the better model ends champion and the decisions agree."""
    import json

    procs = {}
    for label, (few, overall) in {"worse": (0.30, 0.61), "better": (0.40, 0.62)}.items():
        report = tmp_path / f"{label}.json"
        report.write_text(json.dumps(make_report(few=few, overall=overall)))
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        procs[label] = subprocess.Popen(
            [sys.executable, "-m", "feedback_synth.cli", "promote", "--model", checkpoint[1], "--report", str(report),
             "--tracking-uri", pg_mlflow_server.url, "--registered-model", model_name, "--run-name", label,
             "--set", f"promote.lock_uri={pg_uri}", "--set", "tracking.experiment=promotion-pg",
             "--result", str(tmp_path / f"{label}-decision.json")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for label, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{label}: {err[-2000:]}"
    worse, better = (json.loads((tmp_path / f"{k}-decision.json").read_text()) for k in ("worse", "better"))
    assert _aliases(_client(pg_mlflow_server.url), model_name)[CHAMPION] == better["version"]
    assert better["promoted"]
    if worse["promoted"]:  # the worse one went first: the better one must have seen it as champion
        assert better["reference"] == f"champion v{worse['version']}"
    else:  # the better one went first: the worse one was compared with it
        assert worse["reference"] == f"champion v{better['version']}"
        assert better["reference"] == "baseline of the same run"
