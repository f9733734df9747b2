"""Log the retrained classifier, register it as a new model version, and apply the gate."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

from feedback_synth import storage
from feedback_synth.config import PromoteConfig
from feedback_synth.registry.locks import make_lock
from feedback_synth.registry.promote import promote_model_version
from feedback_synth.tracking.client import mlflow_errors, say
from feedback_synth.tracking.pyfunc import download_checkpoint, save_pyfunc


def checkpoint_test_set(model_url: str) -> Optional[str]:
    """Which test set a checkpoint's metrics come from: its dataset and split (train_config.yaml)."""
    url = storage.join(model_url, "train_config.yaml")
    if not storage.exists(url):
        return None
    data = (storage.read_yaml(url) or {}).get("data") or {}
    if not data.get("dataset"):
        return None
    return f"{data['dataset']} split_seed={data.get('split_seed')} image_size={data.get('image_size')}"


def log_model(tracker, model_url: str, run_id: Optional[str] = None) -> tuple[str, dict[str, Any]]:
    """Log the checkpoint at ``model_url`` as a pyfunc model under ``model/`` of the run;
    returns (``runs:/<id>/model``, the checkpoint's config.json)."""
    run_id = run_id or tracker.current_run_id()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "checkpoint")
        spec = download_checkpoint(model_url, ckpt)
        model_dir = os.path.join(tmp, "model")
        save_pyfunc(ckpt, spec, model_dir)
        with mlflow_errors("store the model"):
            tracker.client.log_artifacts(run_id, model_dir, "model")
    return f"runs:/{run_id}/model", spec

def register_version(tracker, source: str, run_id: str, description: str = "") -> str:
    """A new version of ``tracking.registered_model`` from ``source``; returns its number."""
    from mlflow.exceptions import MlflowException

    name = tracker.cfg.registered_model
    with mlflow_errors(f"register the model '{name}'"):
        try:
            tracker.client.create_registered_model(name, description="feedback-synth retrained classifier "
                                                                    "(champion/challenger aliases)")
        except MlflowException as exc:  # exists already, or a concurrent run created it just now
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                try:  # a concurrent first creation can fail with another code (a unique violation)
                    tracker.client.get_registered_model(name)
                except MlflowException:
                    raise exc from None
        mv = tracker.client.create_model_version(name, source=source, run_id=run_id, description=description)
    return str(mv.version)

def register_and_promote(tracker, model_url: str, report: dict[str, Any], cfg: PromoteConfig,
                         run_id: Optional[str] = None) -> dict[str, Any]:
    """Log + register the retrained model, then apply the champion/challenger gate.

    ``report`` is ``stages.evaluate_run``'s output: the candidate's metrics are
    ``report['retrained']``, the no-champion reference is ``report['baseline']``.
    """
    run_id = run_id or tracker.current_run_id()
    name = tracker.cfg.registered_model
    source, _ = log_model(tracker, model_url, run_id)
    version = register_version(tracker, source, run_id, description=f"from {model_url}")
    lock = make_lock(cfg.lock_uri, tracker.tracking_uri, name)
    run_ids = list(dict.fromkeys(r for r in (run_id, tracker.run_id) if r))
    with mlflow_errors(f"promote '{name}' v{version}"):
        result = promote_model_version(tracker.client, name, version, report["retrained"], cfg, lock=lock,
                                       baseline_metrics=report.get("baseline"), run_ids=run_ids,
                                       test_set=checkpoint_test_set(model_url), tracking_uri=tracker.tracking_uri)
    tracker.log_metrics_to(run_id, {"promoted": int(result["promoted"]), "model_version": int(version)}, None, "")
    say(f"registry: {name} v{version} {'promoted to champion' if result['promoted'] else 'stays challenger'} "
         f"({result['reason']})")
    return result
