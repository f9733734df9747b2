"""Benchmark: adapting the generator where the task's style is far from the generator's pool.

    python benchmarks/digits_gap.py --work /tmp/bench/gap [--seeds 0 1 2] [--epochs 20] [--adapt-steps 200]
    python benchmarks/digits_gap.py --work /tmp/bench/lt-adapt --dataset digits-lt --rows ...   # where the gap is small

The built-in ``digits-gap`` (digits-lt's counts and generator pool, task images in ``gap_style``).
Per seed (paired: the seed fixes ``data.split_seed``, the baseline, the real start images and the
shard seeds of every row), with logit adjustment (tau 2) in the baseline and the retraining:

- logit adjustment alone (no synthesis);
- + synthesis from the unadapted generator, entropy-guided;
- + synthesis from the adapted generator (full fine-tune, class condition dropped), unguided and
  entropy-guided;
- + synthesis from the generator adapted with its class condition kept (the diversity variant);
- + synthesis from the generator adapted with LoRA (rank 8, attention + resnet convs, lr 1e-3);
- the oracle (balanced real task data).

Columns: test overall and few-shot accuracy; the gap of the generated images (off-support share,
real-vs-synthetic discriminator accuracy) and the near-copy share of the kept ones; paired
differences in few-shot accuracy with 95% bootstrap CIs over seeds. A re-run with the same
``--work`` resumes (every stage is fingerprinted). Results: ``<work>/results.json`` and a Markdown
table on stdout (and ``--markdown FILE``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any, Optional

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from feedback_synth import storage  # noqa: E402
from feedback_synth.config import resolve_run_config  # noqa: E402
from feedback_synth.data.imageset import load_split  # noqa: E402
from feedback_synth.orchestration.run import synthesis_rounds  # noqa: E402
from feedback_synth.orchestration.shared import RunLayout  # noqa: E402
from feedback_synth.stages.adapt_generator import adapt_generator  # noqa: E402
from feedback_synth.stages.outputs import model_url  # noqa: E402
from feedback_synth.stages.prepare_data import prepare_data  # noqa: E402
from feedback_synth.stages.train_baseline import train_baseline  # noqa: E402
from feedback_synth.tracking.base import NullTracker  # noqa: E402
from feedback_synth.training.classifier import load_classifier  # noqa: E402
from feedback_synth.training.evaluate import evaluate, summary  # noqa: E402
from feedback_synth.training.train import Recipe, train_classifier  # noqa: E402

# name -> (adapt changes or None, generate changes)
ROWS: dict[str, tuple[Any, dict[str, Any]]] = {
    "unadapted, entropy": (None, {"criterion": "entropy"}),
    "adapted (drop class), unguided": ({"class_condition": "drop"}, {"criterion": "none"}),
    "adapted (drop class), entropy": ({"class_condition": "drop"}, {"criterion": "entropy"}),
    "adapted (keep class), entropy": ({"class_condition": "keep"}, {"criterion": "entropy"}),
    "adapted LoRA (drop class), entropy": ({"class_condition": "drop", "method": "lora", "lr": 1e-3},
                                           {"criterion": "entropy"}),
}
PAIRS = [("adapted (keep class), entropy", "logit adjustment alone"),
         ("adapted (keep class), entropy", "unadapted, entropy"),
         ("adapted (drop class), entropy", "logit adjustment alone"),
         ("adapted (drop class), entropy", "unadapted, entropy"),
         ("adapted (drop class), unguided", "logit adjustment alone"),
         ("adapted (drop class), entropy", "adapted (drop class), unguided"),
         ("adapted (keep class), entropy", "adapted (drop class), entropy"),
         ("adapted LoRA (drop class), entropy", "adapted (drop class), entropy"),
         ("unadapted, entropy", "logit adjustment alone")]


def bootstrap_ci(diffs: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    d = np.asarray(diffs, np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), (n, len(d)))].mean(1)
    return float(d.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def run_seed(work: str, seed: int, epochs: int, adapt_steps: int, log, dataset: str = "digits-gap",
             rows: Optional[list[str]] = None) -> dict[str, dict[str, Any]]:
    cfg = resolve_run_config(dataset, overrides=[f"data.split_seed={seed}", f"train.epochs={epochs}",
                                                      f"retrain.epochs={epochs}", f"train.seed={seed}",
                                                      f"retrain.seed={seed}", f"generate.seed={seed}",
                                                      f"adapt.steps={adapt_steps}", f"adapt.seed={seed}",
                                                      "tracking.enabled=false"])
    root = storage.join(work, f"seed{seed}")
    data, baseline = storage.join(root, "data"), storage.join(root, "baseline")
    prepare_data(cfg.data, data)
    train_baseline(data, baseline, cfg.train, cfg.data)
    test = load_split(data, "test")
    out = {"logit adjustment alone": summary(evaluate(load_classifier(model_url(baseline), "auto"), test, cfg.data))}
    for name, (adapt_changes, gen_changes) in ROWS.items():
        if rows and name not in rows:
            continue
        t0 = time.time()
        gen_cfg = replace(cfg.generate, **gen_changes)
        if adapt_changes is not None:
            adapt_cfg = replace(cfg.adapt, **{"method": "full", **adapt_changes})
            tag = "-".join(f"{k}{v}" for k, v in sorted(adapt_changes.items()))
            adapted = adapt_generator(data, model_url(baseline), storage.join(root, f"adapted-{tag}"),
                                             adapt_cfg, cfg.generate)
            gen_cfg = replace(gen_cfg, generator=adapted.summary["generator"])
        row_cfg = replace(cfg, generate=gen_cfg)
        layout = RunLayout(storage.join(root, name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")))
        _, retrained, filtered = synthesis_rounds(row_cfg, layout, data, baseline, NullTracker())
        m = summary(evaluate(load_classifier(model_url(retrained), "auto"), test, cfg.data))
        report = storage.read_json(storage.join(filtered, "filter_report.json"))
        g = report.get("gap", {})
        m.update(generated=report["generated"], kept=report["kept"], seconds=round(time.time() - t0, 1),
                 off_support=g.get("off_support", {}).get("overall"),
                 discriminator=g.get("discriminator", {}).get("overall"),
                 near_copy=g.get("near_copy", {}).get("overall"),
                 near_copy_few=_few_mean(g.get("near_copy", {}).get("per_class"), report, cfg.data.few_threshold, data),
                 off_support_per_class=g.get("off_support", {}).get("per_class"))
        out[name] = m
        log(f"seed {seed} {name}: few {m['few']:.3f} overall {m['overall']:.3f} off-support {m['off_support']} "
            f"near-copy {m['near_copy']} ({m['seconds']} s)")
    clf, _ = train_classifier(load_split(data, "oracle"), cfg.retrain, cfg.train.model, recipe=Recipe("ce"),
                              desc="oracle")
    out["oracle"] = summary(evaluate(clf, test, cfg.data))
    return out


def _few_mean(per_class, report, few_threshold: int, data: str):
    from feedback_synth.data.imageset import load_info

    if not per_class:
        return None
    counts = load_info(data).train_class_counts
    values = [v for v, n in zip(per_class, counts) if n <= few_threshold and v is not None]
    return float(np.mean(values)) if values else None


def table(results: dict[str, dict[str, dict[str, Any]]], title: str = "digits-gap") -> str:
    seeds = sorted(results, key=int)
    rows = ["logit adjustment alone", *ROWS, "oracle"]
    lines = [f"{title}, seeds: {', '.join(seeds)}", "",
             "| setting | overall | few | off-support (generated) | discriminator (0.5 = same) | near-copy (kept) | "
             "near-copy, few-shot classes | kept / generated |", "|---|---|---|---|---|---|---|---|"]

    def ms(name: str, key: str) -> str:
        v = [results[s][name].get(key) for s in seeds if name in results[s]]
        v = [x for x in v if x is not None]
        return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "-"

    for name in rows:
        if not all(name in results[s] for s in seeds):
            continue
        kept = ("-" if "kept" not in results[seeds[0]][name] else
                f"{np.mean([results[s][name]['kept'] for s in seeds]):.0f} / "
                f"{np.mean([results[s][name]['generated'] for s in seeds]):.0f}")
        lines.append(f"| {name} | {ms(name, 'overall')} | {ms(name, 'few')} | {ms(name, 'off_support')} | "
                     f"{ms(name, 'discriminator')} | {ms(name, 'near_copy')} | {ms(name, 'near_copy_few')} | {kept} |")
    lines += ["", "Paired differences (95% bootstrap CI over seeds):", ""]
    for a, b in PAIRS:
        for key in ("few", "overall"):
            d = [results[s][a][key] - results[s][b][key] for s in seeds if a in results[s] and b in results[s]]
            if d:
                mean, lo, hi = bootstrap_ci(d)
                verdict = "excludes 0" if lo > 0 or hi < 0 else "includes 0"
                lines.append(f"- {a} vs {b}, {key}: {mean:+.3f} ({lo:+.3f} .. {hi:+.3f}, {verdict})")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--adapt-steps", type=int, default=200)
    p.add_argument("--markdown", default="")
    p.add_argument("--dataset", default="digits-gap", help="digits-gap, or digits-lt (adaptation where the gap is small)")
    p.add_argument("--rows", nargs="*", default=None, help="only these synthesis rows (default: all)")
    args = p.parse_args()
    os.environ.setdefault("FEEDBACK_SYNTH_CACHE", os.path.join(args.work, "cache"))
    path = os.path.join(args.work, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    t0 = time.time()
    for seed in args.seeds:
        if str(seed) in results:
            continue
        results[str(seed)] = run_seed(args.work, seed, args.epochs, args.adapt_steps,
                                      lambda m: print(m, flush=True), args.dataset, args.rows)
        os.makedirs(args.work, exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(table(results, args.dataset), flush=True)
    text = table(results, args.dataset) + f"\nwall time of this invocation: {(time.time() - t0) / 60:.1f} min\n"
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
