"""The pilot (``feedback-synth tune``): choose the synthesis settings on the user's validation split
before the full run spends its budget (docs/method.md: the pilot).

It trains the baseline once with short epochs, then for every setting of a small grid (adaptation
on or off, strength, guidance scale, criterion, budget) adapts the generator if asked (once per
adaptation setting), plans, generates, filters and retrains with the same short epochs, and scores
the retrained model on the **validation** split, next to the same recipe without synthesis. It
writes the validation table and the chosen run config (``chosen.yaml``, the full config to pass to
``feedback-synth run --config``), and logs both to MLflow. When no setting beats "no synthesis" on
validation, it says so plainly and the chosen config turns synthesis off
(``feedback.budget_fraction`` is not the knob for that: the chosen config keeps the baseline and
tells the user not to spend the GPU budget).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, replace
from typing import Any, Optional

from tqdm.auto import tqdm

from feedback_synth import storage
from feedback_synth.config import METRICS, RunConfig, deep_merge, from_dict, resolve_devices, result_settings
from feedback_synth.errors import ConfigError

log = logging.getLogger(__name__)

# the default grid: a few values per knob that the benchmarks found to matter (section.field -> values)
DEFAULT_GRID: dict[str, list[Any]] = {
    "adapt.method": ["none", "full"],
    "generate.criterion": ["none", "entropy"],
    "generate.strength": [0.8, 1.0],
}
NO_SYNTHESIS = "no synthesis"


def parse_grid(pairs: list[str]) -> dict[str, list[Any]]:
    """``["generate.scale=0.01,0.03", "adapt.method=none,full"]`` -> a grid; every value is checked
    by building the config it makes."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        if "=" not in pair or "." not in pair.split("=", 1)[0]:
            raise ConfigError(f"--grid expects section.field=v1,v2,..., got '{pair}'")
        key, raw = pair.split("=", 1)
        grid[key.strip()] = [storage.load_yaml(v) for v in raw.split(",") if v.strip()]  # 1e-3 is a number
        if not grid[key.strip()]:
            raise ConfigError(f"--grid {pair}: no values (expected {key.strip()}=v1,v2,...)")
    return grid


# fields the pilot cannot try: it scores one-shot settings (feedback.rounds 1) on short trainings
UNTUNABLE = {"feedback.rounds": "the pilot scores one-shot settings (feedback.rounds 1); set feedback.rounds in "
                                "the run config instead"}


def check_grid(cfg: RunConfig, grid: dict[str, list[Any]]) -> None:
    """Before any work: every axis has values and names a field the pilot may try, and every setting
    of the grid builds a valid config (types, ranges, known names: criteria, filters, losses)."""
    from feedback_synth.orchestration.preflight import check_names

    for key, values in grid.items():
        if not values:
            raise ConfigError(f"--grid {key}: no values (expected {key}=v1,v2,...)")
        if key in UNTUNABLE:
            raise ConfigError(f"--grid {key}: not a setting the pilot can try ({UNTUNABLE[key]})")
    for setting in settings_of(grid):
        try:
            check_names(apply_setting(cfg, setting))
        except ConfigError as exc:
            raise ConfigError(f"--grid {setting_name(setting, full=True)}: {exc}") from None


def settings_of(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid, as ``{"section.field": value}``."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def apply_setting(cfg: RunConfig, setting: dict[str, Any]) -> RunConfig:
    """``cfg`` with the setting's values, checked like a config file."""
    update: dict[str, Any] = {}
    for key, value in setting.items():
        section, field = key.split(".", 1)
        update = deep_merge(update, {section: {field: value}})
    return from_dict(RunConfig, deep_merge(asdict(cfg), update))


def setting_name(setting: dict[str, Any], full: bool = False) -> str:
    return ", ".join(f"{k if full else k.split('.', 1)[1]}={v}" for k, v in setting.items())


TUNE_FOLDERS = ("data", "baseline", "adapted", "settings")  # where the pilot's stages write
TUNE_FILES = ("tune_report.json", "validation_table.md", "chosen.yaml")


def run_pilot(cfg: RunConfig, output_url: str, grid: Optional[dict[str, list[Any]]] = None, epochs: int = 15,
              tracker: Any = None, overwrite: bool = False) -> dict[str, Any]:
    """Try every setting of ``grid`` (default ``DEFAULT_GRID``) with ``epochs``-epoch trainings and
    score each on the validation split. Returns ``{"rows": [...], "chosen": name, "beats_no_synthesis":
    bool, "config": the chosen RunConfig as a dict}`` and writes ``validation_table.md``,
    ``tune_report.json`` and ``chosen.yaml`` under ``output_url``.

    A re-run into the same ``output_url`` reuses its finished stages; ``overwrite`` first removes what
    an earlier pilot wrote there (``run.remove_run_outputs`` on ``TUNE_FOLDERS``, and ``TUNE_FILES``;
    a file of the user's stays, and so does the MLflow store)."""
    from feedback_synth.data.imageset import load_info, load_split
    from feedback_synth.orchestration.run import synthesis_rounds
    from feedback_synth.orchestration.shared import RunLayout
    from feedback_synth.stages.adapt_generator import adapt_generator
    from feedback_synth.stages.outputs import model_url
    from feedback_synth.stages.prepare_data import prepare_data
    from feedback_synth.stages.train_baseline import train_baseline
    from feedback_synth.tracking.base import NullTracker
    from feedback_synth.training.classifier import load_classifier
    from feedback_synth.training.evaluate import evaluate, summary

    grid = grid or DEFAULT_GRID
    check_grid(cfg, grid)
    tracker = tracker or NullTracker()
    if overwrite:
        from feedback_synth.orchestration.run import remove_run_outputs

        remove_run_outputs(output_url, TUNE_FOLDERS)
        for name in TUNE_FILES:
            if storage.exists(storage.join(output_url, name)):
                storage.remove(storage.join(output_url, name))
    resolved = resolve_devices(cfg)  # every setting runs on the run's device (chosen.yaml keeps the user's)
    short = replace(resolved, train=replace(cfg.train, epochs=epochs), retrain=replace(cfg.retrain, epochs=epochs),
                    feedback=replace(cfg.feedback, rounds=1))
    data, baseline = storage.join(output_url, "data"), storage.join(output_url, "baseline")
    prepare_data(short.data, data)
    if "val" not in load_info(data).splits:
        raise ConfigError(f"the pilot scores settings on the validation split, and {cfg.data.dataset} has none; add "
                          f"a val/ folder (or val.txt) to the dataset")
    train_baseline(data, baseline, short.train, short.data)
    val = load_split(data, "val")
    metric = cfg.promote.gate_metric

    def score(model_folder: str) -> dict[str, float]:
        return summary(evaluate(load_classifier(model_url(model_folder), short.device), val, short.data))

    rows = [{"setting": NO_SYNTHESIS, **score(baseline)}]
    settings = settings_of(grid)
    for setting in tqdm(settings, desc="tune (validation)", unit="setting"):
        run_cfg = apply_setting(short, setting)
        name = setting_name(setting)
        folder = storage.join(output_url, "settings", "-".join(f"{k}{v}" for k, v in setting.items()))
        adapt_folder = storage.join(output_url, "adapted",
                                    "-".join(f"{k}{v}" for k, v in sorted(result_settings(run_cfg.adapt).items())))
        with tracker.stage(name, setting) as run:
            adapt_generator(data, model_url(baseline), adapt_folder, run_cfg.adapt,
                                             run_cfg.generate)
            _, retrained, filtered = synthesis_rounds(run_cfg, RunLayout(folder), data, baseline, NullTracker(),
                                                      adapted=adapt_folder)
            row = {"setting": name, **score(retrained),
                   "kept": storage.read_json(storage.join(filtered, "filter_report.json"))["kept"]}
            run.log_metrics({f"val_{k}": v for k, v in row.items() if isinstance(v, float)})
        rows.append(row)
    reference = rows[0]
    best, beats = choose(rows, metric)
    chosen_setting = settings[rows.index(best) - 1] if beats else {}
    chosen = apply_setting(cfg, chosen_setting) if beats else cfg
    report = {"rows": rows, "metric": metric, "epochs": epochs, "grid": grid, "chosen": best["setting"] if beats else
              NO_SYNTHESIS, "beats_no_synthesis": beats, "config": asdict(chosen)}
    table = validation_table(report)
    storage.write_json(storage.join(output_url, "tune_report.json"), report)
    storage.write_text(storage.join(output_url, "validation_table.md"), table)
    storage.write_yaml(storage.join(output_url, "chosen.yaml"), asdict(chosen))
    tracker.log_text(table, "validation_table.md")
    tracker.log_artifact_url(storage.join(output_url, "chosen.yaml"))
    tracker.log_metrics({f"best_val_{metric}": best.get(metric) or 0.0,
                         f"no_synthesis_val_{metric}": reference.get(metric) or 0.0})
    return report


def choose(rows: list[dict[str, Any]], metric: str) -> tuple[dict[str, Any], bool]:
    """The best synthesis row (``rows[1:]``) by ``metric``, then overall accuracy, and whether it
    beats the no-synthesis row (``rows[0]``) on ``metric``, strictly."""
    best = max(rows[1:], key=lambda r: (r.get(metric) or 0.0, r.get("overall") or 0.0))
    return best, (best.get(metric) or 0.0) > (rows[0].get(metric) or 0.0)


def validation_table(report: dict[str, Any]) -> str:
    keys = [k for k in METRICS if any(k in r for r in report["rows"])]
    lines = [f"| setting (validation, {report['epochs']} epochs) | " + " | ".join(keys) + " | kept |",
             "|---|" + "---|" * (len(keys) + 1)]
    for r in report["rows"]:
        mark = " **(chosen)**" if r["setting"] == report["chosen"] else ""
        lines.append(f"| {r['setting']}{mark} | " + " | ".join("-" if r.get(k) is None else f"{r[k]:.3f}" for k in keys)
                     + f" | {r.get('kept', '-')} |")
    if report["beats_no_synthesis"]:
        verdict = f"chosen on validation {report['metric']}: {report['chosen']}"
    else:
        verdict = (f"no setting beats no synthesis on validation {report['metric']}: synthesis would not pay off "
                   f"on this data with these settings; do not spend the GPU budget on a full run (or widen --grid)")
    return "\n".join(lines) + "\n\n" + verdict + "\n"

