"""The prepare_data stage: load and check the dataset, write its splits."""
from __future__ import annotations

from dataclasses import asdict

from feedback_synth.config import DataConfig
from feedback_synth.fingerprints import folder_digest
from feedback_synth.stages.result import StageResult
from feedback_synth.stages.resume import run_stage
from feedback_synth.tracking.descriptors import splits


def prepare_data(cfg: DataConfig, output_url: str, overwrite: bool = False) -> StageResult:
    """Load and check the dataset (built-in or URL) and write its splits to ``output_url``."""
    from feedback_synth.data.prepare import BUILTIN, scan_dataset

    if cfg.dataset not in BUILTIN:
        scan_dataset(cfg.dataset, cfg)  # fails fast (bounded wait) on an unreachable store, before the listing below
    source = {} if cfg.dataset in BUILTIN else {"dataset": folder_digest(cfg.dataset, content=False)}
    return run_stage("prepare_data", output_url, asdict(cfg), source, lambda: _prepare_data(cfg, output_url),
                     overwrite)


def _prepare_data(cfg: DataConfig, output_url: str) -> StageResult:
    from feedback_synth.data.prepare import prepare_dataset

    info = prepare_dataset(cfg, output_url)
    return StageResult("prepare_data", asdict(info), {"train_images": float(sum(info.train_class_counts)),
                                                       "classes": float(len(info.class_names))},
                       datasets=[splits(output_url, "train", "val", "test")])
