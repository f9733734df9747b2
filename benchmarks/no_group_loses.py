"""Benchmark: does any class group lose to synthesis, and does retraining's calibration stop it?
(issue 24, "No class group loses"; docs/method.md: No class group loses)

    python benchmarks/no_group_loses.py --work /tmp/bench/ngl [--datasets digits-lt digits-gap digits-groups]
        [--seeds 0 1 2 3 4] [--set retrain.epochs=20 ...] [--out benchmarks/results/no_group_loses]

Measures the opt-in calibration (``retrain.calibration``): run it with ``--set
retrain.calibration=no_group_loses --set retrain.head_epochs=0`` (the defaults when the committed
results were made). Each dataset runs as a user's ``feedback-synth run`` does: its preset (digits-gap adapts the
generator, ``adapt.method: full``), tracking off. Per seed (paired: the seed fixes
``data.split_seed``, the baseline, the start images and the shard seeds), from one retrained
model:

- no synthesis: the baseline, with the same loss (logit adjustment, tau 2);
- retrained, as trained: the retrained model without its calibration offset (lambda 0, the
  behaviour before this change);
- retrained, calibrated: the model the run ships (lambda chosen on validation);
- retrained, batch prior (post hoc): lambda 1, the offset of ``retrain.prior: batch``.

Columns: test overall, many / medium / few-shot (long tail) or average / worst / majority group
(groups: per class, the cell with the most training images), the chosen lambda. Paired
differences against no synthesis with 95% bootstrap CIs over seeds. A re-run with the same
``--work`` resumes (every stage is fingerprinted).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from synthesis_benchmark import Session, bootstrap_ci, majority_group_accuracy  # noqa: E402  (the benchmarks' shared parts)

from feedback_synth import storage  # noqa: E402
from feedback_synth.config import resolve_run_config  # noqa: E402
from feedback_synth.data.imageset import ImageSet, load_split  # noqa: E402
from feedback_synth.orchestration.run import synthesis_rounds  # noqa: E402
from feedback_synth.orchestration.shared import RunLayout  # noqa: E402
from feedback_synth.stages.adapt_generator import adapt_generator  # noqa: E402
from feedback_synth.stages.outputs import model_url  # noqa: E402
from feedback_synth.stages.prepare_data import prepare_data  # noqa: E402
from feedback_synth.stages.train_baseline import train_baseline  # noqa: E402
from feedback_synth.tracking.base import NullTracker  # noqa: E402
from feedback_synth.training.classifier import load_classifier  # noqa: E402
from feedback_synth.training.evaluate import accuracy_metrics, predict_logits  # noqa: E402

NO_SYN = "no synthesis"
ROWS = (NO_SYN, "retrained, as trained", "retrained, calibrated", "retrained, batch prior (post hoc)")



def metrics_of(logits: np.ndarray, test: ImageSet, train: ImageSet, data_cfg) -> dict[str, float]:
    m = accuracy_metrics(logits.argmax(1), test, train.class_counts().tolist(), data_cfg)
    out = {k: m[k] for k in ("overall", "many", "medium", "few", "average_group", "worst_group") if m.get(k) is not None}
    majority = majority_group_accuracy(logits.argmax(1), test, train)
    if majority is not None:
        out["majority_group"] = majority
    return out


def run_seed(work: str, dataset: str, seed: int, sets: list[str], log) -> dict[str, Any]:
    cfg = resolve_run_config(dataset, overrides=[
        f"data.split_seed={seed}", f"train.seed={seed}", f"retrain.seed={seed}", f"generate.seed={seed}",
        f"adapt.seed={seed}", "tracking.enabled=false", *sets])
    root = storage.join(work, dataset, f"seed{seed}")
    data, baseline = storage.join(root, "data"), storage.join(root, "baseline")
    t0 = time.time()
    prepare_data(cfg.data, data)
    train_baseline(data, baseline, cfg.train, cfg.data)
    adapted = None
    if cfg.adapt.method != "none":
        adapted = storage.join(root, "adapted")
        adapt_generator(data, model_url(baseline), adapted, cfg.adapt, cfg.generate)
    _, retrained, filtered = synthesis_rounds(cfg, RunLayout(storage.join(root, "run"), cfg.feedback.rounds), data,
                                              baseline, NullTracker(), adapted=adapted)
    test, train = load_split(data, "test"), load_split(data, "train")
    base = load_classifier(model_url(baseline), "cpu")
    clf = load_classifier(model_url(retrained), "cpu")
    calibration = storage.read_json(storage.join(retrained, "calibration.json"))
    shipped = predict_logits(clf, test)
    bias = np.asarray(clf.spec.logit_bias or [0.0] * train.num_classes)
    raw = shipped - bias[None, :]
    table = calibration.get("table") or []
    full = None
    if calibration.get("weight"):
        full = raw + bias[None, :] / calibration["weight"]
    elif table:  # weight 0 chosen: rebuild lambda 1 from the offset the stage would have used
        from feedback_synth.training.calibration import prior_offset
        from feedback_synth.training.recipes import retrain_recipe

        recipe = retrain_recipe(cfg.retrain, model_url(baseline))
        syn = ImageSet.load(storage.join(filtered, "synthetic.npz"))
        full = raw + prior_offset(recipe.loss, recipe.tau, train.class_counts(),
                                  np.bincount(syn.labels, minlength=train.num_classes),
                                  cfg.retrain.synthetic_fraction)[None, :]
    out = {NO_SYN: metrics_of(predict_logits(base, test), test, train, cfg.data),
           "retrained, as trained": metrics_of(raw, test, train, cfg.data),
           "retrained, calibrated": metrics_of(shipped, test, train, cfg.data)}
    if full is not None:
        out["retrained, batch prior (post hoc)"] = metrics_of(full, test, train, cfg.data)
    out["calibration"] = {"weight": calibration.get("weight"), "feasible": calibration.get("feasible"),
                          "reason": calibration.get("reason")}
    out["seconds"] = round(time.time() - t0, 1)
    log(f"{dataset} seed {seed}: lambda {calibration.get('weight')} "
        + "; ".join(f"{r}: " + ", ".join(f"{k} {v:.3f}" for k, v in out[r].items()) for r in ROWS if r in out)
        + f" ({out['seconds']} s)")
    return out


def columns_of(dataset_rows: dict[str, Any]) -> list[str]:
    first = next(iter(dataset_rows.values()))[NO_SYN]
    return [c for c in ("overall", "many", "medium", "few", "average_group", "worst_group", "majority_group")
            if c in first]


def markdown(results: dict[str, dict[str, Any]], command: str, minutes: float) -> str:
    lines = ["# No class group loses: retraining's calibration (issue 24, item 1)", "",
             f"Command (wall time {minutes:.1f} min on this {os.cpu_count()}-CPU machine):", "", "```", command, "```", "",
             "Each dataset with its preset, as `feedback-synth run` uses it (digits-gap adapts the generator). Rows from "
             "one retrained model per seed: *as trained* is lambda 0 (the behaviour before this change), *calibrated* "
             "is the shipped model (lambda chosen on validation: no class group below the replaced model, then the "
             "best few-shot / worst-group), *batch prior (post hoc)* is lambda 1. Test split; mean ± std over seeds; "
             "paired differences against no synthesis with 95% bootstrap CIs over seeds.", ""]
    for dataset, by_seed in results.items():
        seeds = sorted(by_seed, key=int)
        cols = columns_of(by_seed)
        lines += [f"## {dataset} (seeds {', '.join(seeds)})", "", "| row | " + " | ".join(cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for row in ROWS:
            if not all(row in by_seed[s] for s in seeds):
                continue
            cells = [f"{np.mean([by_seed[s][row][c] for s in seeds]):.3f} ± "
                     f"{np.std([by_seed[s][row][c] for s in seeds]):.3f}" for c in cols]
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        weights = [by_seed[s]["calibration"]["weight"] for s in seeds]
        lines += ["", f"Chosen lambda per seed: {', '.join(str(w) for w in weights)}; every class group kept on "
                      f"validation: {', '.join(str(by_seed[s]['calibration']['feasible']) for s in seeds)}.", "",
                  "| difference | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        pairs = [(r, NO_SYN) for r in ROWS[1:]] + [("retrained, calibrated", "retrained, as trained")]
        for a, b in pairs:
            if not all(a in by_seed[s] and b in by_seed[s] for s in seeds):
                continue
            lines.append(difference_row(by_seed, seeds, a, b, cols))
        lines.append("")
    return "\n".join(lines)


def difference_row(by_seed: dict[str, Any], seeds: list[str], a: str, b: str, cols: list[str]) -> str:
    """A table row: row ``a`` minus row ``b`` per column, the paired mean over ``seeds`` and its 95% bootstrap CI."""
    cells = []
    for c in cols:
        mean, lo, hi = bootstrap_ci([by_seed[s][a][c] - by_seed[s][b][c] for s in seeds])
        cells.append(f"{mean:+.3f} ({lo:+.3f} .. {hi:+.3f})")
    return f"| {a} vs {b} | " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--datasets", nargs="+", default=["digits-lt", "digits-gap", "digits-groups"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--set", action="append", default=[], help="config override for every run")
    p.add_argument("--out", help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    session = Session()
    results_url = storage.join(args.work, "results.json")
    results = storage.read_json(results_url) if storage.exists(results_url) else {}
    for dataset in args.datasets:
        for seed in args.seeds:
            results.setdefault(dataset, {})[str(seed)] = run_seed(args.work, dataset, seed, args.set, session.log)
            storage.write_json(results_url, results)
    chosen = {d: {str(s): results[d][str(s)] for s in args.seeds} for d in args.datasets}
    return session.finish(markdown(chosen, session.command, session.minutes()), chosen, args.out)

if __name__ == "__main__":
    raise SystemExit(main())
