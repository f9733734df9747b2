"""Benchmark: does the pilot predict the test on the user's own data? (issue 24, item 4)

    python benchmarks/pilot_per_split.py --work /tmp/bench/pilot3 [--datasets digits-gap digits-lt digits-groups]
        [--seeds 0 1 2 3 4] [--folds 3] [--out benchmarks/results/pilot_per_split]

``pilot_check.py`` runs the pilot on split seed 0 and compares it with a test benchmark over
several split seeds: a user, though, has one dataset. Here every split seed is a user: the pilot
runs on that split's train + val (``--folds`` folds, the run's epochs), and its go / no-go and its
choice are compared with the same split's test result (the full preset, each setting's retrained
model against the same recipe without synthesis):

- a **go is right** when the chosen setting gains on that split's test;
- a **no-go is right** when no setting gains there.

One split's test gain is itself one draw (few-shot classes hold 5-20 test images each), so this
counts agreements; it does not decide each split. Runs in ``pilot_check.py``'s ``--work`` and reuses
its folders (its pilot of seed 0, its test runs): run with the same ``--work``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pilot_check import GRIDS, seeded, test_row  # noqa: E402
from synthesis_benchmark import Session  # noqa: E402

from feedback_synth import storage  # noqa: E402
from feedback_synth.orchestration.tune import NO_SYNTHESIS, run_pilot, setting_name, settings_of  # noqa: E402


def pilot_folder(work: str, dataset: str, seed: int) -> str:
    return storage.join(work, dataset, "pilot" if seed == 0 else f"pilot-seed{seed}")  # seed 0: pilot_check.py's


def judge(pilot: dict[str, Any], test_gains: dict[str, float]) -> tuple[bool, str]:
    """Is the pilot's go / no-go right on this split's test (module docstring)?"""
    if pilot["beats_no_synthesis"]:
        gain = test_gains[pilot["chosen"]]
        return gain > 0, f"go ({pilot['chosen']}): test gain {gain:+.3f}"
    best = max(test_gains, key=test_gains.get)
    return test_gains[best] <= 0, f"no-go: best test gain {test_gains[best]:+.3f} ({best})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--datasets", nargs="+", default=list(GRIDS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    session = Session()
    results: dict[str, Any] = {}
    md = ["# Does the pilot predict the test on the same split? (issue 24, item 4)", "",
          f"Command: `{session.command}`", ""]
    for dataset in args.datasets:
        grid = GRIDS[dataset]
        rows = []
        for seed in args.seeds:
            t0 = time.time()
            session.log(f"{dataset}: split {seed}, pilot")
            pilot = run_pilot(seeded(dataset, seed), pilot_folder(args.work, dataset, seed), grid, 0, folds=args.folds)
            minutes = (time.time() - t0) / 60
            metric = pilot["metric"]
            test_gains = {}
            for setting in settings_of(grid):
                session.log(f"{dataset}: split {seed}, test, {setting_name(setting)}")
                row = test_row(args.work, dataset, seed, setting)
                test_gains[setting_name(setting)] = row["synthesis"][metric] - row["no_synthesis"][metric]
            right, why = judge(pilot, test_gains)
            fold_gains = {r["setting"]: r["gain_per_fold"] for r in pilot["rows"] if r["setting"] != NO_SYNTHESIS}
            rows.append({"seed": seed, "metric": metric, "go": pilot["beats_no_synthesis"], "chosen": pilot["chosen"],
                         "fold_gains": fold_gains, "test_gains": test_gains, "right": right, "why": why,
                         "pilot_minutes": round(minutes, 1)})
            session.log(f"{dataset}: split {seed}: {'right' if right else 'WRONG'}: {why}")
        results[dataset] = rows
        metric = rows[0]["metric"]
        names = list(rows[0]["test_gains"])
        md += [f"## {dataset}: right on {sum(r['right'] for r in rows)} of {len(rows)} splits", "",
               f"Gain in {metric} over the same recipe without synthesis: the pilot's per fold (validation), the "
               "split's test.", "",
               "| split | pilot | " + " | ".join(f"{n}: folds / test" for n in names) + " | right? |",
               "|---|---|" + "---|" * len(names) + "---|"]
        for r in rows:
            cells = [f"{' '.join(f'{g:+.3f}' for g in r['fold_gains'][n])} / {r['test_gains'][n]:+.3f}" for n in names]
            md.append(f"| {r['seed']} | {'go: ' + r['chosen'] if r['go'] else 'no-go'} | " + " | ".join(cells)
                      + f" | {'yes' if r['right'] else '**no**'} |")
        md.append("")
    md.append(f"Wall time: {session.minutes():.1f} min on this machine.")
    return session.finish("\n".join(md), results, args.out)


if __name__ == "__main__":
    sys.exit(main())
