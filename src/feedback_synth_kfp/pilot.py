"""The pilot's KFP tasks: the bodies of ``components/pilot.py``, each one call of the in-process
pilot's functions (``orchestration.tune``), so that a pilot fanned out on Kubeflow judges exactly
as ``feedback-synth tune`` does.

    start_tracking -> pilot_prepare (the folds) -> pilot_fold x folds (ParallelFor, GPU: baseline, adaptations)
    -> pilot_cells (fan-in) -> pilot_cell x (setting, fold) (ParallelFor, GPU) -> pilot_choose

Every task reads the run's config from start_tracking's artifact (resolved once, pre-flight
done) and writes under the pilot's ``output`` URL, the layout of the in-process pilot: a re-run
into the same output resumes. Each cell is a nested MLflow run under the pilot's parent run;
``pilot_choose`` logs the table and the chosen config there and closes it.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from feedback_synth.config import SECTION_DEVICES, RunConfig, resolve_devices
from feedback_synth.orchestration import tune
from feedback_synth_kfp.tracking import attached, config_from_artifact, reported_errors, tracking_context


def grid_of(grid: str) -> dict[str, list[Any]]:
    """The ``grid`` parameter (JSON ``{"section.field": [values]}``; '' = the default grid), checked."""
    from feedback_synth.errors import ConfigError

    if not grid.strip():
        return dict(tune.DEFAULT_GRID)
    try:
        parsed = json.loads(grid)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"pilot parameter grid: not JSON ({exc.msg}); expected "
                          f'{{"adapt.method": ["none", "full"]}}') from None
    if not isinstance(parsed, dict) or not all(isinstance(v, list) for v in parsed.values()):
        raise ConfigError('pilot parameter grid: expected a JSON object of lists, e.g. {"adapt.method": ["none", "full"]}')
    return parsed


def task_config(tracking: Any, gpu: bool) -> RunConfig:
    """The run's config for a pilot task: the device resolved on a GPU task's pod, the CPU elsewhere."""
    cfg = config_from_artifact(tracking)
    if not gpu:
        cfg = replace(cfg, device="cpu", **{name: replace(getattr(cfg, name), device="cpu") for name in SECTION_DEVICES})
    return resolve_devices(cfg)


def prepare(tracking: Any, output: str, grid: str, folds: int, epochs: int) -> list[int]:
    """The dataset and its folds (every setting of the grid checked first); the fold numbers."""
    with reported_errors("pilot_prepare"):
        cfg = task_config(tracking, gpu=False)
        tune.check_grid(cfg, grid_of(grid))
        return tune.prepare_folds(cfg, output, folds, epochs)


def cells_of(grid: str, folds: int) -> list[dict[str, Any]]:
    """The pilot's cells: one per setting of ``grid`` and fold. A setting travels as ``[field,
    value]`` pairs: KFP hands a dict on with its keys in another order, and the order names it."""
    return [{"setting": [[k, v] for k, v in s.items()], "fold": k} for k in range(folds)
            for s in tune.settings_of(grid_of(grid))]


def fold_models(tracking: Any, output: str, fold: int, grid: str, epochs: int) -> str:
    """One fold's baseline and the adaptations the grid asks for; the baseline's folder."""
    with reported_errors("pilot_fold"):
        return tune.train_fold_models(task_config(tracking, gpu=True), output, fold, epochs, grid_of(grid))


def cell(tracking: Any, output: str, cell: dict[str, Any], epochs: int) -> dict[str, Any]:
    """One setting on one fold, logged as a nested run of the pilot's parent run."""
    with reported_errors("pilot_cell"), attached(tracking, output) as tracker:
        return tune.score_cell(task_config(tracking, gpu=True), output, dict(cell["setting"]), int(cell["fold"]),
                               epochs, tracker)


def choose(tracking: Any, output: str, grid: str, folds: int, epochs: int,
           scores: list[dict[str, Any]]) -> dict[str, Any]:
    """The verdict from every cell's score; written under ``output``, logged on the parent run,
    which it closes (the pilot's last task)."""
    with reported_errors("pilot_choose"):
        cfg = config_from_artifact(tracking)
        report = tune.choose_setting(cfg, grid_of(grid), [json.loads(s) if isinstance(s, str) else s for s in scores],
                                     epochs, folds)
        with attached(tracking, output) as tracker:
            tune.write_verdict(output, report, tracker)
            if tracking_context(tracking):
                tracker.client.set_terminated(tracker.run_id, "FINISHED")
    return report
