"""The pilot as a Kubeflow pipeline (pipelines/pilot_pipeline.py): compiled, its fan-out and GPU
placement checked, and run through the real KFP local runner at test size; then the in-process
pilot into the same folder resumes every stage and reaches the same verdict."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from feedback_synth.orchestration import DEFAULT_FOLDS

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "pipelines" / "pilot_pipeline.yaml"


@pytest.fixture(scope="module")
def pilot_spec(tmp_path_factory) -> dict:
    from feedback_synth_kfp.pipelines.pilot_pipeline import compile_pilot

    path = compile_pilot(str(tmp_path_factory.mktemp("pilot") / "pilot.yaml"))
    return list(yaml.safe_load_all(Path(path).read_text()))[0]


def _tasks(spec: dict) -> dict[str, dict]:
    """Every task of the pilot, by name, across its DAGs (the exit handler's, the loops')."""
    out = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        out.update((component.get("dag") or {}).get("tasks") or {})
    return out


def test_the_pilot_fans_out_folds_then_cells_on_gpu_pods(pilot_spec):
    tasks = _tasks(pilot_spec)
    loops = {name: t for name, t in tasks.items() if "parameterIterator" in t}
    assert len(loops) == 2  # the folds (baseline, adaptations), then the (setting, fold) cells
    inside = {name: set(pilot_spec["components"][t["componentRef"]["name"]]["dag"]["tasks"]) for name, t in loops.items()}
    assert sorted(map(sorted, inside.values())) == [["pilot-cell"], ["pilot-fold"]]
    executors = pilot_spec["deploymentSpec"]["executors"]
    on_gpu = {name for name, e in executors.items() if e["container"].get("resources", {}).get("accelerator")}
    assert on_gpu == {"exec-pilot-fold", "exec-pilot-cell"}
    assert all("-gpu:" in executors[e]["container"]["image"] for e in on_gpu)
    # the cells wait for every fold's baseline; the verdict for every cell
    assert "pilot-prepare" in tasks["pilot-cells"]["dependentTasks"] or any(
        "for-loop" in d for d in tasks["pilot-cells"]["dependentTasks"])
    assert any("for-loop" in d for d in tasks["pilot-choose"]["dependentTasks"])
    params = pilot_spec["root"]["inputDefinitions"]["parameters"]
    assert params["config"]["defaultValue"] == "{}" and "output" in params and params["folds"]["defaultValue"] == DEFAULT_FOLDS


def test_committed_pilot_yaml_is_up_to_date(pilot_spec):
    assert COMMITTED.is_file(), "pipelines/pilot_pipeline.yaml is missing: run feedback-synth compile --pipeline pilot"
    assert list(yaml.safe_load_all(COMMITTED.read_text()))[0] == pilot_spec, (
        "pipelines/pilot_pipeline.yaml is stale: run `feedback-synth compile --pipeline pilot --output "
        "pipelines/pilot_pipeline.yaml`")


def test_the_piloted_pipeline_runs_the_run_only_on_go_with_the_chosen_config(tmp_path):
    """The pilot's tasks, then under dsl.If(go) the run pipeline (nested) with the chosen config as
    its ``config`` parameter; the committed YAML is up to date. (Run through the local runner:
    the test below.)"""
    from feedback_synth_kfp.pipelines.pilot_pipeline import compile_pilot

    spec = list(yaml.safe_load_all(Path(compile_pilot(str(tmp_path / "p.yaml"), then_run=True)).read_text()))[0]
    committed = REPO / "pipelines" / "piloted_pipeline.yaml"
    assert list(yaml.safe_load_all(committed.read_text()))[0] == spec, (
        "pipelines/piloted_pipeline.yaml is stale: run `feedback-synth compile --pipeline piloted --output "
        "pipelines/piloted_pipeline.yaml`")
    tasks = _tasks(spec)
    (condition,) = [t for t in tasks.values() if "condition" in t.get("triggerPolicy", {})]
    assert condition["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--pilot-choose-Output'] == true"  # go
    inside = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inside) == {"pilot-config", "feedback-synth"}  # the chosen config, then the whole run, nested
    assert inside["pilot-config"]["inputs"]["artifacts"]["chosen"] == {
        "componentInputArtifact": "pipelinechannel--pilot-choose-chosen"}  # pilot_choose's chosen.yaml
    assert inside["feedback-synth"]["componentRef"]["name"] == "comp-feedback-synth"
    assert inside["feedback-synth"]["inputs"]["parameters"]["config"] == {
        "taskOutputParameter": {"outputParameterKey": "Output", "producerTask": "pilot-config"}}


@pytest.mark.slow
def test_the_piloted_pipeline_through_the_kfp_local_runner(tmp_path, tiny_generator, kfp_workspace):
    """The piloted pipeline through the real KFP local runner (warm tasks), at test size: the pilot
    (one setting, two folds) says go, then every stage of the run runs, with the pilot's choice in
    place of the user's config (criterion none over the preset's entropy)."""
    from dataclasses import asdict

    import kfp.local

    from feedback_synth import storage
    from feedback_synth.config import resolve_run_config
    from feedback_synth.orchestration.stage_table import STAGES
    from feedback_synth.tracking.client import scoped_environ
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import PipelineSettings
    from feedback_synth_kfp.pipelines.pilot_pipeline import PilotSettings, build_piloted_pipeline
    from feedback_synth_kfp.task_server import warm_tasks

    cfg = resolve_run_config("digits-lt", None, [
        "train.model=test_resnet", "feedback.budget_fraction=0.1", "feedback.shard_size=64",
        "generate.num_inference_steps=2", f"generate.generator={tiny_generator}", "filter.filters=[degenerate]",
        "train.epochs=2", "retrain.epochs=2", "tracking.enabled=false"])
    assert cfg.generate.criterion == "entropy"  # the user's; the pilot's grid offers only none
    pipeline = build_piloted_pipeline(PilotSettings(pipeline=PipelineSettings(gpu_retries=0, exit_handler=False),
                                                    parallelism=1, exit_handler=False))
    with warm_tasks() as warm, scoped_environ(warm):
        kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
                       workspace_root=kfp_workspace,
                       raise_on_error=True)
        pipeline(pilot_output=str(tmp_path / "pilot"), dataset="digits-lt", folds=2, epochs=2, device="cpu",
                 grid=json.dumps({"generate.criterion": ["none"]}),
                 config=json.dumps({k: v for k, v in asdict(cfg).items() if k != "device"}))
    report = storage.read_json(str(tmp_path / "pilot" / "tune_report.json"))
    assert report["beats_no_synthesis"] and report["chosen"] == "criterion=none", report["rows"]
    (root,) = (tmp_path / "kfp").iterdir()
    ran = {p.name for p in root.iterdir()}
    assert {"pilot-prepare", "pilot-cells", "pilot-choose", "pilot-config"} <= ran
    assert {s.component_name.replace("_", "-") for s in STAGES if not s.sharded} <= ran  # every stage of the run
    (tracking,) = json.loads((root / "start-tracking-2" / "executor_output.json").read_text())["artifacts"][
        "tracking"]["artifacts"]
    run_config = json.loads(tracking["metadata"]["config"])  # what the run's stages read
    assert run_config["generate"]["criterion"] == "none" and run_config["train"]["epochs"] == 2
    evaluation = next(root.glob("evaluate/evaluation"))
    assert "delta" in storage.read_json(str(evaluation / "report.json"))


def test_a_malformed_grid_parameter_is_named():
    from feedback_synth.errors import ConfigError
    from feedback_synth_kfp.pilot import cells_of, grid_of

    with pytest.raises(ConfigError, match="pilot parameter grid: not JSON"):
        grid_of("adapt.method=none")
    with pytest.raises(ConfigError, match="a JSON object of lists"):
        grid_of('{"adapt.method": "none"}')
    cells = cells_of('{"adapt.method": ["none", "full"], "generate.criterion": ["none"]}', 2)
    assert [c["fold"] for c in cells] == [0, 0, 1, 1]
    assert cells[1]["setting"] == [["adapt.method", "full"], ["generate.criterion", "none"]]  # in the grid's order


@pytest.mark.slow
def test_the_pilot_through_the_kfp_local_runner_and_in_process_alike(tmp_path, tiny_generator, capsys):
    """``tune --runner kfp-local``: every pilot task in its own process, one nested MLflow run per
    cell under the pilot's parent run, the verdict written; each setting's gain is the mean of its
    paired differences per fold. Then ``tune`` in process into the same folder: every stage
    resumes (no model is trained again) and the verdict is the same. Last, ``run --pilot`` into the
    folder that holds it: the pilot resumes, and the run goes with its choice (or stops on no-go)."""
    import mlflow

    from feedback_synth import storage
    from feedback_synth.cli.main import main
    from feedback_synth.config import load_run_config
    from feedback_synth.orchestration.tune import NO_SYNTHESIS

    out = tmp_path / "run" / "pilot"  # where run --pilot keeps its pilot
    sets = ["train.model=test_resnet", "feedback.budget_fraction=0.1", "feedback.shard_size=64",
            "generate.num_inference_steps=2", f"generate.generator={tiny_generator}", "filter.filters=[degenerate]"]
    # one setting on two folds: both fan-outs with two items each (the choice among settings:
    # test_tune.py); each task is a process, so every one counts in the suite's time
    args = ["tune", "--output", str(out), "--epochs", "2", "--folds", "2", "--grid", "generate.criterion=entropy"]
    for s in sets:
        args += ["--set", s]
    assert main(args + ["--runner", "kfp-local"]) == 0
    printed = capsys.readouterr().out
    report = storage.read_json(str(out / "tune_report.json"))
    assert [r["setting"] for r in report["rows"]] == [NO_SYNTHESIS, "criterion=entropy"]
    for row in report["rows"][1:]:
        criterion = row["setting"].split("=")[1]
        cells = [json.loads((out / "folds" / f"fold-{k}" / "settings" / f"generate.criterion{criterion}" / "score.json")
                            .read_text()) for k in (0, 1)]
        assert row["gain_per_fold"] == pytest.approx([c["synthesis"]["few"] - c["no_synthesis"]["few"] for c in cells])
        assert row["go"] == (row["gain_lo"] > 0)
    assert ("go: " if report["beats_no_synthesis"] else "no-go: ") in printed
    assert "| setting (validation, 2 folds, 2 epochs) |" in (out / "validation_table.md").read_text()
    chosen = storage.read_yaml(str(out / "chosen.yaml"))
    assert chosen["train"]["epochs"] == load_run_config().train.epochs  # the full run's epochs, not the pilot's

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    assert children == ["fold_0/criterion=entropy", "fold_1/criterion=entropy"]
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.metrics["go"] == float(report["beats_no_synthesis"])
    assert "validation_table.md" in [a.path for a in client.list_artifacts(parent.info.run_id)]

    models = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    assert len(models) >= 4  # 2 fold baselines, 2 retrained models (and the class statistics)
    assert main(args + ["--set", "tracking.enabled=false"]) == 0  # in process, into the same folder
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == models
    assert storage.read_json(str(out / "tune_report.json"))["rows"] == report["rows"]

    capsys.readouterr()
    run_args = ["run", "--output", str(tmp_path / "run"), "--pilot", "--pilot-epochs", "2", "--pilot-folds", "2",
                "--pilot-grid", "generate.criterion=entropy", "--set", "tracking.enabled=false",
                "--set", "train.epochs=2", "--set", "retrain.epochs=2"]
    for s in sets:
        run_args += ["--set", s]
    assert main(run_args) == 0
    printed = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == models  # the pilot resumed
    if report["beats_no_synthesis"]:  # the verdict of the pilot above, either way (choose_setting's tests fix both)
        chosen_criterion = report["chosen"].split("=")[1]
        assert "go: running with the pilot's choice" in printed
        assert storage.read_yaml(str(tmp_path / "run" / "config.yaml"))["generate"]["criterion"] == chosen_criterion
        assert (tmp_path / "run" / "report" / "run_summary.json").is_file()
    else:
        assert "no-go: the run was not started" in printed and not (tmp_path / "run" / "report").exists()
