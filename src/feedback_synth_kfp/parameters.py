"""The pipeline parameters that carry a run configuration, both ways.

A few fields are parameters of their own (``dataset``, ``criterion``, ...: what a user changes most
in the KFP UI, ``NAMED_PARAMETERS``); every other field travels in one JSON object parameter,
``config``: ``{"<section>": {"<field>": value}}``, only what differs from the defaults. The run's
configuration is the dataset's preset (as ``feedback-synth run`` applies it: a run started from the
KFP UI gets it too), then ``config``, then the named parameters that differ from their defaults
(which are the library's, ``named_defaults``: not hand-written copies). ``start_tracking`` resolves them once into the run's ``RunConfig``,
which then travels to every task as one value (the metadata of its ``tracking`` artifact:
``feedback_synth_kfp.tracking.run_config``), so that no component rebuilds it from parameters.
``pipeline_arguments(cfg)`` turns a RunConfig into parameters and ``run_config_from_parameters``
turns them back, with the same checks and messages as a config file.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from feedback_synth.config import RunConfig, deep_merge, from_dict
from feedback_synth.errors import ConfigError

# RunConfig section -> {config field: pipeline parameter}
NAMED_PARAMETERS: dict[str, dict[str, str]] = {
    "data": {"dataset": "dataset"},
    "train": {"model": "classifier_model"},
    "adapt": {"method": "adapt_method"},
    "feedback": {"budget_fraction": "budget_fraction", "shard_size": "shard_size"},
    "generate": {"generator": "generator", "criterion": "criterion", "scale": "scale", "guide_every": "guide_every"},
    "tracking": {"experiment": "mlflow_experiment", "registered_model": "registered_model"},
    "promote": {"gate_metric": "gate_metric", "min_gain": "min_gain", "max_overall_drop": "max_overall_drop"},
}
# run-wide fields (not sections) that are named parameters: the one device setting, resolved by each
# task on its own pod (auto: CUDA where the pod has it)
RUN_PARAMETERS: dict[str, str] = {"device": "device"}
CONFIG_PARAMETER = "config"
# run settings that are not part of the config: where the cluster, not the run, decides
_NOT_CONFIG = {("tracking", "tracking_uri")}


def named_defaults() -> dict[str, Any]:
    """The named parameters' defaults: the library's defaults (``RunConfig()``), from the config code.
    A named parameter left at its default does not override the dataset's preset."""
    cfg = RunConfig()
    out = {param: getattr(getattr(cfg, section), field) for section, named in NAMED_PARAMETERS.items()
           for field, param in named.items()}
    out.update({param: getattr(cfg, field) for field, param in RUN_PARAMETERS.items()})
    return out


def pipeline_arguments(cfg: RunConfig, mlflow_tracking_uri: str = "", workspace_url: str = "") -> dict[str, Any]:
    """The pipeline parameters that reproduce ``cfg`` exactly: the named ones, and ``config`` with
    every other field that differs from what the named ones and the dataset's preset make."""
    args: dict[str, Any] = {"workspace_url": workspace_url, "mlflow_tracking_uri": mlflow_tracking_uri}
    for section, named in NAMED_PARAMETERS.items():
        for field, param in named.items():
            args.setdefault(param, getattr(getattr(cfg, section), field))
    for field, param in RUN_PARAMETERS.items():
        args[param] = getattr(cfg, field)
    reference = run_config_from_parameters({k: v for k, v in args.items() if k != "mlflow_tracking_uri"})
    rest: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(cfg):
        if f.name in RUN_PARAMETERS:
            continue
        value, ref = getattr(cfg, f.name), getattr(reference, f.name)
        changed = {k.name: getattr(value, k.name) for k in dataclasses.fields(value)
                   if (f.name, k.name) not in _NOT_CONFIG and getattr(value, k.name) != getattr(ref, k.name)}
        if changed:
            rest[f.name] = changed
    args[CONFIG_PARAMETER] = json.dumps(rest, sort_keys=True)
    return args


def parse_config_parameter(config: str) -> dict[str, Any]:
    """The ``config`` parameter: a JSON object of sections ('' or '{}': none)."""
    if not config or not config.strip():
        return {}
    try:
        value = json.loads(config)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"pipeline parameter 'config': not valid JSON ({exc}): {config[:200]!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"pipeline parameter 'config': expected a JSON object of sections "
                          f"({', '.join(f.name for f in dataclasses.fields(RunConfig))}), got {type(value).__name__}")
    return value


def run_config_from_parameters(params: dict[str, Any]) -> RunConfig:
    """The RunConfig that pipeline parameters ``params`` stand for (the inverse of
    ``pipeline_arguments``), checked: the dataset's preset (as ``feedback-synth run`` applies it, so
    that a run started from the KFP UI means what it means on a laptop) < ``config`` < the named
    parameters that differ from their defaults (``named_defaults``)."""
    from feedback_synth.config import preset

    sections = parse_config_parameter(params.get(CONFIG_PARAMETER, ""))
    defaults = named_defaults()
    dataset = params.get("dataset") or (sections.get("data") or {}).get("dataset")
    sections = deep_merge(preset(dataset), sections)
    named_values: dict[str, dict[str, Any]] = {}
    for section, named in NAMED_PARAMETERS.items():
        values = {field: params[param] for field, param in named.items()
                  if param in params and (params[param] != defaults[param] or param == "dataset")}
        if values:
            named_values[section] = values
    sections = deep_merge(sections, named_values)
    sections.update({field: params[param] for field, param in RUN_PARAMETERS.items()
                     if param in params and params[param] != defaults[param]})
    if params.get("mlflow_tracking_uri"):
        sections = deep_merge(sections, {"tracking": {"tracking_uri": params["mlflow_tracking_uri"]}})
    return from_dict(RunConfig, sections)


def config_from_dict(config: dict[str, Any]) -> RunConfig:
    """A RunConfig from its ``asdict`` form (what travels in the tracking artifact), checked."""
    return from_dict(RunConfig, config)
