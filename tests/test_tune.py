"""The pilot (feedback-synth tune): a small grid scored on the validation split, a chosen config."""
from __future__ import annotations

import pytest

from feedback_synth import storage
from feedback_synth.cli.main import main
from feedback_synth.config import load_run_config
from feedback_synth.errors import ConfigError
from feedback_synth.orchestration.tune import NO_SYNTHESIS, apply_setting, parse_grid, settings_of, validation_table


def test_the_grid_is_parsed_and_every_setting_is_checked():
    grid = parse_grid(["adapt.method=none,full", "generate.scale=0.01,0.03"])
    assert grid == {"adapt.method": ["none", "full"], "generate.scale": [0.01, 0.03]}
    assert len(settings_of(grid)) == 4
    cfg = apply_setting(load_run_config(), {"adapt.method": "full", "generate.scale": 0.03})
    assert cfg.adapt.method == "full" and cfg.generate.scale == 0.03
    with pytest.raises(ConfigError, match="'adapt.method'"):
        apply_setting(load_run_config(), {"adapt.method": "textual"})
    with pytest.raises(ConfigError, match="--grid expects section.field"):
        parse_grid(["scale=0.1"])


def test_the_table_says_plainly_when_nothing_beats_no_synthesis():
    rows = [{"setting": NO_SYNTHESIS, "overall": 0.9, "few": 0.8}, {"setting": "criterion=none", "overall": 0.85,
                                                                       "few": 0.7, "kept": 10}]
    text = validation_table({"rows": rows, "epochs": 5, "metric": "few", "chosen": NO_SYNTHESIS,
                             "beats_no_synthesis": False})
    assert "no setting beats no synthesis" in text and "do not spend the GPU budget" in text


@pytest.mark.slow
def test_tune_picks_a_setting_on_validation(tmp_path, tiny_generator, capsys):
    out = tmp_path / "tune"
    sets = ["train.model=test_resnet", "feedback.budget_fraction=0.1", "feedback.shard_size=64",
            "generate.num_inference_steps=2", f"generate.generator={tiny_generator}", "filter.filters=[degenerate]",
            "tracking.enabled=false", "adapt.steps=2", "adapt.batch_size=8", "adapt.samples_per_class=1"]
    args = ["tune", "--output", str(out), "--epochs", "2", "--grid", "adapt.method=none,full",
            "--grid", "generate.criterion=none"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report = storage.read_json(str(out / "tune_report.json"))
    assert [r["setting"] for r in report["rows"]] == [NO_SYNTHESIS, "method=none, criterion=none",
                                                      "method=full, criterion=none"]
    assert all(0 <= r["few"] <= 1 for r in report["rows"])
    best = max(report["rows"][1:], key=lambda r: (r["few"], r["overall"]))
    assert report["beats_no_synthesis"] == (best["few"] > report["rows"][0]["few"])
    chosen = storage.read_yaml(str(out / "chosen.yaml"))
    if report["beats_no_synthesis"]:
        method = dict(part.split("=") for part in best["setting"].split(", "))["method"]
        assert report["chosen"] == best["setting"] and chosen["adapt"]["method"] == method
    else:
        assert report["chosen"] == NO_SYNTHESIS and "no setting beats no synthesis" in printed
    assert chosen["train"]["epochs"] == load_run_config().train.epochs  # the full run's epochs, not the pilot's
    assert "| setting (validation, 2 epochs) |" in (out / "validation_table.md").read_text()


def test_the_choice_goes_to_the_best_setting_only_when_it_beats_no_synthesis():
    """Both outcomes of the pilot's choice, on rows whose answer is known."""
    from feedback_synth.orchestration.tune import choose

    rows = [{"setting": NO_SYNTHESIS, "few": 0.5, "overall": 0.8},
            {"setting": "a", "few": 0.6, "overall": 0.7}, {"setting": "b", "few": 0.6, "overall": 0.75},
            {"setting": "c", "few": 0.4, "overall": 0.9}]
    best, beats = choose(rows, "few")
    assert best["setting"] == "b" and beats  # ties on few go to overall
    rows[0]["few"] = 0.6  # a tie with no synthesis is not a gain
    assert choose(rows, "few") == (rows[2], False)
    assert choose(rows, "overall")[0]["setting"] == "c" and choose(rows, "overall")[1]
