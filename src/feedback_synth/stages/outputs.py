"""Where a stage puts what it writes, and how a training stage finishes (shared by train_baseline
and retrain): the checkpoint, the test metrics, the per-epoch history."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Optional

from feedback_synth import storage
from feedback_synth.config import DataConfig
from feedback_synth.data.imageset import load_info, load_split
from feedback_synth.stages.result import StageResult, scalar_metrics
from feedback_synth.tracking.descriptors import splits

EpochHook = Optional[Callable[[dict[str, Any]], None]]


def model_url(stage_output_url: str) -> str:
    """Where a training stage puts its checkpoint folder."""
    return storage.join(stage_output_url, "model")


def plan_url(feedback_url: str) -> str:
    """Where extract_feedback puts the generation plan."""
    return storage.join(feedback_url, "plan.json")


def val_eval(dataset_url: str, data_cfg: DataConfig) -> Optional[Callable]:
    from feedback_synth.training.evaluate import evaluate

    if "val" not in load_info(dataset_url).splits:
        return None
    val = load_split(dataset_url, "val")

    def fn(clf) -> dict[str, float]:
        m = evaluate(clf, val, data_cfg)
        return {"val_accuracy": m["overall"], **({"val_few": m["few"]} if m.get("few") is not None else {})}

    return fn


def finish_training(stage: str, clf, history, dataset_url: str, output_url: str, cfg: Any, data_cfg: DataConfig,
                     extra: Optional[dict[str, Any]] = None) -> StageResult:
    import yaml

    from feedback_synth.training.classifier import save_classifier
    from feedback_synth.training.evaluate import evaluate

    metrics = evaluate(clf, load_split(dataset_url, "test"), data_cfg)
    save_classifier(clf, model_url(output_url), {"train_config.yaml": yaml.safe_dump(
        {"train": asdict(cfg), "data": asdict(data_cfg), **(extra or {})}, sort_keys=False)})
    storage.write_json(storage.join(output_url, "metrics.json"), metrics)
    storage.write_json(storage.join(output_url, "history.json"), history)
    return StageResult(stage, {**metrics, **(extra or {})}, scalar_metrics(metrics, "test_"),
                       datasets=[splits(dataset_url, "train", "val", "test")])
