"""The pipeline parameters that carry a run configuration, both ways.

A few fields are parameters of their own (``dataset``, ``criterion``, ...: what a user changes most
in the KFP UI); every other field of a section travels in that section's JSON object parameter
``<section>_overrides``. ``pipeline_arguments(cfg)`` turns a RunConfig into parameters, and
``section_config`` / ``run_config_from_parameters`` turn them back, with the same checks and
messages as a config file.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from feedback_synth.config import RunConfig, from_dict, stage_config
from feedback_synth.errors import ConfigError

# RunConfig section -> {config field: pipeline parameter}
NAMED_PARAMETERS: dict[str, dict[str, str]] = {
    "data": {"dataset": "dataset"},
    "train": {"model": "classifier_model"},
    "feedback": {"budget_fraction": "budget_fraction", "shard_size": "shard_size"},
    "generate": {"generator": "generator", "criterion": "criterion", "scale": "scale", "guide_every": "guide_every",
                 "device": "gpu_device"},
    "filter": {},
    "retrain": {"device": "gpu_device"},
    "promote": {"gate_metric": "gate_metric", "min_gain": "min_gain", "max_overall_drop": "max_overall_drop"},
}
TRACKING_PARAMETERS = {"experiment": "mlflow_experiment", "registered_model": "registered_model"}


def pipeline_arguments(cfg: RunConfig, mlflow_tracking_uri: str = "", workspace_url: str = "") -> dict[str, Any]:
    """The pipeline parameters that reproduce ``cfg`` exactly."""
    args: dict[str, Any] = {"workspace_url": workspace_url, "mlflow_tracking_uri": mlflow_tracking_uri,
                            "mlflow_experiment": cfg.tracking.experiment,
                            "registered_model": cfg.tracking.registered_model}
    for section, named in NAMED_PARAMETERS.items():
        for field, param in named.items():
            args.setdefault(param, getattr(getattr(cfg, section), field))  # gpu_device: generate's device
    for section, named in NAMED_PARAMETERS.items():
        value = getattr(cfg, section)
        defaults = type(value)()
        overrides = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                     if getattr(value, f.name) != (args[named[f.name]] if f.name in named else getattr(defaults, f.name))}
        args[f"{section}_overrides"] = json.dumps(overrides, sort_keys=True)
    return args


def parse_overrides(section: str, overrides: str) -> dict[str, Any]:
    """A ``<section>_overrides`` parameter: a JSON object of config fields ('' or '{}': none)."""
    if not overrides or not overrides.strip():
        return {}
    try:
        extra = json.loads(overrides)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"pipeline parameter '{section}_overrides': not valid JSON ({exc}): {overrides[:200]!r}") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"pipeline parameter '{section}_overrides': expected a JSON object of '{section}' fields, "
                          f"got {type(extra).__name__}")
    return extra


def section_config(section: str, overrides: str, **named: Any) -> Any:
    """One section's config (e.g. ``TrainConfig``) from its named parameters and its overrides
    (applied last), checked like a config file."""
    cls = type(getattr(RunConfig(), section))
    return stage_config(cls, {**named, **parse_overrides(section, overrides)})


def run_config_from_parameters(params: dict[str, Any]) -> RunConfig:
    """The RunConfig that pipeline parameters ``params`` stand for (the inverse of ``pipeline_arguments``)."""
    sections = {}
    for section, named in NAMED_PARAMETERS.items():
        values = {field: params[param] for field, param in named.items() if param in params}
        sections[section] = dataclasses.asdict(section_config(section, params.get(f"{section}_overrides", ""), **values))
    sections["tracking"] = {field: params[param] for field, param in TRACKING_PARAMETERS.items() if param in params}
    if params.get("mlflow_tracking_uri"):
        sections["tracking"]["tracking_uri"] = params["mlflow_tracking_uri"]
    return from_dict(RunConfig, sections)
