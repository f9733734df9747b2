"""Analysis: would another go/no-go rule have served the users of ``pilot_per_split.py`` better?

    python benchmarks/pilot_rules.py benchmarks/results/pilot_per_split.json [--out benchmarks/results/pilot_rules.md]

Reads the cells that ``pilot_per_split.py`` recorded (per split: every setting's pilot gain per fold
on validation, and its gain on that split's test) and replays the pilot's decision under other rules.
Nothing is trained. Post hoc, on the same few splits the rules are judged by: a rule that looks better
here is a hypothesis for a new benchmark, not a result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from feedback_synth.reporting.stats import paired_ci  # noqa: E402

RULES: dict[str, Callable[[list[float]], bool]] = {
    "the 95% bootstrap CI over the folds excludes zero (shipped)": lambda g: paired_ci(g)[1] > 0,
    "the mean gain over the folds is above zero": lambda g: float(np.mean(g)) > 0,
    "the mean gain is above zero and most folds gain": lambda g: float(np.mean(g)) > 0 and 2 * sum(x > 0 for x in g) > len(g),
}
EPS = 1e-9


def users(results: dict) -> list[dict]:
    """Every split of every dataset in a ``pilot_per_split.json`` (one run's, or several merged by
    name): one user each."""
    out = []
    for block in ([results] if "results" in results else results.values()):
        for dataset, rows in block["results"].items():
            out += [{"dataset": dataset, **row} for row in rows]
    return out


def replay(rule: Callable[[list[float]], bool], user: dict) -> tuple[str, float, float]:
    """(decision, the chosen setting's test gain (0 for a no-go), the best test gain on offer)."""
    going = {s: float(np.mean(g)) for s, g in user["fold_gains"].items() if rule(g)}
    best = max(user["test_gains"].values())
    if not going:
        return "no-go", 0.0, best
    chosen = max(going, key=going.get)
    return chosen, float(user["test_gains"][chosen]), best


def table(all_users: list[dict]) -> str:
    lines = ["| rule | dataset | splits | go: gain / zero / loss | no-go: right / missed a gain | summed test gain |",
             "|---|---|---|---|---|---|"]
    for name, rule in RULES.items():
        for dataset in sorted({u["dataset"] for u in all_users}):
            mine = [u for u in all_users if u["dataset"] == dataset]
            go = [replay(rule, u) for u in mine]
            gains = [t for d, t, _ in go if d != "no-go"]
            nogo_best = [b for d, _, b in go if d == "no-go"]
            lines.append(
                f"| {name} | {dataset} | {len(mine)} | {sum(t > EPS for t in gains)} / {sum(abs(t) <= EPS for t in gains)}"
                f" / {sum(t < -EPS for t in gains)} | {sum(b <= EPS for b in nogo_best)} / {sum(b > EPS for b in nogo_best)}"
                f" | {sum(gains):+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="pilot_per_split.json files")
    p.add_argument("--out", help="also write this markdown file")
    args = p.parse_args(argv)
    everyone = []
    for path in args.results:
        with open(path) as f:
            everyone += users(json.load(f))
    text = ("A go counts as a gain, zero or loss by the chosen setting's gain on the split's test; a no-go is "
            "right when no setting gains there. The summed test gain adds the chosen settings' test gains "
            "(a no-go adds 0).\n\n" + table(everyone))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# The pilot's go rule, replayed on the per-split cells (issue 24, item 4)\n\n```\npython "
                    + " ".join(["benchmarks/pilot_rules.py", *sys.argv[1:]]) + "\n```\n\n" + __doc__.split("\n\n", 2)[2]
                    + "\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
