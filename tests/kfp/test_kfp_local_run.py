"""The whole pipeline through the KFP local runner, on digits-lt at reduced size: every task runs
as its component in its own process, with MLflow tracking on a SQLite store, and every task's
outputs are checked; then the same config in process, and the two runs compared (one
orchestration path: the same run tree in MLflow, the same stage fingerprints, summary and
registry decision)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from feedback_synth.config import load_run_config, preset


@pytest.fixture(scope="module")
def generator(tmp_path_factory) -> str:
    """The bundled generator when it exists, else a random-weight one of the same architecture."""
    from feedback_synth.generation.loading import builtin_generator_path

    if os.path.isdir(os.path.join(builtin_generator_path("digits-lt"), "unet")):
        return "builtin"
    from builders import build_tiny_pixel_generator

    return build_tiny_pixel_generator(str(tmp_path_factory.mktemp("generator")))


def _outputs(root: Path) -> dict[str, dict]:
    """task path (e.g. 'train-baseline', 'for-loop-1-iteration-0/generate-shard') -> executor output,
    of the last KFP run in ``root`` (its folders are named by start time)."""
    run_dir = max(p for p in root.iterdir() if p.is_dir())
    return {str(f.parent.relative_to(run_dir)): json.loads(f.read_text()) for f in run_dir.rglob("executor_output.json")}


def _artifact(out: dict, name: str) -> dict:
    (art,) = out["artifacts"][name]["artifacts"]
    return art


def _where(art: dict) -> Path:
    """Where a task wrote an output: the run folder's layout it published (kfp-local), else its KFP path."""
    from feedback_synth_kfp.artifacts import URL_KEY

    return Path((art.get("metadata") or {}).get(URL_KEY) or art["uri"])


def _run_tree(store: Path) -> dict:
    """The MLflow run tree of the last pipeline run in ``store``: the parent's status, and each
    child's (name, status, nested). On KFP the per-shard runs are grandchildren, under their
    round's generate run, as the in-process runner has one generate run per round."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "feedback-synth"]
    parent = _last_parent(client, exp.experiment_id)
    runs = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    children = sorted((r.info.run_name, r.info.status, True) for r in runs)
    return {"parent": parent.info.status, "children": sorted(set(children))}


def _parent_run(store: Path) -> tuple[dict, list[str]]:
    """The parent run's metrics and its artifacts' paths."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "feedback-synth"]
    parent = _last_parent(client, exp.experiment_id)
    return parent.data.metrics, sorted(a.path for a in client.list_artifacts(parent.info.run_id))


def _shard_runs(store: Path) -> dict[str, tuple[str, bool]]:
    """The last pipeline run's per-shard runs: name -> (status, nested under a generate run)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "feedback-synth"]
    parent = _last_parent(client, exp.experiment_id)
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    generate = {i for i, r in runs.items() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.info.run_name.endswith("generate")}
    return {r.info.run_name: (r.info.status, r.data.tags.get("mlflow.parentRunId") in generate)
            for r in runs.values() if "generate_shard_" in r.info.run_name
            and runs.get(r.data.tags.get("mlflow.parentRunId")) is not None
            and runs[r.data.tags["mlflow.parentRunId"]].data.tags.get("mlflow.parentRunId") == parent.info.run_id}


def _last_parent(client, experiment_id: str):
    """The parent run of the last launch into a store (a killed launch before it has its own)."""
    parents = [r for r in client.search_runs([experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    return max(parents, key=lambda r: r.info.start_time)


def _sigkilled_kfp_local_run(cfg, output: Path, config_file: Path) -> dict:
    """Start `run --runner kfp-local` in a process of its own and SIGKILL it while its
    train_baseline task is at work; its task processes must end by themselves (they watch their
    launcher). Returns the run.json it left."""
    import signal
    import subprocess
    import sys
    import time
    from dataclasses import asdict

    import psutil

    from feedback_synth import storage

    storage.write_yaml(str(config_file), asdict(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "feedback_synth.cli", "run", "--runner", "kfp-local", "--config",
                             str(config_file), "--output", str(output)], env={**os.environ, "TQDM_DISABLE": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(output.glob("kfp/*/train-baseline")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the run ended before train_baseline started"
    tasks = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tasks, timeout=20)
    assert not alive, f"task processes outlived their SIGKILLed launcher: {[t.pid for t in alive]}"
    return json.loads((output / "run.json").read_text())


def _fingerprints(urls: dict) -> dict:
    """The stage fingerprints that do not depend on where the run folder is: the shards' record
    the adapted generator's path, under each run's own output, and every stage after them digests those."""
    root = Path(urls["data"]).parent
    return {name: json.loads((root / folder / "_STAGE.json").read_text())["digest"]
            for name, folder in (("data", "data"), ("baseline", "baseline"), ("adapted", "adapted"),
                                 ("feedback", "rounds/round-1/feedback"))}


@pytest.mark.slow
def test_pipeline_through_the_kfp_local_runner_and_in_process_alike(tmp_path, generator):
    from feedback_synth.orchestration.run import run_pipeline
    from feedback_synth.reporting.tables import format_summary
    from feedback_synth_kfp.local_runner import run_kfp_local

    cfg = load_run_config(None, [
        "train.model=test_resnet", "train.epochs=2", "retrain.epochs=2", "feedback.budget_fraction=0.1",
        "feedback.shard_size=24", "generate.num_inference_steps=4", f"generate.generator={generator}",
        "filter.filters=[degenerate]", "promote.min_gain=0.0", "adapt.method=full", "adapt.steps=2",
        "adapt.batch_size=8", "adapt.samples_per_class=1", "feedback.rounds=2"], base=preset("digits-lt"))
    output = tmp_path / "run"
    # issue 23: a SIGKILLed kfp-local run, resumed; the resumed run is the one compared below
    killed = _sigkilled_kfp_local_run(cfg, output, tmp_path / "config.yaml")
    assert killed["state"] == "running" and killed["launch_id"]  # nothing could settle it
    data_marker = (output / "data" / "_STAGE.json").read_text()
    # what the runner makes in the temp folder, watched (a short path: the task server's socket is in it)
    temp = tempfile.mkdtemp(prefix="fs-")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tempfile, "tempdir", temp)
            report = run_kfp_local(cfg, str(output), parallelism=2)
        assert os.listdir(temp) == []  # no KFP workspace, task server socket or errors folder left behind
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert (output / "data" / "_STAGE.json").read_text() == data_marker  # finished stages are not redone
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("feedback-synth").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}  # the killed launch's runs were closed
    (old_parent,) = [r for r in runs if r.data.tags.get("feedback_synth.launch_id") == killed["launch_id"]]
    assert old_parent.info.status == "FAILED"
    in_process = run_pipeline(cfg, str(tmp_path / "in-process"))

    # one orchestration: the same numbers, stage fingerprints, run tree and registry decision
    for key in ("baseline", "retrained", "delta", "generated", "kept", "fidelity", "gap"):
        assert report[key] == in_process[key], key
    where = ("generator", "base")  # the adapted folder: under each run's own output
    assert {k: v for k, v in report["adaptation"].items() if k not in where} == \
        {k: v for k, v in in_process["adaptation"].items() if k not in where}
    assert set(report["timings"]) == set(in_process["timings"])
    assert _fingerprints(report["outputs"]) == _fingerprints(in_process["outputs"])
    tree = _run_tree(output / "mlflow")
    assert tree == _run_tree(tmp_path / "in-process" / "mlflow")
    assert tree["parent"] == "FINISHED" and {c[0] for c in tree["children"]} == {
        "prepare_data", "train_baseline", "adapt_generator", "evaluate", "promote",
        *(f"round_{r}/{s}" for r in (1, 2) for s in ("extract_feedback", "generate", "filter", "retrain"))}
    assert all(status == "FINISHED" and nested for _, status, nested in tree["children"])
    # on KFP each round's generate run has one child per shard task
    shard_runs = _shard_runs(output / "mlflow")
    assert sorted(shard_runs) == [f"round_{r}/generate_shard_{i}" for r in (1, 2) for i in range(
        report["generation"]["shards"] // 2)] and set(shard_runs.values()) == {("FINISHED", True)}
    for key in ("promoted", "version", "model_name", "reason"):
        assert report["promotion"][key] == in_process["promotion"][key], key
    # the parent run's epilogue is one function for both runners: the same metrics and report.md
    (kfp_metrics, kfp_files), (own_metrics, own_files) = _parent_run(output / "mlflow"), \
        _parent_run(tmp_path / "in-process" / "mlflow")
    assert "delta_few" in kfp_metrics and "report.md" in kfp_files
    assert kfp_metrics == own_metrics and kfp_files == own_files
    # kfp-local writes the in-process layout into --output, and records itself in run.json
    assert Path(report["outputs"]["baseline"]) == output / "baseline"
    assert json.loads((output / "run.json").read_text())["state"] == "finished"

    # the in-process runner's report keys
    for key in ("baseline", "retrained", "delta", "generated", "kept", "fidelity", "per_class", "timings",
                "generation", "outputs", "promotion", "mlflow_run_id"):
        assert key in report, key
    # two rounds of the plan (47 images at budget 0.1), one shard each
    assert report["generated"] == report["generation"]["num_images"] == in_process["generated"]
    assert report["generation"]["shards"] == 2 and report["generation"]["skipped"] == 0
    counts = ("shards", "skipped", "num_images")  # summed over the rounds by both runners
    assert {k: report["generation"][k] for k in counts} == {k: in_process["generation"][k] for k in counts}
    assert set(report["timings"]) == {"prepare_data", "train_baseline", "adapt_generator", "extract_feedback",
                                      "generate", "filter", "retrain", "evaluate", "promote"}
    urls = report["outputs"]
    assert os.path.isfile(os.path.join(urls["baseline"], "model", "config.json"))
    assert os.path.isfile(os.path.join(urls["retrained"], "model", "config.json"))
    for url, name in ((urls["filtered"], "samples.png"), (urls["report"], "per_class_accuracy.png"),
                      (urls["report"], "report.md"), (urls["report"], "run_summary.json")):
        assert os.path.isfile(os.path.join(url, name)), name
    assert report["mlflow_run_id"] and report["promotion"]["model_name"] == "feedback-synth-classifier"
    assert "MLflow run" in format_summary(report)
    assert (output / "config.yaml").is_file() and (output / "mlflow" / "mlflow.db").is_file()

    # every task ran and wrote every output it declares
    outs = _outputs(Path(urls["kfp_pipeline_root"]))
    assert set(outs) == {"start-tracking", "prepare-data", "train-baseline", "adapt-generator", "extract-feedback",
                         "for-loop-1-iteration-0/generate-shard", "filter-synthetic", "retrain", "extract-feedback-2",
                         "for-loop-2-iteration-0/generate-shard-2", "filter-synthetic-2", "retrain-2", "evaluate",
                         "promote"}
    for task, out in outs.items():
        for name, arts in out.get("artifacts", {}).items():
            for art in arts["artifacts"]:
                path = _where(art)
                if name in ("metrics", "confusion"):  # KFP metrics artifacts live in their metadata
                    assert art.get("metadata"), f"{task}: output {name} has no metrics"
                else:
                    assert path.exists() and (path.is_file() or any(path.iterdir())), f"{task}: output {name} is empty"
    assert json.loads(_artifact(outs["start-tracking"], "tracking")["metadata"]["context"])["parent_run_id"] == \
        report["mlflow_run_id"]
    assert {"train.npz", "test.npz", "info.json"} <= {p.name for p in Path(urls["data"]).iterdir()}
    for task in ("train-baseline", "retrain"):
        metrics = _artifact(outs[task], "metrics")["metadata"]
        assert 0 <= metrics["test_overall"] <= 1, task
        confusion = _artifact(outs[task], "confusion")["metadata"]["confusionMatrix"]
        assert len(confusion["rows"]) == 10 and len(confusion["annotationSpecs"]) == 10, task
    assert outs["extract-feedback"]["parameterValues"]["Output"] == [0]
    assert outs["extract-feedback-2"]["parameterValues"]["Output"] == [0]
    assert (Path(urls["feedback"]) / "plan.json").is_file()
    for r, task in ((1, "for-loop-1-iteration-0/generate-shard"), (2, "for-loop-2-iteration-0/generate-shard-2")):
        shard = _artifact(outs[task], "shard")
        assert shard["metadata"]["shard_id"] == 0 and shard["metadata"]["skipped"] is False
        assert (_where(shard) / "shards" / "shard-00000" / "_SUCCESS").is_file()
        assert _where(shard) == output / "rounds" / f"round-{r}" / "generated"
    samples = Path(_artifact(outs["filter-synthetic-2"], "samples")["uri"]).read_text()
    assert "data:image/png;base64," in samples
    filtered = _artifact(outs["filter-synthetic-2"], "filtered")["metadata"]
    assert filtered["generation"]["num_images"] == report["generated"]  # both rounds'
    assert filtered["rounds_seconds"] > filtered["seconds"]
    md = Path(_artifact(outs["evaluate"], "report")["uri"]).read_text()
    assert md == (Path(urls["report"]) / "report.md").read_text() and "| no synthesis (logit_adjusted, " in md
    assert "delta_overall" in _artifact(outs["evaluate"], "metrics")["metadata"]
    assert "data:image/png;base64," in Path(_artifact(outs["evaluate"], "per_class")["uri"]).read_text()
    decision = Path(_artifact(outs["promote"], "decision")["uri"]).read_text()
    assert "feedback-synth-classifier" in decision


@pytest.mark.slow
def test_an_interrupted_kfp_local_run_closes_its_runs(tmp_path, generator):
    """Issue 25, item 6: Ctrl-C during a kfp-local run closes the parent run and the stage runs
    (none stays RUNNING) and run.json says failed (a re-run resumes: the parity test above)."""
    import signal
    import subprocess
    import sys

    import psutil
    from builders import wait_for_stage_run
    from mlflow import MlflowClient

    out = tmp_path / "run"
    sets = [a for s in ("train.model=test_resnet", "train.epochs=2000", f"generate.generator={generator}")
            for a in ("--set", s)]
    proc = subprocess.Popen([sys.executable, "-m", "feedback_synth.cli", "run", "--runner", "kfp-local", "--output",
                             str(out), *sets], env={**os.environ, "TQDM_DISABLE": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the train_baseline task is at work, its stage run open (its own folder in the run's layout
    # appears only when it writes its outputs, after 2000 epochs)
    wait_for_stage_run(out, "train_baseline", proc)
    tasks = psutil.Process(proc.pid).children(recursive=True)
    assert any("executor_main" in " ".join(t.cmdline()) for t in tasks)
    proc.send_signal(signal.SIGINT)  # to the launcher alone, as `kill -INT` or a supervisor sends it
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    _, alive = psutil.wait_procs(tasks, timeout=15)
    assert not alive, f"task processes outlived the interrupted run: {[t.cmdline()[:4] for t in alive]}"
    assert json.loads((out / "run.json").read_text())["state"] == "failed"
    client = MlflowClient(f"sqlite:///{out}/mlflow/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("feedback-synth").experiment_id])
    parent = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.status for r in parent] == ["FAILED"]
    assert "RUNNING" not in {r.info.status for r in runs}
