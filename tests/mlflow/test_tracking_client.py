"""The tracking client without a server: MLflow's own HTTP retry settings per call, the waits they
give, which failures count as transient, and creates that are never blindly retried."""
from __future__ import annotations

import os

import pytest

from feedback_synth.config import TrackingConfig
from feedback_synth.errors import TrackingError
from feedback_synth.tracking import client as tc


def _http_failure():
    from mlflow.exceptions import MlflowException

    # what MLflow raises once its HTTP retries are spent on a refused connection
    return MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/runs/create failed with exception "
                           "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded")


def test_retry_settings_are_mlflows_own(monkeypatch):
    monkeypatch.delenv(tc.BACKOFF_ENV, raising=False)
    assert tc.http_env(3, 29.5) == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "3",
                                    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    assert tc.http_env(50, 1)["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "10"  # MLflow refuses more than 10
    # urllib3's waits: 0 before the first retry, then 2f, 4f: the default 3 retries give up after ~18 s
    assert [tc.retry_wait_s(a) for a in (1, 2, 3)] == [0, 6, 12] and tc.total_wait_s(3) == 18
    monkeypatch.setenv(tc.BACKOFF_ENV, "1")  # a user's own setting wins
    assert tc.total_wait_s(3) == 6
    monkeypatch.setenv(tc.RETRIES_ENV, "7")
    with tc.mlflow_http(0, 5):
        assert os.environ[tc.RETRIES_ENV] == "0" and os.environ[tc.TIMEOUT_ENV] == "5"
    assert os.environ[tc.RETRIES_ENV] == "7"  # restored


def test_transient_failures():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    assert tc.is_transient(_http_failure())
    assert tc.is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert tc.is_transient(ConnectionRefusedError())
    assert not tc.is_transient(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not tc.is_transient(MlflowException("Unable to fetch model from model URI"))  # a local store's refusal


class FakeRaw:
    """create_run that does create, then loses the response (a timeout after the server committed)."""

    def __init__(self, lose: int):
        self.lose, self.runs, self.env_retries = lose, [], []

    def create_run(self, tag):
        self.env_retries.append(os.environ[tc.RETRIES_ENV])
        self.runs.append(tag)
        if self.lose:
            self.lose -= 1
            raise _http_failure()
        return tag

    def get_run(self, run_id):
        self.env_retries.append(os.environ[tc.RETRIES_ENV])
        return run_id


def test_create_once_finds_what_a_lost_response_created(monkeypatch):
    monkeypatch.setattr(tc.time, "sleep", lambda s: None)
    raw = FakeRaw(lose=1)
    client = tc.TrackingClient(raw, retries=3, uri="http://mlflow:5000")
    made = client.create_once("create_run", lambda: raw.create_run("r1"), lambda: "r1" if "r1" in raw.runs else None)
    assert made == "r1" and raw.runs == ["r1"]  # found, not created twice
    assert raw.env_retries == ["0"]  # the create went out once, with MLflow's retries off


def test_create_once_gives_up_naming_the_server(monkeypatch):
    monkeypatch.setattr(tc.time, "sleep", lambda s: None)
    raw = FakeRaw(lose=10)
    client = tc.TrackingClient(raw, retries=2, uri="http://mlflow:5000", outputs_hint=" Outputs in /out.")
    with pytest.raises(TrackingError, match=r"http://mlflow:5000 failed 'create_run' 3 times .*Outputs in /out"):
        client.create_once("create_run", lambda: raw.create_run("r"), lambda: None)
    assert len(raw.runs) == 3


def test_calls_use_the_clients_retries_and_creates_none(monkeypatch):
    raw = FakeRaw(lose=0)
    client = tc.TrackingClient(raw, retries=4, uri="http://mlflow:5000")
    client.get_run("x")
    client.create_run("y")  # a non-idempotent create called directly: one request
    assert raw.env_retries == ["4", "0"]
    raw.lose = 1
    with pytest.raises(TrackingError, match="failed 'create_run' 1 times"):
        client.create_run("z")


def test_configure_mlflow_env(monkeypatch):
    for key, value in ((tc.RETRIES_ENV, "9"), (tc.TIMEOUT_ENV, "9"), (tc.BACKOFF_ENV, "5")):
        monkeypatch.setenv(key, value)  # restored afterwards
    tc.configure_mlflow_env(TrackingConfig(retries=2, request_timeout_s=12))
    # retries and timeout come from the config; a backoff factor set by the user is kept
    assert (os.environ[tc.RETRIES_ENV], os.environ[tc.TIMEOUT_ENV], os.environ[tc.BACKOFF_ENV]) == ("2", "12", "5")


def test_ui_link_opens_the_model_training_view():
    from feedback_synth.tracking.mlflow_tracker import ui_url

    # MLflow 3.17's UI takes its view from ?workflowType=, not from the experiment's kind tag
    assert ui_url("http://mlflow:5000/", "3", "abc") == \
        "http://mlflow:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui_url("http://mlflow:5000", "3") == "http://mlflow:5000/#/experiments/3?workflowType=machine_learning"


def test_use_tracking_uri_leaves_the_environment_as_it_found_it(monkeypatch):
    """mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI; a later run in the same process
    must not inherit the promotion's URI (it would log to another store than its own)."""
    import os

    from feedback_synth.tracking.client import use_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with use_tracking_uri("sqlite:////tmp/elsewhere.db"):
        assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/elsewhere.db"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mine:5000")
    with use_tracking_uri("sqlite:////tmp/elsewhere.db"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://mine:5000"
