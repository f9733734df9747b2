"""Config: types, ranges, unknown names, and overrides; each error names its field."""
from __future__ import annotations

import pytest

from feedback_synth.config import GenerateConfig, RunConfig, load_run_config, parse_overrides
from feedback_synth.errors import ConfigError


def test_defaults_validate():
    RunConfig().validate()


def test_overrides_nest_and_parse_yaml():
    assert parse_overrides(["generate.scale=0.01", "train.augment=false", "filter.filters=[degenerate]"]) == {
        "generate": {"scale": 0.01}, "train": {"augment": False}, "filter": {"filters": ["degenerate"]}}


@pytest.mark.parametrize("override, message", [
    ("train.epochs=ten", "'train.epochs': expected an integer, got str 'ten'"),
    ("train.epochs=0", "'train.epochs': must be >= 1"),
    ("generate.scale=2.5", "'generate.scale': must be in [0, 1]"),
    ("generate.criterion=confidence", "'generate.criterion': unknown criterion 'confidence'"),
    ("filter.filters=[degenerate,blurry]", "'filter.filters': unknown filter 'blurry'"),
    ("feedback.budget_fraction=0", "'feedback.budget_fraction': must be in (0, 10]"),
    ("retrain.synthetic_fraction=1.0", "'retrain.synthetic_fraction': must be in [0, 1)"),
    ("train.augment=maybe", "'train.augment': expected true/false"),
    ("generate.colour=red", "unknown config field 'generate.colour'"),
    ("data.many_threshold=3", "'data.many_threshold': must exceed few_threshold"),
    ("promote.gate_metric=f1", "'promote.gate_metric': must be one of"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(overrides=[override])
    assert message in str(err.value)


def test_yaml_file_and_set_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("generate:\n  scale: 0.05\n  criterion: loss\ntrain:\n  epochs: 3\n")
    cfg = load_run_config(str(f), ["generate.scale=0.01"])
    assert cfg.generate.scale == 0.01 and cfg.generate.criterion == "loss" and cfg.train.epochs == 3


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not sections\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_run_config(str(bad))


def test_ints_are_accepted_for_floats():
    cfg = load_run_config(overrides=["generate.scale=0"])
    assert isinstance(cfg.generate.scale, float)
    GenerateConfig(scale=0).validate()
