"""The train_baseline stage: the classifier on the real (imbalanced) data."""
from __future__ import annotations

from dataclasses import asdict

from feedback_synth.config import DataConfig, TrainConfig, result_settings
from feedback_synth.data.imageset import load_split
from feedback_synth.stages.outputs import EpochHook, finish_training, val_eval
from feedback_synth.stages.result import StageResult
from feedback_synth.stages.resume import digests, run_stage
from feedback_synth.training.recipes import baseline_recipe


def train_baseline(dataset_url: str, output_url: str, cfg: TrainConfig, data_cfg: DataConfig,
                   on_epoch: EpochHook = None, overwrite: bool = False) -> StageResult:
    """Train the baseline classifier on the real (imbalanced) data and evaluate it on the test set.

    Writes ``model/`` (safetensors + config.json + train_config.yaml), ``metrics.json`` and
    ``history.json`` (per-epoch metrics) under ``output_url``.
    """
    return run_stage("train_baseline", output_url, {"train": result_settings(cfg), "data": asdict(data_cfg)},
                     digests(data=dataset_url),
                     lambda: _train_baseline(dataset_url, output_url, cfg, data_cfg, on_epoch), overwrite)


def _train_baseline(dataset_url: str, output_url: str, cfg: TrainConfig, data_cfg: DataConfig,
                   on_epoch: EpochHook = None) -> StageResult:
    from feedback_synth.training.train import train_classifier

    train = load_split(dataset_url, "train")
    clf, history = train_classifier(train, cfg, cfg.model, recipe=baseline_recipe(cfg), on_epoch=on_epoch,
                                    eval_fn=val_eval(dataset_url, data_cfg), desc="baseline")
    return finish_training("train_baseline", clf, history, dataset_url, output_url, cfg, data_cfg)
