"""Benchmark: does adaptation copy the rarest classes, and do the near-copy filter and the copy
guard stop it (issue 24, "No copies"; docs/method.md: Copies).

    python benchmarks/copies.py --work /tmp/bench/copies [--seeds 0 1 2] [--epochs 8] [--adapt-steps 600]

The case: ``digits-rare`` (benchmark-only, ``data.digits.make_digits_rare``): digits-gap whose
few-shot classes (7, 8, 9: 4, 2, 2 train images) are drawn in a style of their own (digits-lt's
thick italic light-on-black), which neither the generator's pool nor any other class has. The
digits-gap preset's recipe (logit adjustment tau 2 in baseline and retraining, entropy guidance
s = 0.03 every 5th step, SDEdit strength 0.8, full budget), the bundled digits generator adapted
with ``adapt.method=full`` (class condition kept, class-balanced) for ``--adapt-steps``.
Per seed (paired: the seed fixes ``data.split_seed``, the baseline, the start images and the shard
seeds of every row):

- logit adjustment alone (no synthesis);
- adapted, filters before this change (degenerate, near_duplicate, off_support; no near_copy);
- the same generated images, the new default filters (near_copy first);
- guarded adaptation (early stop on the near-copy share, ``adapt.copy_check_every`` 50), new filters;
- with ``--guard-alone``: guarded adaptation, filters before (the guard alone).

Per row: test overall / few-shot accuracy, per class the near-copy share of the generated images
(what ``near_copy`` drops, after ``degenerate``) and of the kept ones, kept / generated; paired
differences vs logit adjustment alone with 95% bootstrap CIs over seeds. Writes
``<work>/results.json`` and, with ``--out PREFIX``, ``PREFIX.md`` and ``PREFIX.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from feedback_synth import storage  # noqa: E402
from feedback_synth.config import resolve_run_config  # noqa: E402
from feedback_synth.data.digits import make_digits_rare  # noqa: E402
from feedback_synth.data.imageset import DatasetInfo, load_split  # noqa: E402
from feedback_synth.generation.loading import builtin_generator_path  # noqa: E402
from feedback_synth.orchestration.run import synthesis_rounds  # noqa: E402
from feedback_synth.orchestration.shared import RunLayout  # noqa: E402
from feedback_synth.stages.adapt_generator import adapt_generator  # noqa: E402
from feedback_synth.stages.outputs import model_url  # noqa: E402
from feedback_synth.stages.train_baseline import train_baseline  # noqa: E402
from feedback_synth.tracking.base import NullTracker  # noqa: E402
from feedback_synth.training.classifier import load_classifier  # noqa: E402
from feedback_synth.training.evaluate import evaluate, summary  # noqa: E402

OLD_FILTERS = ["degenerate", "near_duplicate", "off_support"]
BASE = "logit adjustment alone"
# name -> (guarded adaptation?, filters or None for the default, reuse the generation of this row)
ROWS: dict[str, tuple[bool, Any, Any]] = {
    "adapted, filters before": (False, OLD_FILTERS, None),
    "adapted, near_copy filter": (False, None, "adapted, filters before"),
    "guarded adaptation, near_copy filter": (True, None, None),
    "guarded adaptation, filters before": (True, OLD_FILTERS, "guarded adaptation, near_copy filter"),
}


def bootstrap_ci(diffs: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    d = np.asarray(diffs, np.float64)
    means = d[np.random.default_rng(seed).integers(0, len(d), (n, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def write_dataset(url: str, seed: int) -> None:
    """digits-rare's splits as a prepared data folder (what ``prepare_data`` writes)."""
    if storage.exists(storage.join(url, "info.json")):
        return
    splits = make_digits_rare(seed)
    train = splits["train"]
    for split, data in splits.items():
        data.save(storage.join(url, f"{split}.npz"))
    info = DatasetInfo(name="digits-rare", class_names=train.class_names, group_names=train.group_names,
                       splits=list(splits), train_class_counts=train.class_counts().tolist(),
                       image_shape=list(train.images.shape[1:]))
    storage.write_json(storage.join(url, "info.json"), info.__dict__)


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace(",", "")


def run_seed(work: str, seed: int, epochs: int, adapt_steps: int, log, guard_alone: bool = False
             ) -> dict[str, dict[str, Any]]:
    cfg = resolve_run_config("digits-gap", overrides=[
        f"data.split_seed={seed}", f"train.epochs={epochs}", f"retrain.epochs={epochs}", f"train.seed={seed}",
        f"retrain.seed={seed}", f"generate.seed={seed}", f"adapt.steps={adapt_steps}", f"adapt.seed={seed}",
        "adapt.method=full", f"generate.generator={builtin_generator_path('digits-lt')}", "tracking.enabled=false"])
    root = storage.join(work, f"seed{seed}")
    data, baseline = storage.join(root, "data"), storage.join(root, "baseline")
    write_dataset(data, seed)
    train_baseline(data, baseline, cfg.train, cfg.data)
    test, train = load_split(data, "test"), load_split(data, "train")
    counts = train.class_counts().tolist()
    out: dict[str, dict[str, Any]] = {
        BASE: summary(evaluate(load_classifier(model_url(baseline), "auto"), test, cfg.data))}
    adapted: dict[bool, str] = {}
    for guarded in (False, True):
        t0 = time.time()
        adapt_cfg = replace(cfg.adapt, copy_check_every=50 if guarded else 0)  # the guard is off by default
        folder = storage.join(root, "adapted-guarded" if guarded else "adapted")
        adapt_generator(data, model_url(baseline), folder, adapt_cfg, cfg.generate)
        adapted[guarded] = folder
        rep = storage.read_json(storage.join(folder, "adapt_report.json"))
        log(f"seed {seed} adaptation ({'guarded' if guarded else 'unguarded'}): copy guard "
            f"{(rep.get('copy_guard') or {}).get('stopped_at', 'off') if guarded else 'off'} "
            f"({time.time() - t0:.0f} s)")
    for name, (guarded, filters, reuse) in ROWS.items():
        if name == "guarded adaptation, filters before" and not guard_alone:
            continue
        t0 = time.time()
        row_cfg = replace(cfg, adapt=cfg.adapt if guarded else replace(cfg.adapt, copy_check_every=0),
                          filter=replace(cfg.filter, filters=filters) if filters else cfg.filter)
        layout = RunLayout(storage.join(root, _slug(name)))
        if reuse:  # the same generated images, filtered otherwise: feedback and generation resume
            for stage in ("feedback", "generated"):
                src, dst = os.path.join(root, _slug(reuse), stage), os.path.join(layout.output, stage)
                if not os.path.exists(dst):
                    shutil.copytree(src, dst)
        _, retrained, filtered = synthesis_rounds(row_cfg, layout, data, baseline, NullTracker(),
                                                  adapted=adapted[guarded])
        m = summary(evaluate(load_classifier(model_url(retrained), "auto"), test, cfg.data))
        report = storage.read_json(storage.join(filtered, "filter_report.json"))
        pcs = report["per_class"]
        m.update(generated=report["generated"], kept=report["kept"], seconds=round(time.time() - t0, 1),
                 kept_near_copy=report["kept_near_copy"]["per_class"], copy_classes=report["copy_classes"],
                 starved=report["starved"],
                 generated_near_copy=[pc["dropped"].get("near_copy", 0) / pc["generated"] if pc["generated"] and
                                      "near_copy" in pc["dropped"] else None for pc in pcs.values()],
                 kept_per_class=[pc["kept"] for pc in pcs.values()])
        if guarded:
            m["guard_stopped_at"] = (storage.read_json(storage.join(adapted[guarded], "adapt_report.json"))
                                     .get("copy_guard") or {}).get("stopped_at")
        out[name] = m
        log(f"seed {seed} {name}: few {m['few']:.3f} overall {m['overall']:.3f} kept {m['kept']}/{m['generated']} "
            f"near-copy kept (rare classes) {[_r(v) for v, n in zip(m['kept_near_copy'], counts) if n <= 5]} "
            f"({m['seconds']} s)")
    out["train_class_counts"] = counts
    return out


def _r(v):
    return None if v is None else round(v, 2)


def _fmt(values: list) -> str:
    v = [x for x in values if x is not None]
    return f"{np.mean(v):.2f}" if v else "-"


def table(results: dict[str, Any], command: str) -> str:
    seeds = sorted(results, key=int)
    counts = results[seeds[0]]["train_class_counts"]
    names = [str(c) for c in range(len(counts))]
    lines = ["# Copies: the near-copy filter and the adaptation guard on digits-rare", "",
             f"Command: `{command}`", "", f"Seeds: {', '.join(seeds)} (paired). Train images per class: "
             + ", ".join(f"{n}: {k}" for n, k in zip(names, counts)) + ".", "",
             "| setting | overall | few | kept / generated | max near-copy share kept, any class | "
             "near-copy share kept, classes " + ", ".join(n for n, k in zip(names, counts) if k <= 5)
             + " | guard stopped at step |", "|---|---|---|---|---|---|---|"]
    rare = [c for c, k in enumerate(counts) if k <= 5]
    for name in [BASE, *ROWS]:
        rows = [results[s][name] for s in seeds if name in results[s]]
        if len(rows) != len(seeds):
            continue
        acc = " | ".join(f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}"
                         for k in ("overall", "few"))
        if name == BASE:
            lines.append(f"| {name} | {acc} | - | - | - | - |")
            continue
        kept = f"{np.mean([r['kept'] for r in rows]):.0f} / {np.mean([r['generated'] for r in rows]):.0f}"
        mx = max(max(v for v in r["kept_near_copy"] if v is not None) for r in rows)
        per = ", ".join(_fmt([r["kept_near_copy"][c] for r in rows]) for c in rare)
        stop = ", ".join(str(r.get("guard_stopped_at")) for r in rows) if "guard_stopped_at" in rows[0] else "-"
        lines.append(f"| {name} | {acc} | {kept} | {mx:.2f} | {per} | {stop} |")
    lines += ["", "Near-copy share of the *generated* images per class (what near_copy drops, after degenerate), "
              "mean over seeds:", "", "| adaptation | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, name in (("unguarded", "adapted, near_copy filter"), ("guarded", "guarded adaptation, near_copy filter")):
        rows = [results[s][name] for s in seeds if name in results[s]]
        if rows:
            lines.append(f"| {label} | " + " | ".join(_fmt([r["generated_near_copy"][c] for r in rows])
                                                     for c in range(len(names))) + " |")
    lines += ["", f"Paired differences vs {BASE} (mean, 95% bootstrap CI over seeds):", ""]
    for name in ROWS:
        for key in ("few", "overall"):
            d = [results[s][name][key] - results[s][BASE][key] for s in seeds if name in results[s]]
            if d:
                mean, lo, hi = bootstrap_ci(d)
                lines.append(f"- {name}, {key}: {mean:+.3f} ({lo:+.3f} .. {hi:+.3f}; per seed "
                             + ", ".join(f"{x:+.3f}" for x in d) + ")")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--adapt-steps", type=int, default=600)
    p.add_argument("--out", default="", help="write PREFIX.md and PREFIX.json")
    p.add_argument("--guard-alone", action="store_true", help="also the guarded adaptation under the old filters")
    args = p.parse_args()
    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    os.environ.setdefault("FEEDBACK_SYNTH_CACHE", os.path.join(args.work, "cache"))
    path = os.path.join(args.work, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    t0 = time.time()
    for seed in args.seeds:
        if str(seed) in results:
            continue
        results[str(seed)] = run_seed(args.work, seed, args.epochs, args.adapt_steps, lambda m: print(m, flush=True),
                                      args.guard_alone)
        os.makedirs(args.work, exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    text = table(results, command) + f"\nWall time of this invocation: {(time.time() - t0) / 60:.1f} min.\n"
    print(text)
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump({"command": command, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
