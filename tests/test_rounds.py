"""Feedback in rounds: the plan of each round, a reduced 2-round run in process and through the KFP
local runner, the compiled pipeline with R = 2, and resuming a run killed in round 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from feedback_synth import storage
from feedback_synth.config import FeedbackConfig, load_run_config
from feedback_synth.synthesis.plan import allocate, make_plan, round_budgets, smoothed_errors

REDUCED = ["train.model=test_resnet", "train.epochs=2", "retrain.epochs=2", "feedback.budget_fraction=0.1",
           "feedback.shard_size=8",
           "generate.num_inference_steps=4", "generate.guide_every=2", "feedback.rounds=2"]


# ------------------------------------------------------------------------------ the plan of a round


def test_round_budgets_share_the_one_shot_total():
    assert round_budgets(417, 3, "equal") == [139, 139, 139]
    assert round_budgets(10, 3, "equal") == [4, 3, 3]
    assert round_budgets(417, 3, "front_loaded") == [209, 139, 69]  # 3 : 2 : 1
    assert allocate(5, [1.0, 1.0, 2.0]) == [1, 1, 3] and allocate(0, [1.0]) == [0]


def test_one_round_is_the_reference_rule(digits):
    one = make_plan(digits["train"], FeedbackConfig())
    assert one.counts == {str(c): max(60 - n, 1) for c, n in enumerate([60, 41, 28, 19, 13, 9, 6, 4, 2, 2])}
    assert one.round == one.rounds == 1 and all(v == 0 for v in one.offsets.values())


def test_later_rounds_follow_the_latest_models_validation_mistakes(digits):
    cfg = FeedbackConfig(rounds=3)
    first = make_plan(digits["train"], cfg, 1)
    assert first.total == 139  # a third of the one-shot 417, in proportion to the reference rule
    # the latest model gets class 9 wrong 20 of 30 times on validation, class 8 never
    errors = {str(c): (0, 30) for c in range(10)}
    errors["9"], errors["8"] = (20, 30), (0, 30)
    second = make_plan(digits["train"], cfg, 2, errors, offsets=first.next_offsets())
    assert second.total == 139
    e = smoothed_errors(errors, [str(c) for c in range(10)])
    assert e["9"] == pytest.approx(21 / 32) and e["8"] == pytest.approx(1 / 32)
    assert second.weights["9"] == pytest.approx(58 * 21 / 32) and second.counts["9"] > 10 * second.counts["8"]
    # image indices continue where the cell's first round stopped: no seed repeats
    assert second.offsets["9"] == first.counts["9"]
    entries = [e for s in second.shards for e in s.entries if e.class_index == 9]
    assert entries[0].start == first.counts["9"]
    with pytest.raises(ValueError, match="round 4"):
        make_plan(digits["train"], cfg, 4)


# ------------------------------------------------------------------------------ the compiled pipeline


@pytest.mark.slow
def test_compiled_pipeline_unrolls_two_rounds(tmp_path):
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import PipelineSettings, compile_pipeline

    spec = next(yaml.safe_load_all(open(compile_pipeline(str(tmp_path / "p.yaml"), PipelineSettings(rounds=2)))))
    stages = spec["root"]["dag"]["tasks"]["exit-handler-1"]["componentRef"]["name"]
    dag = spec["components"][stages]["dag"]["tasks"]
    assert {"extract-feedback", "extract-feedback-2", "filter-synthetic", "filter-synthetic-2", "retrain",
            "retrain-2", "evaluate", "promote"} <= set(dag)
    loops = {name for name in dag if name.startswith("for-loop")}
    assert len(loops) == 2  # one ParallelFor of shards per round
    inputs = lambda task: dag[task]["inputs"]  # noqa: E731
    # round 2 takes its feedback from round 1's retrained model, and carries round 1's outputs on
    assert inputs("extract-feedback-2")["artifacts"]["latest"]["taskOutputArtifact"]["producerTask"] == "retrain"
    assert inputs("extract-feedback")["artifacts"]["latest"]["taskOutputArtifact"]["producerTask"] == "train-baseline"
    assert inputs("extract-feedback-2")["artifacts"]["previous_feedback"]["taskOutputArtifact"]["producerTask"] == \
        "extract-feedback"
    assert inputs("filter-synthetic-2")["artifacts"]["previous_filtered"]["taskOutputArtifact"]["producerTask"] == \
        "filter-synthetic"
    assert inputs("retrain-2")["artifacts"]["previous_retrained"]["taskOutputArtifact"]["producerTask"] == "retrain"
    assert inputs("retrain-2")["artifacts"]["baseline"]["taskOutputArtifact"]["producerTask"] == "train-baseline"
    assert inputs("evaluate")["artifacts"]["retrained"]["taskOutputArtifact"]["producerTask"] == "retrain-2"
    for task in ("extract-feedback", "extract-feedback-2"):
        assert inputs(task)["parameters"]["rounds"]["runtimeValue"]["constant"] == 2
    assert inputs("extract-feedback-2")["parameters"]["round_index"]["runtimeValue"]["constant"] == 2
    # the GPU request of the baseline, the adaptation and every round's shards and retraining
    gpu_tasks = [e for e in spec["deploymentSpec"]["executors"].values()
                 if e["container"].get("resources", {}).get("accelerator")]
    assert len(gpu_tasks) == 6


# ------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_two_rounds_in_process(tmp_path, tiny_generator):
    from mlflow import MlflowClient

    from feedback_synth.orchestration.run import run_pipeline

    cfg = load_run_config(overrides=[*REDUCED, f"generate.generator={tiny_generator}"])
    out = str(tmp_path / "run")
    report = run_pipeline(cfg, out)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][1]["num_synthetic"] >= report["rounds"][0]["num_synthetic"]  # kept so far grows
    plan1 = storage.read_json(f"{out}/rounds/round-1/feedback/plan.json")
    plan2 = storage.read_json(f"{out}/rounds/round-2/feedback/plan.json")
    assert plan1["round"] == 1 and plan2["round"] == 2 and plan2["offsets"] == {
        k: plan1["offsets"][k] + n for k, n in plan1["counts"].items()}
    assert os.path.exists(f"{out}/report/rounds.png") and "round 1" in open(f"{out}/report/report.md").read()
    uri = f"sqlite:///{out}/mlflow/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs[out.rsplit("/", 1)[-1]]
    for r in (1, 2):  # one run tree for both runners (orchestration.RunLayout): round_<r>/<stage>, under the parent
        for stage in ("extract_feedback", "generate", "filter", "retrain"):
            assert runs[f"round_{r}/{stage}"].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "test_few" in runs[f"round_{r}/retrain"].data.metrics
    history = client.get_metric_history(parent.info.run_id, "round_few")
    assert [m.step for m in history] == [1, 2]


@pytest.mark.slow
def test_a_run_killed_in_round_2_resumes_without_redoing_round_1(tmp_path, tiny_generator):
    """SIGKILL in round 2's generation, and the run folder moved before the re-run (synced to other
    storage): the re-run skips round 1 (its stage markers are untouched), finishes round 2 (whose
    retraining distils from round 1's reference model, found in the moved folder), and closes the
    dead process's MLflow runs KILLED."""
    import shutil

    from mlflow import MlflowClient

    out = tmp_path / "run"
    sets = [a for s in [*REDUCED, f"generate.generator={tiny_generator}", "feedback.budget_fraction=0.3",
                        "feedback.shard_size=4", "retrain.distill_weight=0.25"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "feedback_synth.cli", "run", "--output", str(out), *sets]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = out / "rounds" / "round-2" / "generated" / "shards" / "shard-00000" / "_SUCCESS"
    deadline = time.time() + 600
    while not shard.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert shard.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no round-2 shard"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    out, cmd = moved, [*cmd[:cmd.index("--output") + 1], str(moved), *sets]
    round1 = {p: json.loads(p.read_text())["finished"] for p in (out / "rounds" / "round-1").glob("*/_STAGE.json")}
    assert len(round1) == 3  # feedback, filtered, retrained (generation commits per shard)
    before = {p: p.stat().st_mtime for p in (out / "rounds" / "round-1" / "generated").rglob("_SUCCESS")}
    from feedback_synth.cli.main import main

    assert main(cmd[3:]) == 0  # the re-run, in this process (the kill above needed one of its own)
    assert {p: json.loads(p.read_text())["finished"] for p in round1} == round1  # round 1 not redone
    assert {p: p.stat().st_mtime for p in before} == before
    assert (out / "rounds" / "round-2" / "retrained" / "_STAGE.json").exists()
    reference = json.loads((out / "rounds" / "round-2" / "retrained" / "reference_metrics.json").read_text())
    assert (out / "rounds" / "round-2" / "retrained" / reference["model_path"] / "model.safetensors").is_file()
    client = MlflowClient(f"sqlite:///{out}/mlflow/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("feedback-synth").experiment_id])
    statuses = [r.info.status for r in runs]
    assert "RUNNING" not in statuses and "KILLED" in statuses
    assert sum(r.data.tags.get("feedback_synth.resumed") == "true" for r in runs) >= 3
