"""The whole pipeline at reduced size, through the command line, and its bad-input behaviour."""
from __future__ import annotations

import json
import os

import pytest

from feedback_synth import storage
from feedback_synth.cli.main import main

REDUCED = ["train.model=test_resnet", "train.epochs=2", "retrain.epochs=2", "feedback.budget_fraction=0.1",
           "feedback.shard_size=16",
           "generate.num_inference_steps=4", "generate.guide_every=2", "tracking.enabled=false"]


def _sets(extra=()):
    out = []
    for s in [*REDUCED, *extra]:
        out += ["--set", s]
    return out


@pytest.mark.slow
def test_run_end_to_end_on_gcs(gcs_bucket, tiny_generator, capsys):
    """digits-lt, every stage, all outputs on gs:// (the local Cloud Storage emulator)."""
    out = gcs_bucket + "/runs/r1"
    rc = main(["run", "--dataset", "digits-lt", "--output", out, *_sets([f"generate.generator={tiny_generator}",
                                                                         "generate.criterion=hardness"])])
    assert rc == 0
    printed = capsys.readouterr().out
    for text in ("| no synthesis (logit_adjusted, ", ": the same steps) |", "| with synthesis (logit_adjusted) |",
                 "| difference |", "synthetic images:", "per-class accuracy", out):
        assert text in printed
    for rel in ("config.yaml", "baseline/model/model.safetensors", "baseline/model/config.json", "baseline/history.json",
                "feedback/plan.json", "feedback/class_stats.safetensors", "generated/shards/shard-00000/_SUCCESS",
                "filtered/synthetic.npz", "filtered/filter_report.json", "filtered/samples.png",
                "retrained/model/model.safetensors", "report/report.md", "report/per_class_accuracy.png",
                "report/run_summary.json"):
        assert storage.exists(storage.join(out, rel)), rel
    summary = storage.read_json(storage.join(out, "report/run_summary.json"))
    assert summary["generated"] == 47 and 0 <= summary["kept"] <= 47
    assert set(summary["no_synthesis"]) >= {"overall", "many", "medium", "few", "worst_class"}
    # the reference without synthesis trains with the retraining's optimiser steps: more than its 2 epochs
    assert summary["no_synthesis_training"]["steps"] == "same" and summary["no_synthesis_training"]["epochs"] > 2
    assert summary["no_synthesis_source"] == "reference"
    assert 0 <= summary["fidelity"] <= 1  # digits-lt has an oracle split: fidelity is measured
    history = storage.read_json(storage.join(out, "baseline/history.json"))
    assert [h["epoch"] for h in history] == [1, 2] and "val_accuracy" in history[0]
    assert storage.read_yaml(storage.join(out, "config.yaml"))["generate"]["criterion"] == "hardness"


@pytest.mark.slow
def test_each_stage_verb_runs_alone(tmp_path, tiny_generator):
    """The per-stage verbs chain like the KFP components do."""
    d, b, f, g, fl, r, e = (str(tmp_path / n) for n in ("data", "base", "fb", "gen", "flt", "ret", "eval"))
    # every class's synthetic images off the support named: in the filter report and the evaluation's
    s = _sets([f"generate.generator={tiny_generator}", "filter.gap_share=0.0"])
    assert main(["prepare-data", "--dataset", "digits-lt", "--output", d]) == 0
    assert main(["train-baseline", "--data", d, "--output", b, *s]) == 0
    m = b + "/model"
    assert main(["extract-feedback", "--data", d, "--model", m, "--output", f, *s]) == 0
    assert main(["generate", "--data", d, "--model", m, "--feedback", f, "--output", g, "--shard", "0", *s]) == 0
    assert os.path.exists(g + "/shards/shard-00000/_SUCCESS") and not os.path.exists(g + "/shards/shard-00001")
    assert main(["generate", "--data", d, "--model", m, "--feedback", f, "--output", g, *s]) == 0
    assert main(["filter", "--data", d, "--model", m, "--feedback", f, "--generated", g, "--output", fl, *s]) == 0
    assert main(["retrain", "--data", d, "--model", m, "--filtered", fl, "--output", r, *s]) == 0
    assert main(["evaluate", "--data", d, "--baseline", b, "--retrained", r, "--filtered", fl, "--output", e, *s]) == 0
    report, filtered = json.loads(open(e + "/report.json").read()), json.loads(open(fl + "/filter_report.json").read())
    assert report["kept"] == filtered["kept"]
    assert report["off_support_classes"] == filtered["off_support_classes"] != []
    assert "warning: off the task's support: " in open(e + "/report.md").read()
    assert storage.resolve(fl, filtered["plan_path"]) == f + "/plan.json"  # beside its absolute URL


@pytest.mark.parametrize("args, message", [
    (["--set", "generate.criterion=confidence"], "unknown criterion 'confidence'"),
    (["--set", "filter.filters=[degenerate,sharpness]"], "unknown filter 'sharpness'"),
    (["--set", "train.epochs=-1"], "'train.epochs': input should be greater than or equal to 1, got -1"),
    (["--set", "generate.scale=high"], "'generate.scale': input should be a valid number, got 'high'"),
    (["--dataset", "memory://no/such/dataset"], "dataset not found: memory://no/such/dataset"),
    (["--set", "generate.generator=/no/such/model"], "generator model folder not found: /no/such/model"),
    (["--set", "train.model=resnet_nope"], "unknown timm model 'resnet_nope'"),
])
def test_bad_input_stops_early_with_a_clear_message(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    rc = main(["run", "--output", str(out), *args, "--set", "tracking.enabled=false"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    # nothing long ran and nothing half-written is left: at most the resolved config
    leftovers = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.exists() else []
    assert all(p == "config.yaml" or p.startswith("data/") for p in leftovers), leftovers
    assert not any(p.startswith(("baseline/", "generated/")) for p in leftovers)
