"""The pilot (feedback-synth tune): a small grid scored on the validation split, a chosen config."""
from __future__ import annotations

import pytest

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


def _cells(gains: dict[str, list[float]], base: float = 0.5) -> list[dict]:
    """Pilot cells whose few-shot gain per fold is known."""
    return [{"setting": name, "fold": k, "kept": 10, "synthesis": {"few": base + g, "overall": 0.8 + g / 2},
             "no_synthesis": {"few": base, "overall": 0.8}} for name, per_fold in gains.items()
            for k, g in enumerate(per_fold)]


GRID = {"adapt.method": ["none", "full"]}


def test_go_only_when_the_gain_has_a_ci_above_zero_over_the_folds():
    """The pilot's rule on cells whose answer is known: a setting that wins on every fold goes; one
    with a larger mean gain that loses on a fold does not (its CI reaches below zero)."""
    from feedback_synth.orchestration.tune import choose_setting

    cfg = load_run_config()  # gate metric: few
    report = choose_setting(cfg, GRID, _cells({"method=none": [0.02, 0.03, 0.01],
                                               "method=full": [0.20, 0.15, -0.01]}), epochs=2, folds=3)
    rows = {r["setting"]: r for r in report["rows"]}
    assert rows["method=none"]["go"] and rows["method=none"]["gain_lo"] > 0
    assert not rows["method=full"]["go"] and rows["method=full"]["gain"] > rows["method=none"]["gain"]
    assert rows["method=full"]["gain_lo"] < 0 < rows["method=full"]["gain_hi"]
    assert report["chosen"] == "method=none" and report["beats_no_synthesis"]
    assert report["config"]["adapt"]["method"] == "none"
    assert rows["method=none"]["gain"] == pytest.approx(0.02)
    # among the settings that go, the largest mean gain
    report = choose_setting(cfg, GRID, _cells({"method=none": [0.02, 0.03, 0.01],
                                               "method=full": [0.05, 0.04, 0.06]}), epochs=2, folds=3)
    assert report["chosen"] == "method=full" and report["config"]["adapt"]["method"] == "full"


def test_no_go_keeps_the_users_config_and_says_so():
    from feedback_synth.orchestration.tune import choose_setting

    cfg = load_run_config(overrides=["adapt.method=full"])
    report = choose_setting(cfg, GRID, _cells({"method=none": [0.0, 0.0, 0.0], "method=full": [-0.02, 0.03, -0.01]}),
                            epochs=2, folds=3)
    assert not report["beats_no_synthesis"] and report["chosen"] == NO_SYNTHESIS
    assert report["config"]["adapt"]["method"] == "full"  # the user's own config, unchanged
    text = validation_table(report)
    assert "no-go" in text and "do not spend the GPU budget" in text and "3 folds" in text
    with pytest.raises(ConfigError, match="2 of 3 folds for 'method=none'"):
        choose_setting(cfg, GRID, [c for c in _cells({"method=none": [0.1, 0.1, 0.1], "method=full": [0, 0, 0]})
                                   if c["fold"] != 2 or c["setting"] != "method=none"], epochs=2, folds=3)


def test_folds_keep_the_shape_of_the_split_and_never_read_test(prepared, tmp_path):
    """Every fold has the prepared split's counts per class, a validation part drawn from train +
    val (disjoint from its train), and the same images for the same seed; fold 0 is the split."""
    import numpy as np

    from feedback_synth.data.folds import write_fold
    from feedback_synth.data.imageset import load_split

    train, val = load_split(prepared, "train"), load_split(prepared, "val")
    pool_ids = set(train.ids.tolist()) | set(val.ids.tolist())
    seen_val = []
    for k in range(3):
        url = str(tmp_path / f"fold-{k}")
        write_fold(prepared, url, k, seed=0)
        f_train, f_val, f_test = (load_split(url, s) for s in ("train", "val", "test"))
        assert f_train.class_counts().tolist() == train.class_counts().tolist()
        assert f_val.class_counts().tolist() == val.class_counts().tolist()
        assert not set(f_train.ids.tolist()) & set(f_val.ids.tolist())
        assert set(f_train.ids.tolist()) | set(f_val.ids.tolist()) == pool_ids  # never an image of the test split
        assert np.array_equal(f_test.images, f_val.images)
        seen_val.append(sorted(f_val.ids.tolist()))
    assert seen_val[0] == sorted(val.ids.tolist()) and seen_val[1] != seen_val[0] and seen_val[2] != seen_val[1]
    write_fold(prepared, str(tmp_path / "again"), 1, seed=0)
    assert sorted(load_split(str(tmp_path / "again"), "val").ids.tolist()) == seen_val[1]


def test_the_table_says_plainly_when_nothing_beats_no_synthesis():
    rows = [{"setting": NO_SYNTHESIS, "overall": 0.9, "few": 0.8},
            {"setting": "criterion=none", "overall": 0.85, "few": 0.7, "kept": 10, "gain": -0.1, "gain_lo": -0.2,
             "gain_hi": 0.0, "go": False}]
    text = validation_table({"rows": rows, "epochs": 5, "folds": 3, "metric": "few", "chosen": NO_SYNTHESIS,
                             "beats_no_synthesis": False})
    assert "no-go" in text and "do not spend the GPU budget" in text
    assert "| criterion=none | 0.850 | 0.700 | 10 | -0.100 (-0.200 .. +0.000) | no |" in text


def test_settings_share_an_adaptation_only_when_it_is_the_same_one():
    """The pilot's adapted folder is one per distinct adaptation: settings that differ only in how
    they guide share it; a different SDEdit strength (it samples the before/after images, so it is
    part of the adaptation's fingerprint) or adaptation setting gets its own (the default grid's
    strength 0.8 and 1.0 once collided there and the second was refused)."""
    from feedback_synth.orchestration.tune import adapted_url

    cfg = load_run_config(overrides=["adapt.method=full"])
    base = adapted_url("memory://p", 0, cfg)
    assert adapted_url("memory://p", 0, apply_setting(cfg, {"generate.criterion": "none"})) == base
    assert adapted_url("memory://p", 0, apply_setting(cfg, {"generate.strength": 1.0})) != base
    assert adapted_url("memory://p", 0, apply_setting(cfg, {"adapt.steps": 7})) != base
    assert adapted_url("memory://p", 1, cfg) != base and "/folds/fold-0/adapted/full-" in base


@pytest.mark.parametrize("option, value, message", [("folds", "0", "folds must be at least 1, got 0"),
                                                     ("epochs", "-1", "epochs must be 0 (the run's epochs) or more"),
                                                     ("grid", "adapt.method=", "grid adapt.method=: no values")])
def test_bad_pilot_arguments_stop_before_any_work(tmp_path, capsys, option, value, message):
    """``tune --OPTION`` and ``run --pilot --pilot-OPTION`` name the bad option in one line and
    write nothing."""
    from feedback_synth.cli.main import main

    for verb, flag in (("tune", f"--{option}"), ("run", f"--pilot-{option}")):
        out = tmp_path / verb
        extra = ["--pilot"] if verb == "run" else []
        assert main([verb, *extra, "--output", str(out), "--set", "tracking.enabled=false", flag, value]) == 2
        assert f"{flag.rsplit(option, 1)[0]}{message}" in capsys.readouterr().err
        assert not out.exists()


def test_a_calibrated_cell_is_scored_cross_fitted(tmp_path):
    """A fold's validation split is its held-out part: a calibrated retraining chose its weight on the
    images it is scored on, so the pilot reads its cross-fitted scores; otherwise the test metrics."""
    from feedback_synth import storage
    from feedback_synth.orchestration.tune import _synthesis_scores

    folder = str(tmp_path / "retrained")
    storage.write_json(f"{folder}/metrics.json", {"overall": 0.9, "few": 0.8, "per_class": [1.0]})
    storage.write_json(f"{folder}/calibration.json", {"weight": None, "reason": "retrain.calibration is 'none'"})
    assert _synthesis_scores(folder) == {"overall": 0.9, "few": 0.8}
    storage.write_json(f"{folder}/calibration.json", {"weight": 0.3, "crossfit": {"overall": 0.85, "few": 0.7}})
    assert _synthesis_scores(folder) == {"overall": 0.85, "few": 0.7}
