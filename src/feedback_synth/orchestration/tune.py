"""The pilot (``feedback-synth tune``): choose the synthesis settings on the user's own data before
the full run spends its budget, and say "no-go" when nothing pays (docs/method.md: the pilot).

It judges every setting of a small grid (adaptation on or off, strength, guidance scale,
criterion, budget) on **repeated validation splits**: ``folds`` folds of train + val
(``data.folds``; the test split is never read), each with its own baseline and seeds. In every
fold a setting adapts the generator if asked, plans, generates, filters and retrains with short
epochs, and is scored on the fold's held-out images **against the same recipe without synthesis
on the same fold** (the paired difference; a calibrated retraining, whose weight is chosen on
those same images, by its cross-fitted scores: ``training.calibration``). Over the folds: the
mean gain on the gate metric and its 95% bootstrap CI (``reporting.stats.paired_ci``, as the
benchmarks compute theirs).

"Go" only when that CI excludes zero; among the settings that go, the largest mean gain (then
overall accuracy). No setting goes: the pilot says so plainly and the chosen config is the
user's own, unchanged (do not spend the GPU budget on it). It writes the validation table, the
report and the chosen run config (``chosen.yaml``, the full config to pass to ``feedback-synth
run --config``), and logs them to MLflow, with one nested run per setting and fold.

Its parts are plain functions that also run as KFP tasks (``pipelines/pilot_pipeline.py`` fans the
folds and the cells out): ``prepare_folds``, ``train_fold_models``, ``score_cell``, ``choose_setting``.
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
from feedback_synth.orchestration import DEFAULT_FOLDS

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


TUNE_FOLDERS = ("data", "folds", "baseline", "adapted", "settings")  # where the pilot's stages write (and wrote)
TUNE_FILES = ("tune_report.json", "validation_table.md", "chosen.yaml")
CONFIDENCE = 0.95


def pilot_config(cfg: RunConfig, epochs: int, fold: int = 0) -> RunConfig:
    """The config of the pilot's trainings in fold ``fold``: the run's epochs (``epochs`` > 0:
    that many instead, shorter and less faithful), one round, the run's devices resolved, and
    every seed moved by the fold (so the folds differ in training noise as in data).

    Short trainings exaggerate synthesis' gain: the synthetic images give the retraining more
    steps per epoch than its no-synthesis reference gets, which matters while the reference is
    still far from converged (``benchmarks/results/pilot_check.md``)."""
    resolved = resolve_devices(cfg)
    train_epochs, retrain_epochs = (epochs, epochs) if epochs > 0 else (cfg.train.epochs, cfg.retrain.epochs)
    return replace(resolved, train=replace(cfg.train, epochs=train_epochs, seed=cfg.train.seed + fold),
                   retrain=replace(cfg.retrain, epochs=retrain_epochs, seed=cfg.retrain.seed + fold),
                   adapt=replace(cfg.adapt, seed=cfg.adapt.seed + fold),
                   generate=replace(cfg.generate, seed=cfg.generate.seed + fold),
                   feedback=replace(cfg.feedback, rounds=1))


def fold_url(output_url: str, fold: int, part: str) -> str:
    return storage.join(output_url, "folds", f"fold-{fold}", part)


def setting_slug(setting: dict[str, Any]) -> str:
    return "-".join(f"{k}{v}" for k, v in setting.items())


def check_pilot_counts(folds: int, epochs: int, flags: str = "--") -> None:
    """The pilot's folds (at least 1) and epochs (0 = the run's, or more); ``flags``: how the
    command line names them (``--`` for tune, ``--pilot-`` for run --pilot), for the error."""
    if folds < 1:
        raise ConfigError(f"{flags}folds must be at least 1, got {folds}")
    if epochs < 0:
        raise ConfigError(f"{flags}epochs must be 0 (the run's epochs) or more, got {epochs}")


def prepare_folds(cfg: RunConfig, output_url: str, folds: int, epochs: int) -> list[int]:
    """Prepare the dataset once and write its ``folds`` folds (``data.folds``); the fold numbers."""
    from feedback_synth.data.folds import write_fold
    from feedback_synth.data.imageset import load_info
    from feedback_synth.stages.prepare_data import prepare_data
    from feedback_synth.stages.result import StageResult
    from feedback_synth.stages.resume import digests, run_stage

    check_pilot_counts(folds, epochs)
    short = pilot_config(cfg, epochs)
    data = storage.join(output_url, "data")
    prepare_data(short.data, data)
    if "val" not in load_info(data).splits:
        raise ConfigError(f"the pilot scores settings on validation splits, and {cfg.data.dataset} has none; add "
                          f"a val/ folder (or val.txt) to the dataset")
    for k in range(folds):
        def work(k: int = k) -> StageResult:
            info = write_fold(data, fold_url(output_url, k, "data"), k, cfg.data.split_seed)
            return StageResult("pilot_fold", {"fold": k, "train_class_counts": info.train_class_counts})

        run_stage("pilot_fold", fold_url(output_url, k, "data"), {"fold": k, "seed": cfg.data.split_seed},
                  digests(data=data), work)
    return list(range(folds))


def adapted_url(output_url: str, fold: int, run_cfg: RunConfig) -> str:
    """Where fold ``fold`` keeps the adaptation ``run_cfg`` asks for: one folder per distinct
    adaptation (its settings and the sampling it is measured with), shared by the settings that
    ask for the same one."""
    from feedback_synth.fingerprints import digest_of
    from feedback_synth.stages.adapt_generator import sampling_settings

    key = digest_of({"adapt": result_settings(run_cfg.adapt), "sampling": sampling_settings(run_cfg.generate)})
    return fold_url(output_url, fold, storage.join("adapted", f"{run_cfg.adapt.method}-{key[:12]}"))


def train_fold_models(cfg: RunConfig, output_url: str, fold: int, epochs: int,
                      grid: dict[str, list[Any]]) -> str:
    """Fold ``fold``'s baseline, then every generator adaptation the grid asks for, each once (all
    resume when done): before the cells, so that cells sharing an adaptation never train it at
    the same time (on Kubeflow they run in parallel). The baseline's folder."""
    from feedback_synth.stages.adapt_generator import adapt_generator
    from feedback_synth.stages.outputs import model_url
    from feedback_synth.stages.train_baseline import train_baseline

    short = pilot_config(cfg, epochs, fold)
    data, baseline = fold_url(output_url, fold, "data"), fold_url(output_url, fold, "baseline")
    train_baseline(data, baseline, short.train, short.data)
    for setting in settings_of(grid):
        run_cfg = apply_setting(short, setting)
        if run_cfg.adapt.method != "none":
            adapt_generator(data, model_url(baseline), adapted_url(output_url, fold, run_cfg), run_cfg.adapt,
                            run_cfg.generate)
    return baseline


def score_cell(cfg: RunConfig, output_url: str, setting: dict[str, Any], fold: int, epochs: int,
               tracker: Any = None) -> dict[str, Any]:
    """One cell of the pilot: ``setting`` on fold ``fold`` (its baseline and adaptation trained
    first: ``train_fold_models``), scored on the fold's held-out images with and without synthesis
    (the same recipe). Writes and returns
    ``{"setting", "fold", "synthesis", "no_synthesis", "kept"}``; a re-run resumes its finished stages."""
    from feedback_synth.orchestration.run import synthesis_rounds
    from feedback_synth.orchestration.shared import RunLayout
    from feedback_synth.stages.adapt_generator import adapt_generator
    from feedback_synth.stages.outputs import model_url
    from feedback_synth.tracking.base import NullTracker
    from feedback_synth.training.evaluate import summary

    folder = fold_url(output_url, fold, storage.join("settings", setting_slug(setting)))
    score_url = storage.join(folder, "score.json")
    run_cfg = apply_setting(pilot_config(cfg, epochs, fold), setting)
    data, baseline = fold_url(output_url, fold, "data"), fold_url(output_url, fold, "baseline")
    tracker = tracker or NullTracker()
    with tracker.stage(f"fold_{fold}/{setting_name(setting)}", {**setting, "fold": fold}) as run:
        adapted = adapted_url(output_url, fold, run_cfg)
        adapt_generator(data, model_url(baseline), adapted, run_cfg.adapt, run_cfg.generate)  # done: it resumes
        _, retrained, filtered = synthesis_rounds(run_cfg, RunLayout(folder), data, baseline, NullTracker(),
                                                  adapted=adapted)
        cell = {"setting": setting_name(setting), "fold": fold, "synthesis": _synthesis_scores(retrained),
                "no_synthesis": summary(storage.read_json(storage.join(retrained, "reference_metrics.json"))),
                "kept": storage.read_json(storage.join(filtered, "filter_report.json"))["kept"]}
        run.log_metrics({**{f"val_{k}": v for k, v in cell["synthesis"].items() if isinstance(v, float)},
                         **{f"val_no_synthesis_{k}": v for k, v in cell["no_synthesis"].items()
                            if isinstance(v, float)}})
    storage.write_json(score_url, cell)
    return cell


def _synthesis_scores(retrained_url: str) -> dict[str, float]:
    """The retrained model's scores on the fold's held-out images. A fold's validation split is its
    held-out part, so a calibrated model (``retrain.calibration``) chose its weight on the very images
    it is scored on: then its cross-fitted scores (each half with the weight chosen on the other)."""
    from feedback_synth.training.evaluate import summary

    calibration_url = storage.join(retrained_url, "calibration.json")
    calibration = storage.read_json(calibration_url) if storage.exists(calibration_url) else {}
    if calibration.get("crossfit"):  # written only where a weight was chosen
        return dict(calibration["crossfit"])
    return summary(storage.read_json(storage.join(retrained_url, "metrics.json")))


def choose_setting(cfg: RunConfig, grid: dict[str, list[Any]], cells: list[dict[str, Any]], epochs: int,
                   folds: int) -> dict[str, Any]:
    """The pilot's verdict from its cells: per setting the mean scores over the folds, the mean
    paired gain on the gate metric with its CI, and whether it goes (the CI excludes zero); the
    chosen setting (the largest gain among those that go) and its config."""
    from feedback_synth.reporting.stats import paired_ci

    metric = cfg.promote.gate_metric
    settings = settings_of(grid)
    rows = []
    for setting in settings:
        name = setting_name(setting)
        mine = sorted((c for c in cells if c["setting"] == name), key=lambda c: c["fold"])
        if len(mine) != folds:
            raise ConfigError(f"the pilot has {len(mine)} of {folds} folds for '{name}': a cell is missing")
        gains = [c["synthesis"].get(metric, 0.0) - c["no_synthesis"].get(metric, 0.0) for c in mine]
        mean, lo, hi = paired_ci(gains, CONFIDENCE)
        overall = [c["synthesis"].get("overall", 0.0) - c["no_synthesis"].get("overall", 0.0) for c in mine]
        keys = [k for k in METRICS if k in mine[0]["synthesis"]]
        rows.append({"setting": name, **{k: _mean(c["synthesis"][k] for c in mine) for k in keys},
                     "kept": _mean(c["kept"] for c in mine), "gain": mean, "gain_lo": lo, "gain_hi": hi,
                     "gain_per_fold": gains, "overall_gain": _mean(overall), "go": lo > 0})
    reference_keys = [k for k in METRICS if k in cells[0]["no_synthesis"]]
    reference = {"setting": NO_SYNTHESIS, **{k: _mean(c["no_synthesis"][k] for c in cells) for k in reference_keys}}
    going = [r for r in rows if r["go"]]
    best = max(going, key=lambda r: (r["gain"], r["overall_gain"])) if going else None
    chosen = apply_setting(cfg, settings[rows.index(best)]) if best else cfg
    return {"rows": [reference, *rows], "metric": metric, "epochs": epochs, "folds": folds, "confidence": CONFIDENCE,
            "grid": grid, "chosen": best["setting"] if best else NO_SYNTHESIS, "beats_no_synthesis": best is not None,
            "config": asdict(chosen)}


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None]
    return float(sum(values) / len(values)) if values else float("nan")


def write_verdict(output_url: str, report: dict[str, Any], tracker: Any = None) -> None:
    """``tune_report.json``, ``validation_table.md`` and ``chosen.yaml`` under ``output_url``; the
    table, the chosen config and the gain logged on ``tracker``'s run."""
    table = validation_table(report)
    storage.write_json(storage.join(output_url, "tune_report.json"), report)
    storage.write_text(storage.join(output_url, "validation_table.md"), table)
    storage.write_yaml(storage.join(output_url, "chosen.yaml"), report["config"])
    if tracker is not None:
        tracker.log_text(table, "validation_table.md")
        tracker.log_artifact_url(storage.join(output_url, "chosen.yaml"))
        best = next((r for r in report["rows"][1:] if r["setting"] == report["chosen"]), None)
        tracker.log_metrics({"go": float(report["beats_no_synthesis"]),
                             f"chosen_val_gain_{report['metric']}": best["gain"] if best else 0.0})


def remove_pilot_outputs(output_url: str) -> None:
    """What an earlier pilot wrote in ``output_url`` (its folders and files; a file of the user's
    stays, and so does the MLflow store)."""
    from feedback_synth.orchestration.run import remove_run_outputs

    remove_run_outputs(output_url, TUNE_FOLDERS)
    for name in TUNE_FILES:
        if storage.exists(storage.join(output_url, name)):
            storage.remove(storage.join(output_url, name))


def run_pilot(cfg: RunConfig, output_url: str, grid: Optional[dict[str, list[Any]]] = None, epochs: int = 0,
              tracker: Any = None, overwrite: bool = False, folds: int = DEFAULT_FOLDS) -> dict[str, Any]:
    """The pilot in this process: every setting of ``grid`` (default ``DEFAULT_GRID``) on ``folds``
    folds with the run's trainings (``epochs`` > 0: that many epochs instead), then the verdict
    (``choose_setting``). Returns the report
    (``rows``: no synthesis, then one per setting with its gain and CI; ``chosen``;
    ``beats_no_synthesis``: go or no-go; ``config``: the chosen RunConfig as a dict).

    A re-run into the same ``output_url`` reuses its finished stages and cells; ``overwrite``
    first removes what an earlier pilot wrote there."""
    grid = grid or DEFAULT_GRID
    check_grid(cfg, grid)
    if overwrite:
        remove_pilot_outputs(output_url)
    fold_ids = prepare_folds(cfg, output_url, folds, epochs)
    for k in fold_ids:
        train_fold_models(cfg, output_url, k, epochs, grid)
    cells = [(setting, k) for k in fold_ids for setting in settings_of(grid)]
    scores = [score_cell(cfg, output_url, setting, k, epochs, tracker)
              for setting, k in tqdm(cells, desc="pilot (settings x folds)", unit="cell")]
    report = choose_setting(cfg, grid, scores, epochs, folds)
    write_verdict(output_url, report, tracker)
    return report


def validation_table(report: dict[str, Any]) -> str:
    """The pilot's table: each setting's mean validation scores over the folds, its mean gain over
    no synthesis on the gate metric with the CI, and go / no-go; then the verdict in words."""
    rows = report["rows"]
    metric = report["metric"]
    keys = [k for k in METRICS if any(k in r for r in rows)]
    folds = report.get("folds", 1)
    over = f"{folds} fold{'s' if folds != 1 else ''}"
    level = round(100 * report.get("confidence", CONFIDENCE))
    epochs = f"{report['epochs']} epochs" if report["epochs"] > 0 else "the run's epochs"
    lines = [f"| setting (validation, {over}, {epochs}) | " + " | ".join(keys)
             + f" | kept | gain in {metric} ({level}% CI) | go |", "|---|" + "---|" * (len(keys) + 3)]
    for r in rows:
        mark = " **(chosen)**" if r["setting"] == report["chosen"] else ""
        gain = "-" if "gain" not in r else f"{r['gain']:+.3f} ({r['gain_lo']:+.3f} .. {r['gain_hi']:+.3f})"
        go = "-" if "go" not in r else ("yes" if r["go"] else "no")
        kept = "-" if r.get("kept") is None else f"{r['kept']:.0f}"
        lines.append(f"| {r['setting']}{mark} | " + " | ".join("-" if r.get(k) is None else f"{r[k]:.3f}" for k in keys)
                     + f" | {kept} | {gain} | {go} |")
    if report["beats_no_synthesis"]:
        verdict = (f"go: {report['chosen']} (its gain in validation {metric} over no synthesis has a {level}% CI above "
                   f"zero over {over})")
    else:
        verdict = (f"no-go: no setting's gain in validation {metric} over no synthesis has a {level}% CI above zero "
                   f"over {over}: synthesis would not pay off on this data with these settings; do not spend "
                   f"the GPU budget on a full run (or widen --grid)")
    return "\n".join(lines) + "\n\n" + verdict + "\n"
