"""Benchmark: does the classifier's feedback still help once the generator is adapted?
(issue 24, item 3)

    python benchmarks/guidance_after_adaptation.py --work /tmp/bench/ngl [--seeds 0 1 2 3 4]
        [--criteria none entropy loss hardness] [--out benchmarks/results/guidance_after_adaptation]

Runs on the folders ``benchmarks/no_group_loses.py`` left in ``--work`` for digits-gap (its
preset: the generator adapted with ``adapt.method: full``, class condition kept), so every row
shares the seed's data, baseline and adapted generator (paired by seed). Per criterion, at the
same budget and SDEdit strength: feedback, generation, filtering and retraining with today's
preset (its adaptation steps and retraining). Rows: test overall, many / medium / few-shot;
paired differences of each guided criterion against unguided (``none``), 95% bootstrap CIs, on
test and on validation (a choice reads validation; test replicates).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from synthesis_benchmark import Session, bootstrap_ci  # noqa: E402  (the benchmarks' shared parts)

from feedback_synth import storage  # noqa: E402
from feedback_synth.config import resolve_run_config  # noqa: E402
from feedback_synth.data.imageset import load_split  # noqa: E402
from feedback_synth.orchestration.run import synthesis_rounds  # noqa: E402
from feedback_synth.orchestration.shared import RunLayout  # noqa: E402
from feedback_synth.stages.outputs import model_url  # noqa: E402
from feedback_synth.tracking.base import NullTracker  # noqa: E402
from feedback_synth.training.classifier import load_classifier  # noqa: E402
from feedback_synth.training.evaluate import evaluate, summary  # noqa: E402

DATASET = "digits-gap"
KEYS = ("overall", "many", "medium", "few")


def run_seed(work: str, seed: int, criteria: list[str], log) -> dict[str, Any]:
    cfg = resolve_run_config(DATASET, overrides=[f"data.split_seed={seed}", f"train.seed={seed}",
                                                 f"retrain.seed={seed}", f"generate.seed={seed}", f"adapt.seed={seed}",
                                                 "tracking.enabled=false"])
    root = storage.join(work, DATASET, f"seed{seed}")
    data, baseline, adapted = (storage.join(root, n) for n in ("data", "baseline", "adapted"))
    splits = {"test": load_split(data, "test"), "val": load_split(data, "val")}

    def scores(model: str) -> dict[str, float]:
        # test under its own names, validation under val_*: a choice reads validation, test replicates
        classifier = load_classifier(model_url(model), "cpu")
        m = summary(evaluate(classifier, splits["test"], cfg.data))
        m.update({f"val_{k}": v for k, v in summary(evaluate(classifier, splits["val"], cfg.data)).items()})
        return m

    out: dict[str, Any] = {"no synthesis": scores(baseline)}
    for criterion in criteria:
        t0 = time.time()
        row_cfg = replace(cfg, generate=replace(cfg.generate, criterion=criterion))
        layout = RunLayout(storage.join(root, f"criterion-{criterion}"), cfg.feedback.rounds)
        _, retrained, filtered = synthesis_rounds(row_cfg, layout, data, baseline, NullTracker(), adapted=adapted)
        m = scores(retrained)
        report = storage.read_json(storage.join(filtered, "filter_report.json"))
        m.update(generated=report["generated"], kept=report["kept"], seconds=round(time.time() - t0, 1))
        out[criterion] = m
        log(f"seed {seed} {criterion}: " + ", ".join(f"{k} {m[k]:.3f}" for k in KEYS if k in m)
            + f", kept {m['kept']}/{m['generated']} ({m['seconds']} s)")
    return out


def markdown(results: dict[str, Any], criteria: list[str], command: str, minutes: float) -> str:
    seeds = sorted(results, key=int)
    lines = ["# Guidance after adaptation (issue 24, item 3)", "", "```", command, "```", "",
             f"digits-gap with its preset (generator adapted, class condition kept; SDEdit strength 0.8, scale 0.03 "
             f"for the guided rows; the preset's adaptation steps and retraining), seeds {', '.join(seeds)}; wall time {minutes:.1f} "
             f"min on this {os.cpu_count()}-CPU machine. Test split, mean ± std over seeds.", "",
             "| row | " + " | ".join(KEYS) + " | kept / generated |", "|---|" + "---|" * (len(KEYS) + 1)]
    for row in ["no synthesis", *criteria]:
        cells = [f"{np.mean([results[s][row][k] for s in seeds]):.3f} ± {np.std([results[s][row][k] for s in seeds]):.3f}"
                 for k in KEYS]
        kept = ("-" if row == "no synthesis" else f"{np.mean([results[s][row]['kept'] for s in seeds]):.0f} / "
                f"{np.mean([results[s][row]['generated'] for s in seeds]):.0f}")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {kept} |")
    pairs = [(c, "none") for c in criteria if c != "none"] + [(c, "no synthesis") for c in criteria]
    for split, prefix in (("test", ""), ("validation", "val_")):
        if not all(prefix + k in results[s][row] for s in seeds for row in ["no synthesis", *criteria] for k in KEYS):
            continue  # results from before validation was scored
        lines += ["", f"Paired differences on {split} (95% bootstrap CI over seeds):", "",
                  "| comparison | " + " | ".join(KEYS) + " |", "|---|" + "---|" * len(KEYS)]
        for a, b in pairs:
            cells = []
            for k in KEYS:
                mean, lo, hi = bootstrap_ci([results[s][a][prefix + k] - results[s][b][prefix + k] for s in seeds])
                cells.append(f"{mean:+.3f} ({lo:+.3f} .. {hi:+.3f})")
            lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--criteria", nargs="+", default=["none", "entropy", "loss", "hardness"])
    p.add_argument("--out")
    args = p.parse_args(argv)
    session = Session()
    url = storage.join(args.work, "guidance.json")
    results = storage.read_json(url) if storage.exists(url) else {}
    for seed in args.seeds:
        done = results.get(str(seed), {})
        if not all(c in done for c in args.criteria):
            results[str(seed)] = {**done, **run_seed(args.work, seed, [c for c in args.criteria if c not in done],
                                                     session.log)}
            storage.write_json(url, results)
    chosen = {str(s): results[str(s)] for s in args.seeds}
    return session.finish(markdown(chosen, args.criteria, session.command, session.minutes()), chosen, args.out)

if __name__ == "__main__":
    raise SystemExit(main())
