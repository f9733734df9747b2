"""Benchmark: which retraining keeps every class group? (issue 24, item 1; docs/method.md: No class group loses)

    python benchmarks/retrain_variants.py --work /tmp/bench/ngl [--datasets digits-gap digits-lt digits-groups]
        [--seeds 0 1 2 3 4] [--out benchmarks/results/retrain_variants]

Runs on the folders ``benchmarks/no_group_loses.py`` left in ``--work`` (each dataset with its
preset: data, baseline, the kept synthetic images of the run), so every variant retrains on the
same real and synthetic images (paired by seed). Variants of retraining, each from scratch:

- real prior (today): logit adjustment with the real-count prior, half of each batch synthetic;
- real prior + head on real: the same model, its last layer re-fit on the real images alone;
- batch prior + head on real: the representation trained with the stream's own prior (no double
  correction), the last layer re-fit on the real images with the real prior (decoupled training);
- real prior, a quarter synthetic: ``synthetic_fraction`` 0.25;
- ... + distillation: the two head re-fit variants, the loss adding knowledge distillation from the
  same-steps no-synthesis reference on each batch's real images (weight 1 unless the name gives
  another, temperature 2), so the student keeps what the real-only model knows while the synthetic
  images add the rest;
- ... + distillation by real share: each real image's distillation term weighed by its class's
  share of real images among its real and synthetic ones (1 on classes synthesis leaves alone,
  little on the classes it fills, where the real-only teacher knows least).

Per variant: validation and test metrics. The choice is made on validation (the best gate metric
among the variants no class group of which is below no synthesis on validation); the test split
shows whether it holds. Paired differences against no synthesis, 95% bootstrap CIs over seeds.

Two no-synthesis references: the baseline (the same loss and epochs: half the optimiser steps of a
half-synthetic retraining) and, since the library's default became ``retrain.reference_steps: same``,
the same recipe on the real images alone trained with the retraining's optimiser steps
(``same_steps_epochs``): the fair one. Results cached before it existed lack it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Any, NamedTuple, Optional

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from synthesis_benchmark import Session, bootstrap_ci, majority_group_accuracy  # noqa: E402  (the benchmarks' shared parts)

from feedback_synth import storage  # noqa: E402
from feedback_synth.config import resolve_run_config  # noqa: E402
from feedback_synth.data.imageset import ImageSet, load_split  # noqa: E402
from feedback_synth.stages.outputs import model_url  # noqa: E402
from feedback_synth.training.calibration import choose_weight, crossfit_predictions, prior_offset  # noqa: E402
from feedback_synth.training.classifier import load_classifier  # noqa: E402
from feedback_synth.training.evaluate import accuracy_metrics, predict_logits  # noqa: E402
from feedback_synth.training.recipes import retrain_recipe  # noqa: E402
from feedback_synth.training.train import drawn_class_mix, refit_head, same_steps_epochs, train_classifier  # noqa: E402

NO_SYN = "no synthesis"
SAME_STEPS = "no synthesis, same steps"
class Variant(NamedTuple):
    prior: str  # the adjusted loss's prior: 'real' or 'batch'
    fraction: Optional[float]  # the synthetic share of a batch; None = the preset's
    head: bool  # re-fit the head on the real images after training
    distill: Optional[str]  # distillation from the same-steps reference: None, 'all' or 'real_share'
    weight: float = 0.0  # the distillation weight
    calibrated: bool = False  # a post-hoc logit offset chosen on validation against the fair reference
    tolerance: float = 0.0  # how far below the reference a group may fall on validation under calibration


VARIANT_SPECS = {
    "real prior (today)": Variant("real", None, False, None),
    "real prior + head on real": Variant("real", None, True, None),
    "batch prior + head on real": Variant("batch", None, True, None),
    "real prior, a quarter synthetic": Variant("real", 0.25, False, None),
    "real prior + head + distillation": Variant("real", None, True, "all", 1.0),
    "batch prior + head + distillation": Variant("batch", None, True, "all", 1.0),
    "real prior + head + distillation by real share": Variant("real", None, True, "real_share", 1.0),
    "batch prior + head + distillation by real share": Variant("batch", None, True, "real_share", 1.0),
    "real prior + head + distillation 0.5": Variant("real", None, True, "all", 0.5),
    "real prior + head + distillation 0.25": Variant("real", None, True, "all", 0.25),
    "real prior + head + distillation 0.1": Variant("real", None, True, "all", 0.1),
    "real prior + distillation 0.25": Variant("real", None, False, "all", 0.25),
    "real prior + head + distillation by real share 0.5": Variant("real", None, True, "real_share", 0.5),
    "real prior + head + distillation by real share 0.25": Variant("real", None, True, "real_share", 0.25),
    # round 12: each preset's variant with retrain.calibration's offset, its weight chosen on a fine grid
    # so that no class group is below the fair reference on validation
    "real prior, calibrated": Variant("real", None, False, None, calibrated=True),
    "real prior + head, calibrated": Variant("real", None, True, None, calibrated=True),
    "real prior + head + distillation 0.25, calibrated": Variant("real", None, True, "all", 0.25, calibrated=True),
    # round 14, digits-gap's few-shot half: distillation where synthesis adds little (the many-shot
    # classes keep the teacher, the filled classes learn from their synthetic images), calibrated too;
    # and the calibration that lets a group fall by the goal's own margin (0.005) on validation
    "real prior + head + distillation by real share 0.25, calibrated":
        Variant("real", None, True, "real_share", 0.25, calibrated=True),
    "real prior + head + distillation 0.25, calibrated within 0.005":
        Variant("real", None, True, "all", 0.25, calibrated=True, tolerance=0.005),
}
VARIANTS = tuple(VARIANT_SPECS)
DISTILL_TEMPERATURE = 2.0
HEAD_EPOCHS = 20
KEYS = ("overall", "many", "medium", "few", "average_group", "worst_group", "majority_group")


def scores(clf, data: ImageSet, train: ImageSet, data_cfg, logit_bias: Optional[np.ndarray] = None) -> dict[str, float]:
    logits = predict_logits(clf, data)
    return scores_of((logits if logit_bias is None else logits + logit_bias[None, :]).argmax(1), data, train, data_cfg)


def scores_of(predictions: np.ndarray, data: ImageSet, train: ImageSet, data_cfg) -> dict[str, float]:
    m = accuracy_metrics(predictions, data, train.class_counts().tolist(), data_cfg)
    m["majority_group"] = majority_group_accuracy(predictions, data, train)
    return {k: float(m[k]) for k in KEYS if m.get(k) is not None}


def calibrated_scores(clf, val: ImageSet, test: ImageSet, train: ImageSet, synthetic: ImageSet, fraction: float,
                      recipe, data_cfg, reference_val: dict[str, float], reference_val_predictions: np.ndarray,
                      tolerance: float = 0.0) -> dict[str, Any]:
    """``retrain.calibration``'s rule on its grid (0.05 steps), against the fair reference's validation
    scores: the offset towards the stream's own prior whose weight keeps every class group at the
    reference on validation, with the best few-shot (worst-group) accuracy; the test split is scored
    with it. ``val``: the cross-fitted validation scores (``crossfit_predictions``), which the choice
    among variants reads; ``val_in_sample``: those of the weight chosen on all of it (optimistic)."""
    counts = train.class_counts()
    offset = prior_offset(recipe.loss, recipe.tau, counts, np.bincount(synthetic.labels, minlength=train.num_classes),
                          fraction, drawn_class_mix(train, recipe))
    val_logits = predict_logits(clf, val)
    chosen = choose_weight(val_logits, val, counts.tolist(), data_cfg, offset, reference_val, tolerance=tolerance)
    bias = np.asarray(chosen.logit_bias, np.float32)
    crossfit = crossfit_predictions(val_logits, val, counts.tolist(), data_cfg, offset, reference_val_predictions,
                                    tolerance=tolerance)
    return {"val": scores_of(crossfit, val, train, data_cfg),
            "val_in_sample": scores_of((val_logits + bias[None, :]).argmax(1), val, train, data_cfg),
            "test": scores(clf, test, train, data_cfg, bias),
            "weight": chosen.weight, "feasible": chosen.feasible}


def up_to_date(cached: dict[str, Any]) -> dict[str, Any]:
    """A seed's cached results less the entries measured before what they must have existed: a
    variant without ``majority_group`` (on data with groups every other entry has it), a calibrated
    one without cross-fitted validation scores (``val_in_sample`` beside them, since round 15).
    They are trained again."""
    def stale(name: str, entry: Any) -> bool:
        if not isinstance(entry, dict):
            return False
        if "worst_group" in entry.get("val", {}) and "majority_group" not in entry["val"]:
            return True
        return name in VARIANT_SPECS and VARIANT_SPECS[name].calibrated and "val_in_sample" not in entry

    return {k: v for k, v in cached.items() if not stale(k, v) or k == NO_SYN}


def run_seed(work: str, dataset: str, seed: int, log, done: Optional[dict[str, Any]] = None,
             variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:
    """Every one of ``variants`` that ``done`` (the seed's cached results) lacks, on one seed."""
    cfg = resolve_run_config(dataset, overrides=[f"data.split_seed={seed}", f"train.seed={seed}",
                                                 f"retrain.seed={seed}", "tracking.enabled=false"])
    root = storage.join(work, dataset, f"seed{seed}")
    data, baseline = storage.join(root, "data"), storage.join(root, "baseline")
    train, val, test = (load_split(data, s) for s in ("train", "val", "test"))
    synthetic = ImageSet.load(storage.join(root, "run", "filtered", "synthetic.npz"))
    recipe = retrain_recipe(cfg.retrain, model_url(baseline))
    base = load_classifier(model_url(baseline), "cpu")
    out: dict[str, Any] = dict(done or {})
    out[NO_SYN] = {"val": scores(base, val, train, cfg.data), "test": scores(base, test, train, cfg.data)}
    missing = [v for v in variants if v not in out]
    t0 = time.time()
    ref, ref_val_predictions = None, None
    # seeded: the same model every time; distillation learns from it, calibration is measured against it
    if SAME_STEPS not in out or any(VARIANT_SPECS[v].distill or VARIANT_SPECS[v].calibrated for v in missing):
        same = replace(cfg.retrain, epochs=same_steps_epochs(cfg.retrain.epochs, len(train), len(synthetic),
                                                             cfg.retrain.batch_size, cfg.retrain.synthetic_fraction))
        ref, _ = train_classifier(train, same, cfg.train.model, recipe=replace(recipe, prior="real"), desc="reference")
        out[SAME_STEPS] = {"val": scores(ref, val, train, cfg.data), "test": scores(ref, test, train, cfg.data)}
        ref_val_predictions = predict_logits(ref, val).argmax(1)  # calibration's yardstick, per image
    fits: dict[tuple, list[str]] = {}  # one training per (prior, fraction, distillation); heads re-fit after
    for v in missing:
        spec = VARIANT_SPECS[v]
        fits.setdefault((spec.prior, spec.fraction or cfg.retrain.synthetic_fraction, spec.distill, spec.weight),
                        []).append(v)
    for (prior, fraction, distill, weight), names in fits.items():
        clf, _ = train_classifier(train, cfg.retrain, cfg.train.model, synthetic=synthetic, synthetic_fraction=fraction,
                                  recipe=replace(recipe, prior=prior), desc="variant",
                                  teacher=ref if distill else None, distill_weight=weight,
                                  distill_temperature=DISTILL_TEMPERATURE, distill_classes=distill or "all")
        refitted = False
        # as trained first, then with the head re-fit; each calibrated after its uncalibrated self
        for v in sorted(names, key=lambda n: (VARIANT_SPECS[n].head, VARIANT_SPECS[n].calibrated)):
            spec = VARIANT_SPECS[v]
            if spec.head and not refitted:
                refit_head(clf, train, cfg.retrain, recipe, HEAD_EPOCHS)
                refitted = True
            out[v] = (calibrated_scores(clf, val, test, train, synthetic, fraction, replace(recipe, prior=prior), cfg.data,
                                        out[SAME_STEPS]["val"], ref_val_predictions, spec.tolerance)
                      if spec.calibrated
                      else {"val": scores(clf, val, train, cfg.data), "test": scores(clf, test, train, cfg.data)})
    out["seconds"] = round(out.get("seconds", 0.0) + time.time() - t0, 1)
    log(f"{dataset} seed {seed}: " + "; ".join(
        f"{v}: " + ", ".join(f"{k} {out[v]['test'][k] - out[SAME_STEPS]['test'][k]:+.3f}" for k in out[v]["test"])
        for v in missing) + f" (against the same-steps reference; {out['seconds']} s)")
    return out


def markdown(results: dict[str, dict[str, Any]], command: str, minutes: float) -> str:
    lines = ["# Which retraining keeps every class group? (issue 24, item 1)", "", "```", command, "```", "",
             (f"Wall time {minutes:.1f} min on this {os.cpu_count()}-CPU machine. " if minutes >= 0.05 else
              "Rendered from cached results (nothing trained by this command; the runs' times are above). ") +
             "Each dataset with its preset; every "
             "variant retrains from scratch on the same real and kept synthetic images of the seed's run "
             f"(benchmarks/no_group_loses.py); heads re-fit for {HEAD_EPOCHS} epochs on frozen features. Paired "
             "differences against no synthesis, mean over seeds and 95% bootstrap CI: against the same recipe on the "
             "real images with the retraining's optimiser steps (the fair reference, where the results have it), then "
             "against the baseline (the same loss and epochs).", ""]
    for dataset, by_seed in results.items():
        seeds = sorted(by_seed, key=int)
        cols = [k for k in KEYS if k in by_seed[seeds[0]][NO_SYN]["test"]]
        references = [r for r in (SAME_STEPS, NO_SYN) if all(r in by_seed[s] for s in seeds)]
        for reference in references:
            for split in ("test", "val"):
                lines += [f"## {dataset}, {split} split, against {reference} (seeds {', '.join(seeds)})", "",
                          f"| variant vs {reference} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
                for v in measured(by_seed, seeds):
                    cells = []
                    for c in cols:
                        mean, lo, hi = bootstrap_ci([by_seed[s][v][split][c] - by_seed[s][reference][split][c]
                                                     for s in seeds])
                        cells.append(f"{mean:+.3f} ({lo:+.3f} .. {hi:+.3f})")
                    lines.append(f"| {v} | " + " | ".join(cells) + " |")
                lines.append("")
            lines += [f"Against {reference}: " + validation_choice(by_seed, seeds, reference), "",
                      f"Against {reference}, item 1's goal read on validation: " + goal_choice(by_seed, seeds, reference,
                                                                    PRESET_VARIANT.get(dataset, "")), ""]
    return "\n".join(lines)


def measured(by_seed: dict[str, Any], seeds: list[str]) -> list[str]:
    """The variants every seed has (results cached before a variant was added lack it)."""
    return [v for v in VARIANTS if all(v in by_seed[s] for s in seeds)]


def validation_choice(by_seed: dict[str, Any], seeds: list[str], reference: str = NO_SYN) -> str:
    """The variant validation picks: among those no class group of which is below ``reference`` on
    validation (mean over seeds), the best mean validation gate metric (few, or worst_group); none
    when every variant loses a group (before 2026-12-05 it then took the best gate metric anyway)."""
    first = by_seed[seeds[0]][reference]["val"]
    metric = "few" if "few" in first else "worst_group"
    groups = [k for k in ("many", "medium", "few", "average_group", "worst_group", "majority_group") if k in first]
    rows = []
    for v in measured(by_seed, seeds):
        change = {k: float(np.mean([by_seed[s][v]["val"][k] - by_seed[s][reference]["val"][k] for s in seeds]))
                  for k in groups}
        rows.append((v, min(change.values()) >= 0, float(np.mean([by_seed[s][v]["val"][metric] for s in seeds]))))
    keeping = [r for r in rows if r[1]]
    # no variant keeps every group: none is chosen (no synthesis), as the pilot's no-go
    choice = (f"**{max(keeping, key=lambda r: r[2])[0]}** (val {metric} "
              f"{max(keeping, key=lambda r: r[2])[2]:.3f}; no class group below {reference} on validation)"
              if keeping else f"**none**: no variant keeps every class group on validation (stay with {reference})")
    return (f"Validation's choice: {choice}. Per variant: " + "; ".join(f"{v}: val {metric} {m:.3f}, every group kept: {'yes' if k else 'no'}"
                                             for v, k, m in rows) + ".")


GOAL_MARGIN = 0.005  # item 1: the many-shot (best-group) change at least -0.005, with a CI that shows it
# each dataset's preset, as a variant: the rule below moves a preset only on evidence (digits-gap's
# was "real prior + head + distillation 0.25" until round 13's rule added calibration, and is again
# since round 17's 30 seeds took it away: own_data_default_round17.md)
PRESET_VARIANT = {"digits-lt": "real prior + head on real",
                  "digits-gap": "real prior + head + distillation 0.25",
                  "digits-groups": "real prior (today)"}


def goal_choice(by_seed: dict[str, Any], seeds: list[str], reference: str = NO_SYN, preset: str = "") -> str:
    """Item 1's goal read on validation (round 12; ``validation_choice`` reads only means).

    1. A variant qualifies when its many-shot (with groups: majority-group) change has a 95% CI that
       starts at -``GOAL_MARGIN`` or above and no other class group is below ``reference`` on mean.
    2. A qualifying ``preset`` stays unless another qualifying variant beats it on the validation gate
       metric (few, or worst_group) with a paired CI above zero.
    3. Else the best qualifying variant on that metric; a variant whose paired difference from it has
       a CI including zero ties with it, and a tie goes to the fewest changes from the preset (so a
       preset does not move on one validation image).
    """
    first = by_seed[seeds[0]][reference]["val"]
    metric = "few" if "few" in first else "worst_group"
    protected = "majority_group" if "majority_group" in first else "many"
    others = [k for k in ("many", "medium", "few", "average_group", "worst_group") if k in first and k != protected]

    def diffs(v: str, w: str, k: str) -> list[float]:
        return [by_seed[s][v]["val"][k] - by_seed[s][w]["val"][k] for s in seeds]

    rows = {}
    for v in measured(by_seed, seeds):
        low = bootstrap_ci(diffs(v, reference, protected))[1]
        keeps = low >= -GOAL_MARGIN and all(float(np.mean(diffs(v, reference, k))) >= 0 for k in others)
        rows[v] = (keeps, low, float(np.mean([by_seed[s][v]["val"][metric] for s in seeds])))
    keeping = [v for v in rows if rows[v][0]]
    table = "; ".join(f"{v}: {low:+.3f}, {m:.3f}{'' if k else ' (out)'}" for v, (k, low, m) in rows.items())
    if not keeping:
        return f"**none**: no variant meets it on validation (stay with {reference}). Per variant, the val {protected} " \
               f"CI's lower end and val {metric}: {table}."

    def changes(v: str) -> int:
        return sum(a != b for a, b in zip(VARIANT_SPECS[v], VARIANT_SPECS[preset])) if preset in VARIANT_SPECS else 0

    if preset in keeping:
        better = [v for v in keeping if bootstrap_ci(diffs(v, preset, metric))[1] > 0]
        choice = max(better, key=lambda v: rows[v][2]) if better else preset
        why = (f"beats the preset ({preset}) on val {metric} with a CI above zero" if better
               else f"the preset qualifies and no variant beats it on val {metric} with a CI above zero")
    else:
        best = max(keeping, key=lambda v: rows[v][2])
        ties = [v for v in keeping if v == best or bootstrap_ci(diffs(v, best, metric))[1] <= 0]
        choice = min(ties, key=lambda v: (changes(v), -rows[v][2]))
        why = (f"the preset ({preset or 'none named'}) does not qualify; the best val {metric} is {best} "
               f"({rows[best][2]:.3f}); tied with it: {', '.join(ties)}; the fewest changes from the preset")
    return (f"**{choice}** (val {metric} {rows[choice][2]:.3f}): {why}. Per variant, the val {protected} CI's lower "
            f"end and val {metric}: {table}.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--datasets", nargs="+", default=["digits-gap", "digits-lt", "digits-groups"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="train only these (a cache is bound to the machine that made it: CPUs round differently)")
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: render what --work holds (a variant some seed lacks is left out)")
    args = p.parse_args(argv)
    session = Session()
    results = {}
    for dataset in args.datasets:  # one results file per dataset: datasets can run in parallel
        url = storage.join(args.work, f"variants-{dataset}.json")
        results[dataset] = storage.read_json(url) if storage.exists(url) else {}
        for seed in args.seeds:
            cached = up_to_date(results[dataset].get(str(seed), {}))
            if any(v not in cached for v in args.variants) and not args.cached_only:  # a seed gets only what it lacks
                results[dataset][str(seed)] = run_seed(args.work, dataset, seed, session.log, cached,
                                                       tuple(args.variants))
                storage.write_json(url, results[dataset])
    chosen = {d: {str(s): results[d][str(s)] for s in args.seeds} for d in args.datasets}
    return session.finish(markdown(chosen, session.command, session.minutes()), chosen, args.out)

if __name__ == "__main__":
    raise SystemExit(main())
