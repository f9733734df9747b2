"""What the KFP components share: where a stage writes, and what its artifacts record and show.

The components in ``components/`` call one stage function each; this module holds the plumbing
around that call, so that it is tested here and not copied into nine component bodies:

- ``stage_output_url``: a stage writes under ``<workspace_url>/<run id>/<stage>`` when the
  pipeline has a workspace (a stable location: a retried shard pod resumes there), else into its
  own output artifact. ``artifact_url`` reads the location back on the consuming side.
- ``publish``, ``log_kfp_metrics``, ``png_html``: what the KFP UI shows of a stage.

Configs from parameters: ``feedback_synth_kfp.parameters``; MLflow runs: ``feedback_synth_kfp.tracking``.
"""
from __future__ import annotations

import base64
import html
from typing import Any, Optional

from feedback_synth import storage
from feedback_synth.errors import ConfigError
from feedback_synth.stages.result import scalar_metrics

URL_KEY = "url"  # artifact metadata key: where the stage really wrote (a workspace URL)


def stage_output_url(artifact: Any, workspace_url: str, run_id: str, stage: str, run_folder: str = "") -> str:
    """Where a stage task writes: ``<run_folder>/<stage>`` (the in-process runner's layout: kfp-local
    writes into its ``--output``, so that a re-run resumes and ``--overwrite`` treats both runners'
    folders alike), ``<workspace_url>/<run_id>/<stage>``, or the artifact's own path.

    Shard tasks of one run share ``<workspace_url>/<run_id>/generated`` (each writes its own
    ``shards/shard-NNNNN``), so that a retried pod finds the committed shards of its run.
    """
    if run_folder:
        return storage.join(run_folder, stage)
    if not workspace_url:
        return artifact.path
    if not run_id:
        raise ConfigError("a workspace_url needs the pipeline run id (run_id) to name the run's folder")
    return storage.join(workspace_url, run_id, stage)


def artifact_url(artifact: Any) -> str:
    """The URL a stage wrote to: the workspace URL recorded by ``publish``, else the artifact path."""
    return (artifact.metadata or {}).get(URL_KEY) or artifact.path


def publish(artifact: Any, url: str, **metadata: Any) -> None:
    """Record on the output artifact where the stage wrote and a few scalars for the KFP UI."""
    if url != artifact.path:
        artifact.metadata[URL_KEY] = url
    artifact.metadata.update({k: v for k, v in metadata.items() if v is not None})


def log_kfp_metrics(metrics_artifact: Any, values: dict[str, Any], prefix: str = "") -> None:
    for k, v in scalar_metrics(values, prefix).items():
        metrics_artifact.log_metric(k, v)


def png_html(png: bytes, title: str, caption: str = "") -> str:
    """A small HTML page showing one PNG (the KFP UI renders HTML artifacts)."""
    data = base64.b64encode(png).decode("ascii")
    cap = f"<p>{html.escape(caption)}</p>" if caption else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><h3>{html.escape(title)}</h3>{cap}<img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{data}'/></body></html>")


def rounds_seconds(previous: Any, seconds: float) -> float:
    """A per-round task's seconds over the rounds so far (``previous``: the same task's output in
    the previous round, or None), as the in-process runner's timings sum them."""
    before = dict(getattr(previous, "metadata", None) or {}) if previous is not None else {}
    return round(float(before.get("rounds_seconds", before.get("seconds", 0.0))) + seconds, 2)


def rounds_generation(previous: Any, this_round: dict[str, Any]) -> dict[str, Any]:
    """The generation summary over the rounds so far: this round's (``generation_summary``) plus
    the one the previous round's filter output carries (None in round 1)."""
    before = dict((getattr(previous, "metadata", None) or {}).get("generation") or {}) if previous is not None else {}
    if not before:
        return this_round
    out = dict(this_round)
    for key in ("shards", "skipped", "num_images"):
        out[key] = int(before.get(key, 0)) + int(this_round.get(key, 0))
    for key in ("seconds", "wall_seconds"):
        if before.get(key) is not None and this_round.get(key) is not None:
            out[key] = round(float(before[key]) + float(this_round[key]), 3)
    return out


def generation_summary(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The in-process ``generate`` summary, from the metadata of the shard tasks (``publish``ed
    with ``started``, ``seconds`` (task wall time), ``generation_seconds``, ``num_images``,
    ``skipped``, ``criterion``); ``wall_seconds``: first shard start to last shard end."""
    done = [s for s in shards if not s.get("skipped")]
    spans = [(s["started"], s["started"] + s["seconds"]) for s in shards if "started" in s and "seconds" in s]
    return {"shards": len(shards), "skipped": sum(bool(s.get("skipped")) for s in shards),
            "num_images": int(sum(s.get("num_images", 0) for s in shards)),
            "seconds": round(sum(s.get("generation_seconds", 0.0) for s in done), 3),
            "criterion": shards[0].get("criterion") if shards else None,
            "wall_seconds": round(max(e for _, e in spans) - min(b for b, _ in spans), 2) if spans else None}


def promotion_markdown(result: Optional[dict[str, Any]]) -> str:
    """The promote task's decision, for the KFP UI."""
    if result is None:
        return "# Promotion\n\nSkipped: tracking is off (no `mlflow_tracking_uri`), so there is no registry.\n"
    verdict = "promoted to **champion**" if result.get("promoted") else "stays **challenger**"
    return (f"# Promotion\n\n`{result.get('model_name')}` version {result.get('version')}: {verdict}.\n\n"
            f"{result.get('reason', '')}\n")


def unique(urls: list[str]) -> list[str]:
    """``urls`` without repeats, in order (shard tasks that share a workspace folder)."""
    return list(dict.fromkeys(urls))


def class_names(data: Any) -> list[str]:
    """The class names of a prepared dataset artifact (prepare_data's output)."""
    from feedback_synth.data.imageset import load_info

    return load_info(artifact_url(data)).class_names
