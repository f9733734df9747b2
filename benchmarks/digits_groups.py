"""The group-imbalance table on the built-in digits-groups (issue: NICO++-style groups).

Rows: baseline cross-entropy; group reweighting (inverse (class, group) frequency in the loss, the
classic remedy without generation); class-conditional samples with no real conditioning; samples
conditioned on real images of the (class, group) cell (no feedback); the same plus feedback per
criterion; each generating row at the full and at half budget of the per-cell rule; an oracle on
group-balanced real task data. Mean ± std over seeds. Row functions come from digits_lt.py.
``--tune`` first chooses strength and scale on the validation split (worst-group accuracy, then
overall), never on the test set.

    python benchmarks/digits_groups.py --seeds 0 1 2 --tune    # ~25 min on 2 idle CPU cores
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dataclasses import replace  # noqa: E402

from digits_lt import add_tuning_arguments, fmt, generation_settings, plain_row, synthesis_row, tune  # noqa: E402

from feedback_synth import storage
from feedback_synth.config import (
    load_run_config,  # noqa: E402
    preset,  # noqa: E402
)
from feedback_synth.pipeline import stages  # noqa: E402
from feedback_synth.training.evaluate import summary  # noqa: E402

COLUMNS = ("overall", "average_group", "worst_group", "worst_class")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_tuning_arguments(p, scales=[0.01, 0.02, 0.05], strengths=[0.6, 0.8], what="strength and scale")
    p.add_argument("--set", action="append", default=[], help="config override for every row")
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--output", default="benchmarks/results/digits_groups.md")
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    cfg = load_run_config(base=preset("digits-groups"), overrides=["tracking.enabled=false", *args.set])
    work = args.work or tempfile.mkdtemp(prefix="fs-bench-groups-")
    t_start = time.time()
    data_url = storage.join(work, "data")
    stages.prepare_data(cfg.data, data_url)
    tune_lines: list[str] = []
    if args.tune:
        best, tune_lines = tune(work, data_url, cfg, args.scales, args.everys, args.strengths, args.tune_criterion,
                                metric="worst_group", columns=COLUMNS)
        cfg.generate = replace(cfg.generate, **best)
        print(f"chosen on validation: {best}", flush=True)
    rows: dict[str, list[dict]] = {}

    def add(name: str, m: dict) -> None:
        rows.setdefault(name, []).append(m)
        print(f"[{time.time() - t_start:6.0f}s] {name}: " + ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items()), flush=True)

    full = cfg.feedback.budget_fraction
    for seed in args.seeds:
        base = storage.join(work, f"seed{seed}", "baseline")
        stages.train_baseline(data_url, base, cfg.train.__class__(**{**cfg.train.__dict__, "seed": seed}), cfg.data)
        add("baseline (cross-entropy)", summary(storage.read_json(storage.join(base, "metrics.json"))))
        add("group reweighting (no generation)", plain_row(data_url, "train", cfg, seed, loss="group_reweighted"))
        for name, g in generation_settings(cfg).items():
            for budget, label in ((full, "full"), (full / 2, "half")):
                row = f"{name}, {label} budget"
                slug = f"seed{seed}/{row}".replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
                add(row, synthesis_row(slug, work, data_url, base, cfg, g, budget, seed))
        add("oracle (group-balanced real task data)", plain_row(data_url, "oracle", cfg, seed))

    header = ["setting", *COLUMNS, "fidelity", "generated", "kept"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, ms in rows.items():
        cells = [fmt([m.get(c) for m in ms]) for c in COLUMNS] + [fmt([m.get("fidelity") for m in ms])]
        for c in ("generated", "kept"):
            cells.append(str(int(np.mean([m[c] for m in ms]))) if c in ms[0] else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    g = cfg.generate
    storage.write_text(args.output, "\n".join([
        "# digits-groups benchmark\n", f"Command: `{command}`  ",
        f"Seeds: {args.seeds}; wall time {(time.time() - t_start) / 60:.1f} min ({os.cpu_count()} CPUs).  ",
        f"Plan per (class, colour) cell, full budget = budget_fraction {full}; generation: strength {g.strength}, "
        f"scale {g.scale}, every {g.guide_every} step(s), CFG {g.cfg_scale}; classifier {cfg.train.model}.\n",
        "Columns: test accuracy (overall, average and worst over (class, colour) cells, worst class), "
        "fidelity of the kept synthetic images, images generated and kept (mean per seed).\n", table, ""]
        + ([f"\n## Tuning on the validation split ({args.tune_criterion}, seed 0, full budget)\n", *tune_lines, ""]
           if tune_lines else [])))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
