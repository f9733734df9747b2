"""Benchmark table: the same retraining variants on two ``--work`` folders of
``benchmarks/retrain_variants.py``, paired by seed (a setting of the run changed between them, e.g.
``adapt.steps``; the data, the baseline and the no-synthesis reference are the same per seed).

    python benchmarks/paired_caches.py --a /tmp/bench/gv3 --b /tmp/bench/gva600 --dataset digits-gap \
        --seeds 0 1 2 3 4 --variants "real prior + head + distillation 0.25, calibrated" [--out OUT]

Prints, per variant and split, the change from A to B of each metric (mean over seeds, 95%
bootstrap CI), and each side against the same-steps no-synthesis reference. Trains nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from synthesis_benchmark import bootstrap_ci  # noqa: E402

from feedback_synth import storage  # noqa: E402

REFERENCE = "no synthesis, same steps"


def _fmt(diffs: list[float]) -> str:
    mean, low, high = bootstrap_ci(diffs)
    return f"{mean:+.3f} ({low:+.3f} .. {high:+.3f})"


def table(a: dict, b: dict, seeds: list[str], variants: list[str], labels: tuple[str, str]) -> str:
    """The Markdown tables: per split, each variant's B - A and each side against the reference."""
    for cache, label in ((a, labels[0]), (b, labels[1])):
        missing = [f"seed {s}: {v}" for s in seeds for v in [REFERENCE, *variants] if v not in cache.get(s, {})]
        if missing:
            raise SystemExit(f"{label} lacks {', '.join(missing)}: run retrain_variants.py on it first")
    metrics = [k for k in ("overall", "many", "medium", "few", "worst_group", "majority_group")
               if k in a[seeds[0]][REFERENCE]["test"]]
    lines = []
    for split in ("val", "test"):
        lines += [f"### {split}", "", "| variant | row | " + " | ".join(metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        for v in variants:
            rows = {f"{labels[1]} - {labels[0]}": lambda s, k: b[s][v][split][k] - a[s][v][split][k],
                    f"{labels[0]} vs no synthesis": lambda s, k: a[s][v][split][k] - a[s][REFERENCE][split][k],
                    f"{labels[1]} vs no synthesis": lambda s, k: b[s][v][split][k] - b[s][REFERENCE][split][k]}
            for name, diff in rows.items():
                lines.append(f"| {v} | {name} | " + " | ".join(_fmt([diff(s, k) for s in seeds]) for k in metrics) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="the first --work folder (the setting before)")
    p.add_argument("--b", required=True, help="the second --work folder (the setting after)")
    p.add_argument("--labels", nargs=2, default=["A", "B"])
    p.add_argument("--dataset", required=True)
    p.add_argument("--seeds", nargs="+", required=True)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--out", help="also write OUT.md")
    args = p.parse_args(argv)
    caches = [storage.join(w, f"variants-{args.dataset}.json") for w in (args.a, args.b)]
    for url in caches:
        if not storage.exists(url):
            raise SystemExit(f"{url}: not found (run retrain_variants.py --work on that folder for {args.dataset} first)")
    a, b = (storage.read_json(url) for url in caches)
    text = table(a, b, args.seeds, args.variants, tuple(args.labels))
    print(text)
    if args.out:
        storage.write_text(args.out + ".md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
