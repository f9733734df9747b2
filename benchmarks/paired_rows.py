"""Paired differences between two rows of committed benchmark results, pooled over their seeds.

    python benchmarks/paired_rows.py --json A.json [B.json ...] --a ROW --b ROW [--dataset NAME] [--split test]
        [--groups overall many medium few]

For results a benchmark did not print itself: one setting against another within a run
(``copies.py``'s synthesis rows), or the seeds of two runs pooled (``retrain_variants.py`` over two
rounds' seeds). Reads ``{"results": {seed: {row: metrics}}}`` (``copies.py``) or, with
``--dataset``, ``{"results": {dataset: {seed: {row: {split: metrics}}}}}`` (``retrain_variants.py``,
with ``--split``). Prints the mean paired difference ``a - b`` per group and its 95% bootstrap CI over
the seeds (the benchmarks' ``bootstrap_ci``), and the per-seed differences.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from synthesis_benchmark import bootstrap_ci  # noqa: E402  (the benchmarks' shared parts)


def pooled_seeds(paths: list[str], dataset: Optional[str]) -> dict[str, dict[str, Any]]:
    """``{seed: {row: metrics}}`` from every file; a seed in two files is refused (not paired twice)."""
    seeds: dict[str, dict[str, Any]] = {}
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                results = json.load(f)
        except (OSError, ValueError) as exc:  # missing, unreadable, not JSON
            raise SystemExit(f"{path}: cannot read results ({type(exc).__name__}: {exc})") from None
        results = results.get("results", results)
        if dataset is not None:
            if dataset not in results:
                raise SystemExit(f"{path}: no dataset {dataset!r} (it has {sorted(results)})")
            results = results[dataset]
        for seed, rows in results.items():
            if seed in seeds:
                raise SystemExit(f"{path}: seed {seed} is also in an earlier file")
            seeds[seed] = rows
    return seeds


def paired_rows(seeds: dict[str, dict[str, Any]], a: str, b: str, split: Optional[str], groups: list[str]
                ) -> list[tuple[str, float, float, float, list[float]]]:
    """Per group: (group, mean of a - b, CI low, CI high, per-seed differences)."""
    def metrics(seed: str, row: str) -> dict[str, float]:
        if row not in seeds[seed]:
            raise SystemExit(f"seed {seed}: no row {row!r} (it has {sorted(seeds[seed])})")
        return seeds[seed][row][split] if split else seeds[seed][row]

    out = []
    for group in groups:
        diffs = [metrics(s, a)[group] - metrics(s, b)[group] for s in sorted(seeds, key=int)]
        mean, low, high = bootstrap_ci(diffs)
        out.append((group, mean, low, high, diffs))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", nargs="+", required=True, help="committed results files; their seeds are pooled")
    p.add_argument("--a", required=True, help="the row to compare")
    p.add_argument("--b", required=True, help="the row it is compared with")
    p.add_argument("--dataset", help="the dataset key (retrain_variants.py results)")
    p.add_argument("--split", help="the split key (retrain_variants.py results: val or test)")
    p.add_argument("--groups", nargs="+", default=["overall", "many", "medium", "few"])
    args = p.parse_args(argv)
    seeds = pooled_seeds(args.json, args.dataset)
    print(f"{args.a} - {args.b}{f', {args.split}' if args.split else ''}, seeds {', '.join(sorted(seeds, key=int))}:\n")
    print("| group | mean (95% CI) | per seed |\n|---|---|---|")
    for group, mean, low, high, diffs in paired_rows(seeds, args.a, args.b, args.split, args.groups):
        print(f"| {group} | {mean:+.3f} ({low:+.3f} .. {high:+.3f}) | {', '.join(f'{d:+.3f}' for d in diffs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
