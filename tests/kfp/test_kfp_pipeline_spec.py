"""The compiled pipeline: tasks, images, GPU requests, retries, fan-out, caching, placement.

KFP once silently dropped accelerator settings (kubeflow/pipelines #11374) and loading a compiled
YAML back checks little, so these tests read the compiled structure itself.
"""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "pipelines" / "feedback_synth_pipeline.yaml"

STAGES = ["prepare_data", "train_baseline", "adapt_generator", "extract_feedback", "generate_shard", "filter_synthetic",
          "retrain", "evaluate", "promote"]
GPU_TASKS = {"train-baseline", "adapt-generator", "generate-shard", "retrain"}  # every training task can take the GPU
UNCACHED = {"generate-shard", "filter-synthetic", "promote", "start-tracking", "finish-tracking"}


def _images() -> dict[str, str]:
    spec = yaml.safe_load((REPO / "images" / "images.yaml").read_text())
    return {k: f"{spec['registry']}/{v}:{spec['tag']}" for k, v in spec["images"].items()}


def _tasks(spec) -> dict[str, dict]:
    """Every task of the pipeline, nested DAGs (the ParallelFor body) included, by task name."""
    p = spec["pipeline"]
    out = dict(p["root"]["dag"]["tasks"])
    for comp in p["components"].values():
        out.update(comp.get("dag", {}).get("tasks", {}))
    return out


def _groups(spec) -> set[str]:
    """The control-flow tasks (the ParallelFor loop, the exit handler): DAGs, not containers."""
    comps = spec["pipeline"]["components"]
    return {name for name, t in _tasks(spec).items() if "dag" in comps[t["componentRef"]["name"]]}


def _loop(spec) -> str:
    (name,) = [n for n in _groups(spec) if n.startswith("for-loop-")]
    return name


def _executor(spec, task_name: str) -> dict:
    p = spec["pipeline"]
    comp = p["components"][_tasks(spec)[task_name]["componentRef"]["name"]]
    return p["deploymentSpec"]["executors"][comp["executorLabel"]]["container"]


def test_every_stage_is_a_task_in_order(spec):
    tasks = _tasks(spec)
    names = {n.replace("_", "-") for n in STAGES} | {"start-tracking"}
    assert names <= set(tasks)
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert "prepare-data" in deps["train-baseline"]
    assert {"train-baseline", "prepare-data"} <= deps["adapt-generator"]
    assert {"train-baseline", "prepare-data"} <= deps["extract-feedback"]
    assert "adapt-generator" in deps[_loop(spec)]  # generation samples from the adapted generator
    assert _loop(spec) in deps["filter-synthetic"]  # joins the fan-out
    assert "filter-synthetic" in deps["retrain"]
    assert {"retrain", "filter-synthetic"} <= deps["evaluate"]
    assert {"evaluate", "retrain"} <= deps["promote"]
    for name, task in tasks.items():
        if name not in _groups(spec):
            assert task["taskInfo"]["name"] != name, f"{name}: set_display_name"


def test_images_come_from_images_yaml(spec):
    images = _images()
    for name in set(_tasks(spec)) - _groups(spec):
        expected = images["gpu"] if name in GPU_TASKS else images["cpu"]
        assert _executor(spec, name)["image"] == expected, name


def test_lightweight_components_install_nothing(spec):
    for name in set(_tasks(spec)) - _groups(spec):
        c = _executor(spec, name)
        text = " ".join(c["command"] + c.get("args", []))
        assert "pip install" not in text, f"{name} installs packages at start (install_kfp_package=False?)"
        assert "executor_main" in text and "from feedback_synth" in text, name


def test_gpu_tasks_request_gpus_and_retry(spec):
    for name in GPU_TASKS:
        res = _executor(spec, name)["resources"]
        assert res["accelerator"]["resourceType"] == "nvidia.com/gpu", name
        assert res["accelerator"]["resourceCount"] == "1", name
        retry = _tasks(spec)[name]["retryPolicy"]
        assert retry["maxRetryCount"] == 3 and retry["backoffDuration"] == "60s", name
    for name in set(_tasks(spec)) - GPU_TASKS - _groups(spec):
        assert "accelerator" not in _executor(spec, name)["resources"], name


def test_every_task_has_cpu_and_memory_requests_and_limits(spec):
    for name in set(_tasks(spec)) - _groups(spec):
        res = _executor(spec, name)["resources"]
        for key in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit"):
            assert res.get(key), f"{name}: {key}"


def test_generation_fans_out_over_the_plan_with_parallelism(spec):
    loop = _tasks(spec)[_loop(spec)]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 8
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--extract-feedback-Output"
    body = spec["pipeline"]["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert list(body) == ["generate-shard"]
    shard_id = body["generate-shard"]["inputs"]["parameters"]["shard_id"]
    assert shard_id["componentInputParameter"] == loop["parameterIterator"]["itemInput"]
    # the join: filter_synthetic takes the collected outputs of every shard task
    shards = _tasks(spec)["filter-synthetic"]["inputs"]["artifacts"]["generated"]
    assert shards["taskOutputArtifact"] == {"outputArtifactKey": "pipelinechannel--generate-shard-shard",
                                            "producerTask": _loop(spec)}
    # extract_feedback returns the shard ids as a list
    outputs = spec["pipeline"]["components"]["comp-extract-feedback"]["outputDefinitions"]["parameters"]
    assert outputs["Output"]["parameterType"] == "LIST"


def test_an_exit_handler_closes_the_mlflow_runs_of_a_failed_run(spec):
    root = spec["pipeline"]["root"]["dag"]["tasks"]
    (handler,) = [n for n in root if n.startswith("exit-handler-")]
    assert set(root) == {handler, "finish-tracking"}  # every stage runs inside the handler
    inside = spec["pipeline"]["components"][root[handler]["componentRef"]["name"]]["dag"]["tasks"]
    assert {n.replace("_", "-") for n in STAGES if n != "generate_shard"} | {"start-tracking"} <= set(inside)
    finish = root["finish-tracking"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # also after a failure
    assert finish["dependentTasks"] == [handler]
    params = finish["inputs"]["parameters"]
    assert params["status"]["taskFinalStatus"]["producerTask"] == handler
    assert params["kfp_run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    assert params["mlflow_tracking_uri"]["componentInputParameter"] == "mlflow_tracking_uri"


def test_caching_is_off_where_the_cache_would_lie(spec):
    tasks = _tasks(spec)
    for name in UNCACHED:
        assert not tasks[name]["cachingOptions"].get("enableCache"), name
    for name in ("prepare-data", "train-baseline", "extract-feedback", "evaluate", "retrain"):
        assert tasks[name]["cachingOptions"].get("enableCache") is True, name


def test_gpu_placement_comes_from_pipeline_parameters(spec):
    executors = spec["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{name}" for name in GPU_TASKS}
    for label, k8s in executors.items():
        sel = k8s["nodeSelector"]["nodeSelectorJson"]["componentInputParameter"]
        (tol,) = k8s["tolerations"]
        assert sel.endswith("gpu_node_selector") and tol["tolerationJson"]["componentInputParameter"].endswith(
            "gpu_tolerations"), label
    params = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    assert params["gpu_node_selector"]["parameterType"] == "STRUCT"
    assert params["gpu_tolerations"]["parameterType"] == "LIST"
    assert params["gpu_tolerations"]["defaultValue"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_pipeline_parameters(spec):
    params = spec["pipeline"]["root"]["inputDefinitions"]["parameters"]
    expected = {"dataset": "STRING", "classifier_model": "STRING", "adapt_method": "STRING", "generator": "STRING",
                "criterion": "STRING", "config": "STRING",
                "scale": "NUMBER_DOUBLE", "guide_every": "NUMBER_INTEGER", "budget_fraction": "NUMBER_DOUBLE",
                "shard_size": "NUMBER_INTEGER", "workspace_url": "STRING", "mlflow_tracking_uri": "STRING",
                "registered_model": "STRING", "gate_metric": "STRING", "min_gain": "NUMBER_DOUBLE",
                "max_overall_drop": "NUMBER_DOUBLE"}
    for name, ptype in expected.items():
        assert params[name]["parameterType"] == ptype, name
    assert params["config"]["defaultValue"] == "{}"  # every other config field, as one value
    assert not [p for p in params if p.endswith("_overrides")]
    assert params["mlflow_tracking_uri"]["defaultValue"] == ""  # no tracking unless asked


def test_committed_yaml_is_up_to_date(compiled):
    """Recompile and compare the parsed documents (the compiler's header comment may order a
    dict default's keys differently from one process to the next)."""
    assert COMMITTED.is_file(), "pipelines/feedback_synth_pipeline.yaml is missing: run feedback-synth compile"
    fresh = list(yaml.safe_load_all(compiled.read_text()))
    committed = list(yaml.safe_load_all(COMMITTED.read_text()))
    assert committed == fresh, ("pipelines/feedback_synth_pipeline.yaml is stale: run "
                                "`feedback-synth compile --output pipelines/feedback_synth_pipeline.yaml`")


@pytest.mark.parametrize("stage", STAGES + ["start_tracking"])
def test_components_are_thin_documented_wrappers(stage):
    module = importlib.import_module(f"feedback_synth_kfp.components.{stage}")
    comp = getattr(module, stage)
    func = comp.python_func
    doc = inspect.getdoc(func)
    assert doc and "Args:" in doc, stage
    for name in inspect.signature(func).parameters:
        assert re.search(rf"^\s*{name} \(.+\):", doc, re.M), f"{stage}: Args entry '{name} (type): ...'"
    body = inspect.getsource(func)
    assert "from feedback_synth" in body
    assert len(body.splitlines()) < 80, f"{stage}: logic belongs in the library"


@pytest.mark.slow
def test_settings_change_what_is_compiled(tmp_path):
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import PipelineSettings, compile_pipeline

    path = compile_pipeline(str(tmp_path / "p.yaml"), PipelineSettings(parallelism=2, gpu_retries=0))
    compiled = {"pipeline": next(yaml.safe_load_all(open(path)))}
    assert _tasks(compiled)[_loop(compiled)]["iteratorPolicy"]["parallelismLimit"] == 2
    assert "retryPolicy" not in _tasks(compiled)["retrain"]
    # without the exit handler (the local runner): the stages at the top level, and pipeline outputs
    path = compile_pipeline(str(tmp_path / "local.yaml"), PipelineSettings(exit_handler=False))
    p = next(yaml.safe_load_all(open(path)))
    assert "finish-tracking" not in p["root"]["dag"]["tasks"] and "promote" in p["root"]["dag"]["tasks"]
    assert set(p["root"]["outputDefinitions"]["artifacts"]) == {"tracking", "data", "baseline", "adapted", "feedback",
                                                                "filtered", "retrained", "evaluation", "decision"}
    with pytest.raises(ValueError, match="parallelism"):
        PipelineSettings(parallelism=0)


def test_a_setter_on_a_task_without_a_container_is_still_refused_by_name():
    """kfp_patches replaces kfp's stack walk in the task setters' check, not the check: a setter on
    a pipeline used as a component is refused, naming the setter, as kfp words it."""
    from kfp import dsl

    import feedback_synth_kfp.pipelines.feedback_synth_pipeline  # noqa: F401  (installs kfp_patches)
    from feedback_synth_kfp import kfp_patches

    assert dsl.PipelineTask._ensure_container_spec_exists is kfp_patches._ensure_container_spec_exists

    @dsl.component(base_image="python:3.11")
    def hello():
        print("hello")

    @dsl.pipeline
    def inner():
        hello()

    with pytest.raises(ValueError, match=r"^set_cpu_limit can only be used on single-step components, not pipelines"):
        @dsl.pipeline
        def outer():
            inner().set_cpu_limit("1")


def test_a_recompiled_pipeline_is_the_same_file(tmp_path):
    """The YAML's header comment lists the defaults with their keys in one order (kfp's came in a
    new order on each compile): recompiling an unchanged pipeline gives the committed file, byte
    for byte, so that GitOps review sees only real changes."""
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import compile_pipeline

    texts = {Path(compile_pipeline(str(tmp_path / f"{i}.yaml"))).read_text() for i in range(3)}
    assert len(texts) == 1
    (text,) = texts
    assert "#    gpu_tolerations: list [Default: [{'effect': 'NoSchedule', 'key': 'nvidia.com/gpu', " \
           "'operator': 'Exists'}]]" in text.splitlines()
    assert text == COMMITTED.read_text(), "pipelines/feedback_synth_pipeline.yaml is stale: run feedback-synth compile"
