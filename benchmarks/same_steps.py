"""Benchmark: is synthesis' gain more than the extra optimiser steps it brings?

    python benchmarks/same_steps.py --work /tmp/bench/ngl [--datasets digits-lt digits-gap digits-groups]
        [--seeds 0 1 2 3 4] [--out benchmarks/results/same_steps]

Retraining draws half of each batch from the synthetic images and counts an epoch as one pass over
the real ones, so at the same ``epochs`` it takes twice the optimiser steps of the model without
synthesis that the run compares it with (the baseline). This trains that reference again with the
same number of steps (``train.epochs = retrain.epochs / (1 - retrain.synthetic_fraction)``, the same
recipe otherwise) and compares the retrained model with both references, paired by seed.

Runs on the folders that ``benchmarks/no_group_loses.py`` left in ``--work`` (its ``results.json``
holds the retrained and baseline test metrics; each seed's ``data`` is read from there), so run that
first with the same datasets and seeds. A re-run resumes (the extra models are fingerprinted).
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

from no_group_loses import NO_SYN, difference_row, metrics_of  # noqa: E402

from feedback_synth import storage  # noqa: E402
from feedback_synth.config import resolve_run_config  # noqa: E402
from feedback_synth.data.imageset import load_split  # noqa: E402
from feedback_synth.stages.outputs import model_url  # noqa: E402
from feedback_synth.stages.train_baseline import train_baseline  # noqa: E402
from feedback_synth.training.classifier import load_classifier  # noqa: E402
from feedback_synth.training.evaluate import predict_logits  # noqa: E402

RETRAINED = "retrained, as trained"
SAME = "no synthesis, same steps"


def same_steps_seed(work: str, dataset: str, seed: int) -> tuple[dict[str, float], int]:
    """Train (or resume) the no-synthesis reference with the retraining's optimiser steps; its test
    metrics and epochs."""
    cfg = resolve_run_config(dataset, overrides=[f"data.split_seed={seed}", f"train.seed={seed}", "tracking.enabled=false"])
    epochs = int(round(cfg.retrain.epochs / (1 - cfg.retrain.synthetic_fraction)))
    root = storage.join(work, dataset, f"seed{seed}")
    data, out = storage.join(root, "data"), storage.join(root, f"baseline_{epochs}_epochs")
    train_baseline(data, out, replace(cfg.train, epochs=epochs), cfg.data)
    test, train = load_split(data, "test"), load_split(data, "train")
    return metrics_of(predict_logits(load_classifier(model_url(out), "cpu"), test), test, train, cfg.data), epochs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--datasets", nargs="+", default=["digits-lt", "digits-gap", "digits-groups"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--out", help="write OUT.md and OUT.json")
    a = p.parse_args()
    t0 = time.time()
    found = storage.join(a.work, "results.json")
    earlier = storage.read_json(found) if storage.exists(found) else {}
    missing = [f"{d} seed {s}" for d in a.datasets for s in a.seeds if str(s) not in earlier.get(d, {})]
    if missing:
        sys.exit(f"same_steps: {found} has no results for {', '.join(missing)}: run benchmarks/no_group_loses.py "
                 f"--work {a.work} with the same --datasets and --seeds first")
    results: dict[str, dict[str, Any]] = {}
    for dataset in a.datasets:
        for seed in a.seeds:
            rows = earlier[dataset][str(seed)]
            metrics, epochs = same_steps_seed(a.work, dataset, seed)
            results.setdefault(dataset, {})[str(seed)] = {NO_SYN: rows[NO_SYN], SAME: metrics, RETRAINED: rows[RETRAINED],
                                                          "epochs": epochs}
            print(f"{dataset} seed {seed}: {SAME} ({epochs} epochs) " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()),
                  flush=True)
    command = "python benchmarks/same_steps.py " + " ".join(sys.argv[1:])
    text = markdown(results, command, (time.time() - t0) / 60)
    print(text)
    if a.out:
        storage.write_json(a.out + ".json", {"command": command, "results": results})
        with open(a.out + ".md", "w") as f:
            f.write(text)
    return 0


def markdown(results: dict[str, dict[str, Any]], command: str, minutes: float) -> str:
    lines = ["# Synthesis against the same number of optimiser steps", "", f"Command ({minutes:.1f} min):", "", "```",
             command, "```", ""]
    for dataset, by_seed in results.items():
        seeds = sorted(by_seed, key=int)
        cols = [c for c in ("overall", "many", "medium", "few", "worst_group", "majority_group")
                if c in by_seed[seeds[0]][NO_SYN]]
        epochs = by_seed[seeds[0]]["epochs"]
        lines += [f"## {dataset} (seeds {', '.join(seeds)}; the same-steps reference trains {epochs} epochs)", "",
                  "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for row in (NO_SYN, SAME, RETRAINED):
            lines.append(f"| {row} | " + " | ".join(
                f"{np.mean([by_seed[s][row][c] for s in seeds]):.3f}" for c in cols) + " |")
        lines += ["", "| difference (95% bootstrap CI over seeds) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [difference_row(by_seed, seeds, a, b, cols)
                  for a, b in ((RETRAINED, NO_SYN), (RETRAINED, SAME), (SAME, NO_SYN))]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
