"""``feedback-synth compile`` and ``feedback-synth submit``: the KFP pipeline to a file, or to a cluster.

    feedback-synth compile --output pipeline.yaml [--parallelism N]
    feedback-synth submit --host URL [--namespace NS] [--experiment NAME]
                          [--dataset D] [--config FILE] [--set section.key=value ...]
                          [--run-name NAME | --run-name-prefix P] [--param key=value ...]
                          [--package FILE] [--recurring CRON --job-name NAME]

``submit`` resolves the run configuration as ``run`` does (the dataset's preset, ``--config``,
``--set``) and sends what differs from the pipeline's defaults as pipeline parameters, so a
submitted run means the same as a local one; ``--param`` (infrastructure, or any parameter) wins
over it. It compiles the built-in pipeline unless ``--package`` names a compiled one, checks every
``--param`` against the pipeline's parameters (and converts it to the parameter's type), checks
that the KFP API answers (bounded by ``--timeout``), then creates a run, or with ``--recurring``
a recurring run, through ``kfp.Client``. In a pod with ``KF_PIPELINES_SA_TOKEN_PATH`` set,
kfp.Client authenticates with that ServiceAccount token.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Any, Optional

import yaml

from feedback_synth.errors import ConfigError, FeedbackSynthError


class SubmitError(FeedbackSynthError, RuntimeError):
    """The KFP API could not be reached or refused the request."""


DEFAULT_EXPERIMENT = "feedback-synth"

HEALTHZ = "/apis/v2beta1/healthz"


def _settings(args) -> Any:
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import PipelineSettings

    kwargs = {k: v for k, v in (("parallelism", args.parallelism), ("gpu_type", args.gpu_type),
                                ("gpu_retries", args.gpu_retries), ("rounds", getattr(args, "rounds", None)))
              if v is not None}
    try:
        return PipelineSettings(**kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def compile_to(path: str, args: Optional[argparse.Namespace] = None, rounds: Optional[int] = None) -> str:
    """Compile the built-in pipeline (compile-time settings from ``args``, or ``rounds``) to ``path``."""
    from dataclasses import replace

    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import PipelineSettings, compile_pipeline

    settings = _settings(args) if args is not None else PipelineSettings()
    if rounds is not None:
        settings = replace(settings, rounds=rounds)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"--output: folder {folder} does not exist")
    which = getattr(args, "pipeline", "run") if args is not None else "run"
    if which in ("pilot", "piloted"):
        from feedback_synth_kfp.pipelines.pilot_pipeline import PilotSettings, compile_pilot

        return compile_pilot(path, PilotSettings(pipeline=settings, parallelism=settings.parallelism),
                             then_run=which == "piloted")
    return compile_pipeline(path, settings)


def pipeline_parameters(package_path: str) -> dict[str, dict[str, Any]]:
    """The root parameters of a compiled pipeline: name -> {type, default}."""
    try:
        with open(package_path) as f:
            spec = next(yaml.safe_load_all(f))
    except FileNotFoundError:
        raise ConfigError(f"--package: file not found: {package_path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--package {package_path} is not a compiled pipeline (YAML error: {exc})") from None
    try:
        params = spec["root"]["inputDefinitions"]["parameters"]
    except (KeyError, TypeError):
        raise ConfigError(f"--package {package_path} is not a compiled KFP pipeline (no root.inputDefinitions)") from None
    return {k: {"type": v.get("parameterType"), "default": v.get("defaultValue")} for k, v in params.items()}


def _convert(key: str, raw: str, ptype: str) -> Any:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"--param {key}={raw}: expected {what} (pipeline parameter type {ptype})")

    if ptype == "STRING":
        return raw
    if ptype == "NUMBER_INTEGER":
        try:
            return int(raw)
        except ValueError:
            raise bad("an integer") from None
    if ptype == "NUMBER_DOUBLE":
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if ptype == "BOOLEAN":
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise bad("true or false")
    if ptype in ("STRUCT", "LIST"):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise bad("JSON") from None
        if not isinstance(value, dict if ptype == "STRUCT" else list):
            raise bad("a JSON object" if ptype == "STRUCT" else "a JSON list")
        return value
    return raw


def parse_params(pairs: list[str], params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``--param key=value`` pairs, checked against the pipeline's parameters and typed."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--param expects key=value, got '{pair}'")
        if key not in params:
            raise ConfigError(f"--param {key}: the pipeline has no such parameter; it has: {', '.join(sorted(params))}")
        out[key] = _convert(key, raw, params[key]["type"])
    return out


# where the cluster, not the run configuration, decides: the chart passes these with --param
_INFRASTRUCTURE = ("workspace_url", "mlflow_tracking_uri")


def config_parameters(cfg, params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The pipeline parameters that carry ``cfg`` (a ``RunConfig``), less those equal to the
    pipeline's defaults and the infrastructure ones."""
    from feedback_synth_kfp.parameters import CONFIG_PARAMETER, pipeline_arguments

    out = {}
    for key, value in pipeline_arguments(cfg).items():
        if key in _INFRASTRUCTURE or key not in params:
            continue
        default = params[key]["default"]
        if key == CONFIG_PARAMETER:
            sections = json.loads(value)
            if sections != json.loads(default or "{}"):
                out[key] = json.dumps(sections, sort_keys=True)
        elif value != default:
            out[key] = value
    return out


def merge_parameters(derived: dict[str, Any], explicit: dict[str, Any]) -> dict[str, Any]:
    """``explicit`` (--param) over ``derived``; a ``config`` JSON object is merged section by section."""
    from feedback_synth.config import deep_merge
    from feedback_synth_kfp.parameters import CONFIG_PARAMETER, parse_config_parameter

    out = dict(derived)
    for key, value in explicit.items():
        if key == CONFIG_PARAMETER and key in out:
            value = json.dumps(deep_merge(json.loads(out[key]), parse_config_parameter(value)), sort_keys=True)
        out[key] = value
    return out


def cron_expression(cron: str) -> str:
    """KFP's cron has 6 fields (seconds first); a 5-field crontab line gets '0' seconds."""
    fields = cron.split()
    if len(fields) == 5:
        return "0 " + " ".join(fields)
    if len(fields) == 6:
        return " ".join(fields)
    raise ConfigError(f"--recurring '{cron}': expected a cron expression of 5 fields (minute hour day month "
                      f"weekday) or 6 (seconds first, as KFP takes it)")


def check_endpoint(host: str, timeout_s: float) -> None:
    """Fail fast, with a clear message, when nothing answers at ``host`` (any HTTP answer will do:
    behind an auth proxy, healthz may answer 302 or 401 and kfp.Client then authenticates)."""
    import requests

    if not host.startswith(("http://", "https://")):
        raise ConfigError(f"--host {host}: expected an http:// or https:// URL of the KFP API "
                          f"(e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888)")
    url = host.rstrip("/") + HEALTHZ
    t0 = time.monotonic()
    try:
        requests.get(url, timeout=timeout_s, allow_redirects=False)
    except requests.RequestException as exc:
        if isinstance(exc, requests.Timeout):
            reason = f"no answer within {timeout_s:g} s"
        else:
            m = re.search(r"\[Errno -?\d+\] [^'\")]+", str(exc))
            reason = m.group(0) if m else type(exc).__name__
        raise SubmitError(f"cannot reach the Kubeflow Pipelines API at {host} ({reason}; gave up after "
                          f"{time.monotonic() - t0:.1f} s). Check --host (in-cluster: "
                          f"http://ml-pipeline.<kfp namespace>.svc.cluster.local:8888; from a laptop: "
                          f"kubectl port-forward svc/ml-pipeline -n kubeflow 8888) and that the API is up") from None


def _api_error(what: str, exc: Exception) -> SubmitError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None) or type(exc).__name__
    body = (getattr(exc, "body", None) or str(exc) or "")
    body = body.decode() if isinstance(body, bytes) else str(body)
    hint = ""
    if status in (401, 403):
        hint = (" (authentication: in a pod set KF_PIPELINES_SA_TOKEN_PATH to a token with audience "
                "pipelines.kubeflow.org, and check the ServiceAccount's rights in the namespace)")
    return SubmitError(f"KFP refused to {what}: {status or ''} {reason}: {body.strip()[:300]}{hint}")


def submit(host: str, package_path: str, params: dict[str, Any], namespace: Optional[str] = None,
           experiment: str = DEFAULT_EXPERIMENT, run_name: Optional[str] = None,
           recurring: Optional[str] = None, job_name: Optional[str] = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """Create a run (or a recurring run) of ``package_path``; returns what was created."""
    import warnings

    check_endpoint(host, timeout_s)
    import kfp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "This client only works with KFP v2.0.0-beta.2 and later"
        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow")
        except Exception as exc:  # noqa: BLE001 - healthz / auth failures of the constructor
            raise _api_error("open a session", exc) from None
    try:
        if recurring:
            exp = client.create_experiment(experiment, namespace=namespace)
            job = client.create_recurring_run(experiment_id=exp.experiment_id, job_name=job_name,
                                              cron_expression=cron_expression(recurring),
                                              pipeline_package_path=package_path, params=params,
                                              max_concurrency=1, no_catchup=True, enabled=True)
            rid = getattr(job, "recurring_run_id", None) or getattr(job, "id", None)
            return {"recurring_run_id": rid, "job_name": job_name, "cron": cron_expression(recurring),
                    "experiment": experiment, "url": f"{host.rstrip('/')}/#/recurringruns/details/{rid}"}
        result = client.create_run_from_pipeline_package(package_path, arguments=params, run_name=run_name,
                                                         experiment_name=experiment, namespace=namespace)
    except FeedbackSynthError:
        raise
    except Exception as exc:  # noqa: BLE001 - kfp_server_api.ApiException, urllib3 errors
        raise _api_error("create the recurring run" if recurring else "create the run", exc) from None
    return {"run_id": result.run_id, "run_name": run_name, "experiment": experiment,
            "url": f"{host.rstrip('/')}/#/runs/details/{result.run_id}"}
