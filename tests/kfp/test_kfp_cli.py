"""``feedback-synth compile`` and ``submit``: parameters checked and typed, a clear bounded error
without an endpoint, and the requests kfp.Client sends to a (fake) KFP API."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from feedback_synth.cli.main import main
from feedback_synth.errors import ConfigError
from feedback_synth_kfp.submit import cron_expression, parse_params, pipeline_parameters


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_compile_writes_the_pipeline(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out), "--parallelism", "3"]) == 0
    spec = next(yaml.safe_load_all(out.read_text()))
    assert spec["pipelineInfo"]["name"] == "feedback-synth"
    (loop,) = [t for c in spec["components"].values() for n, t in c.get("dag", {}).get("tasks", {}).items()
               if n.startswith("for-loop-")]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 3
    assert main(["compile", "--output", str(tmp_path / "nope" / "p.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_params_are_checked_and_typed(compiled):
    params = pipeline_parameters(str(compiled))
    got = parse_params(["scale=0.01", "guide_every=2", "dataset=gs://b/data", "gpu_node_selector={\"a\": \"b\"}",
                        "gpu_tolerations=[]", "config={\"train\": {\"epochs\": 3}}"], params)
    assert got == {"scale": 0.01, "guide_every": 2, "dataset": "gs://b/data", "gpu_node_selector": {"a": "b"},
                   "gpu_tolerations": [], "config": "{\"train\": {\"epochs\": 3}}"}
    with pytest.raises(ConfigError, match="no such parameter.*budget_fraction"):
        parse_params(["budget=1"], params)
    with pytest.raises(ConfigError, match="expected an integer"):
        parse_params(["guide_every=every"], params)
    with pytest.raises(ConfigError, match="JSON object"):
        parse_params(["gpu_node_selector=[1]"], params)
    with pytest.raises(ConfigError, match="key=value"):
        parse_params(["scale"], params)


def test_cron_expressions():
    assert cron_expression("0 3 * * 0") == "0 0 3 * * 0"
    assert cron_expression("0 0 3 * * 0") == "0 0 3 * * 0"
    with pytest.raises(ConfigError, match="5 fields"):
        cron_expression("3 * *")


def test_submit_without_an_endpoint_fails_fast_and_clearly(capsys):
    t0 = time.time()
    rc = main(["submit", "--host", f"http://127.0.0.1:{_free_port()}", "--param", "scale=0.01"])
    err = capsys.readouterr().err
    assert rc == 2 and time.time() - t0 < 30
    assert err.startswith("feedback-synth: error: cannot reach the Kubeflow Pipelines API at http://127.0.0.1:")
    assert "Connection refused" in err and "Traceback" not in err


def test_submit_to_a_silent_endpoint_is_bounded_by_timeout(capsys):
    """A host that accepts connections but never answers (a hung proxy)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        t0 = time.time()
        rc = main(["submit", "--host", f"http://127.0.0.1:{port}", "--timeout", "1.5"])
        elapsed = time.time() - t0
    finally:
        srv.close()
    assert rc == 2 and elapsed < 20
    assert "no answer within 1.5 s" in capsys.readouterr().err


def test_submit_rejects_bad_arguments_before_any_network(capsys):
    assert main(["submit", "--host", "http://127.0.0.1:1", "--recurring", "0 3 * * 0"]) == 2
    assert "--job-name" in capsys.readouterr().err
    assert main(["submit", "--host", "ml-pipeline:8888"]) == 2
    assert "http://" in capsys.readouterr().err
    assert main(["submit", "--host", "http://127.0.0.1:1", "--package", "/nonexistent.yaml"]) == 2
    assert "file not found" in capsys.readouterr().err


class _FakeKFP(BaseHTTPRequestHandler):
    """Just enough of the KFP v2beta1 REST API for kfp.Client to create runs."""

    calls: list = []

    def _reply(self, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        self.calls.append(("GET", self.path, None))
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._reply({"multi_user": False})
        elif self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiments": []})
        else:
            self._reply({})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.calls.append(("POST", self.path, body))
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiment_id": "exp-1", "display_name": body.get("display_name")})
        elif self.path.startswith("/apis/v2beta1/runs"):
            self._reply({"run_id": "run-1", "display_name": body.get("display_name"), "experiment_id": "exp-1"})
        elif self.path.startswith("/apis/v2beta1/recurringruns"):
            self._reply({"recurring_run_id": "rr-1", "display_name": body.get("display_name")})
        else:
            self._reply({})

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def fake_kfp(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json of the user
    _FakeKFP.calls = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeKFP)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _FakeKFP.calls
    server.shutdown()


def _digits_lt_preset_parameters() -> dict:
    """What the digits-lt preset file sets away from the pipeline's defaults, read from the YAML itself:
    the preset's scale and shard size as pipeline parameters, its baseline loss in the config parameter."""
    from feedback_synth.config import preset

    values = preset("digits-lt")
    assert values["generate"]["strength"] == 0.8  # the pipeline's default: sent as nothing
    from feedback_synth.config import TrainConfig

    out = {"scale": values["generate"]["scale"], "shard_size": values["feedback"]["shard_size"]}
    train = {k: values["train"][k] for k in ("loss", "tau") if values["train"][k] != getattr(TrainConfig(), k)}
    if train:  # the preset's baseline recipe, where it is not the library's default
        out["config"] = json.dumps({"train": train}, sort_keys=True)
    return out


def test_submit_creates_a_run_with_typed_parameters(fake_kfp, capsys):
    host, calls = fake_kfp
    rc = main(["submit", "--host", host, "--namespace", "team-a", "--experiment", "exp", "--run-name", "nightly",
               "--param", "scale=0.01", "--param", "mlflow_tracking_uri=http://mlflow:5000",
               "--param", 'gpu_node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"}'])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert '"run_id": "run-1"' in out.out
    (run,) = [b for m, p, b in calls if m == "POST" and p.startswith("/apis/v2beta1/runs")]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "feedback-synth"
    executors = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "nodeSelector" in executors["exec-generate-shard"]  # the GPU placement reaches the server
    assert run["runtime_config"]["parameters"] == {  # the digits-lt preset, as `run` uses it, under the --params
        **_digits_lt_preset_parameters(), "scale": 0.01, "mlflow_tracking_uri": "http://mlflow:5000",
        "gpu_node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
    (exp,) = [b for m, p, b in calls if m == "POST" and p.startswith("/apis/v2beta1/experiments")]
    assert exp["display_name"] == "exp" and exp["namespace"] == "team-a"


def test_submit_recurring_run(fake_kfp, capsys, compiled):
    host, calls = fake_kfp
    rc = main(["submit", "--host", host, "--package", str(compiled), "--recurring", "0 3 * * 0",
               "--job-name", "weekly", "--param", "budget_fraction=0.5"])
    assert rc == 0, capsys.readouterr().err
    (job,) = [b for m, p, b in calls if m == "POST" and p.startswith("/apis/v2beta1/recurringruns")]
    assert job["display_name"] == "weekly"
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
    assert job["max_concurrency"] in ("1", 1) and job["no_catchup"] is True
    assert job["runtime_config"]["parameters"] == {**_digits_lt_preset_parameters(), "budget_fraction": 0.5}


def test_run_name_prefix(fake_kfp, capsys):
    host, calls = fake_kfp
    assert main(["submit", "--host", host, "--run-name-prefix", "nightly"]) == 0, capsys.readouterr().err
    (run,) = [b for m, p, b in calls if m == "POST" and p.startswith("/apis/v2beta1/runs")]
    assert run["display_name"].startswith("nightly-20")


def _submitted_parameters(host, calls, capsys, *args):
    assert main(["submit", "--host", host, *args]) == 0, capsys.readouterr().err
    (run,) = [b for m, p, b in calls if m == "POST" and p.startswith("/apis/v2beta1/runs")]
    calls.clear()
    return run["runtime_config"]["parameters"]


def test_submit_means_what_run_means(fake_kfp, capsys, tmp_path):
    """The configuration resolves as for `feedback-synth run` (preset < --config < --set), and only
    what differs from the pipeline's defaults is sent; --param wins, and merges into the config parameter."""
    from feedback_synth.config import preset, resolve_run_config
    from feedback_synth_kfp.parameters import pipeline_arguments

    host, calls = fake_kfp
    # digits-groups: its preset's values reach the run (and the default device, auto, is not sent)
    params = _submitted_parameters(host, calls, capsys, "--dataset", "digits-groups")
    assert params["dataset"] == "digits-groups" and "device" not in params
    cfg = resolve_run_config("digits-groups")
    assert cfg.promote.gate_metric == preset("digits-groups")["promote"]["gate_metric"] == params["gate_metric"]
    sent = json.loads(params.get("config", "{}"))
    assert sent == json.loads(pipeline_arguments(cfg)["config"])
    # a dataset URL has no preset: nothing but the dataset differs from the defaults
    assert _submitted_parameters(host, calls, capsys, "--param", "dataset=gs://bucket/data") == {
        "dataset": "gs://bucket/data"}
    # --config and --set, then --param over them; a --param config object merges section by section
    config = tmp_path / "run.yaml"
    config.write_text("generate:\n  num_inference_steps: 30\n  scale: 0.03\n")
    params = _submitted_parameters(host, calls, capsys, "--config", str(config), "--set", "generate.cfg_scale=3.0",
                                   "--param", "guide_every=2", "--param", 'config={"generate": {"batch_size": 8}}')
    assert params["scale"] == 0.03 and params["guide_every"] == 2
    assert json.loads(params["config"])["generate"] == {"num_inference_steps": 30, "cfg_scale": 3.0, "batch_size": 8}
    # a bad override is named, before any run is created
    assert main(["submit", "--host", host, "--set", "generate.scale=7"]) == 2
    assert "generate.scale" in capsys.readouterr().err
    assert not [c for c in calls if c[0] == "POST"]


def test_pipeline_defaults_are_the_library_defaults(compiled):
    """One source of truth: the compiled parameters' defaults are the library's (``named_defaults``,
    read from the config code), and a run left at every default means `feedback-synth run`: the
    default dataset's preset."""
    from feedback_synth.config import RunConfig, resolve_run_config
    from feedback_synth_kfp.parameters import named_defaults, run_config_from_parameters

    spec = pipeline_parameters(str(compiled))
    assert {k: spec[k]["default"] for k in named_defaults()} == named_defaults()
    assert spec["scale"]["default"] == RunConfig().generate.scale == 0.02  # the library default, not digits-lt's
    ui = run_config_from_parameters({k: v["default"] for k, v in spec.items() if "default" in v})
    assert ui == resolve_run_config(None)  # ... and a UI run at the defaults is digits-lt with its preset
