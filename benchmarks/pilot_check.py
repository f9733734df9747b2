"""Benchmark: does the pilot's choice hold on the test split? (issue 24, item 4)

    python benchmarks/pilot_check.py --work /tmp/bench/pilot [--datasets digits-gap digits-lt digits-groups]
        [--seeds 0 1 2 3 4] [--folds 5] [--epochs 0] [--pilot-seed 0] [--benchmark-from RESULTS.json]
        [--out benchmarks/results/pilot_check]

Per dataset, with its preset (as ``feedback-synth run --dataset NAME`` uses it) and one grid axis
the benchmarks compared (digits-gap, digits-lt: ``adapt.method=none,full``; digits-groups:
``generate.criterion=none,entropy``):

1. **The pilot** (``orchestration.tune.run_pilot``): ``--folds`` folds of train + val of split seed
   ``--pilot-seed`` (0), ``--epochs``-epoch trainings; its go / no-go and its choice.
2. **The 5-seed test benchmark** of the same settings: per seed (data.split_seed and every
   training seed), the full preset's epochs, each setting's retrained model against the same
   recipe without synthesis, on the test split; the mean paired gain on the gate metric and its
   95% bootstrap CI over seeds (``reporting.stats.paired_ci``, the pilot's own definition).
3. **The check**: where the benchmark finds a gain (a CI above zero), the pilot must go and pick
   the best setting or one whose test gain lies inside the best setting's CI; where it finds none,
   the pilot must say no-go.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from synthesis_benchmark import Session  # noqa: E402  (the benchmarks' shared parts)

from feedback_synth import storage  # noqa: E402
from feedback_synth.config import RunConfig, resolve_run_config  # noqa: E402
from feedback_synth.orchestration import DEFAULT_FOLDS  # noqa: E402
from feedback_synth.orchestration.run import synthesis_rounds  # noqa: E402
from feedback_synth.orchestration.shared import RunLayout  # noqa: E402
from feedback_synth.orchestration.tune import (  # noqa: E402
    NO_SYNTHESIS,
    apply_setting,
    run_pilot,
    setting_name,
    setting_slug,
    settings_of,
    validation_table,
)
from feedback_synth.reporting.stats import paired_ci  # noqa: E402
from feedback_synth.stages.adapt_generator import adapt_generator  # noqa: E402
from feedback_synth.stages.outputs import model_url  # noqa: E402
from feedback_synth.stages.prepare_data import prepare_data  # noqa: E402
from feedback_synth.stages.train_baseline import train_baseline  # noqa: E402
from feedback_synth.tracking.base import NullTracker  # noqa: E402
from feedback_synth.training.evaluate import summary  # noqa: E402

GRIDS = {"digits-gap": {"adapt.method": ["none", "full"]}, "digits-lt": {"adapt.method": ["none", "full"]},
         "digits-groups": {"generate.criterion": ["none", "entropy"]}}


def seeded(dataset: str, seed: int) -> RunConfig:
    return resolve_run_config(dataset, overrides=[f"data.split_seed={seed}", f"train.seed={seed}",
                                                  f"retrain.seed={seed}", f"generate.seed={seed}", f"adapt.seed={seed}",
                                                  "tracking.enabled=false"])


def test_row(work: str, dataset: str, seed: int, setting: dict[str, Any]) -> dict[str, Any]:
    """One setting on one seed with the full preset: test metrics with and without synthesis."""
    cfg = apply_setting(seeded(dataset, seed), setting)
    root = storage.join(work, dataset, "test", f"seed{seed}")
    data, baseline = storage.join(root, "data"), storage.join(root, "baseline")
    prepare_data(cfg.data, data)
    train_baseline(data, baseline, cfg.train, cfg.data)
    adapted = storage.join(root, "adapted-" + cfg.adapt.method)
    adapt_generator(data, model_url(baseline), adapted, cfg.adapt, cfg.generate)
    _, retrained, _ = synthesis_rounds(cfg, RunLayout(storage.join(root, setting_slug(setting)), cfg.feedback.rounds),
                                       data, baseline, NullTracker(), adapted=adapted)
    return {"synthesis": summary(storage.read_json(storage.join(retrained, "metrics.json"))),
            "no_synthesis": summary(storage.read_json(storage.join(retrained, "reference_metrics.json")))}


def check(pilot: dict[str, Any], bench: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    """Does the pilot's choice hold against the test benchmark (module docstring, 3)?"""
    found = {name: b for name, b in bench.items() if b["lo"] > 0}
    if not found:
        if pilot["beats_no_synthesis"]:
            return False, f"the benchmark finds no gain, the pilot says go ({pilot['chosen']})"
        return True, "the benchmark finds no gain and the pilot says no-go"
    best_name = max(found, key=lambda n: found[n]["mean"])
    best = found[best_name]
    if not pilot["beats_no_synthesis"]:
        return False, f"the benchmark finds a gain ({best_name}), the pilot says no-go"
    chosen = bench[pilot["chosen"]]
    if pilot["chosen"] == best_name:
        return True, f"the pilot picks the benchmark's best setting ({best_name})"
    if best["lo"] <= chosen["mean"] <= best["hi"]:
        return True, (f"the pilot picks {pilot['chosen']} (test gain {chosen['mean']:+.3f}), inside the CI of the "
                      f"best setting {best_name} ({best['lo']:+.3f} .. {best['hi']:+.3f})")
    return False, (f"the pilot picks {pilot['chosen']} (test gain {chosen['mean']:+.3f}), outside the CI of the best "
                   f"setting {best_name} ({best['lo']:+.3f} .. {best['hi']:+.3f})")


def seeds_text(seeds: list[int], bench: dict[str, dict[str, Any]], earlier: bool) -> str:
    """The benchmark's seeds: ``--seeds``, or an earlier run's count (its command names them)."""
    if earlier:
        return f"{max(len(b['gains']) for b in bench.values())} seeds"
    return "seeds " + ", ".join(map(str, seeds))


def earlier_benchmarks(url: str, datasets: list[str]) -> dict[str, Any]:
    """``--benchmark-from``'s results, checked before any pilot runs: one line naming the file and
    what it lacks, not a traceback after the pilots' minutes."""
    try:
        earlier = json.loads(storage.read_text(url))
        missing = [d for d in datasets if "benchmark" not in earlier["results"].get(d, {})]
        earlier["command"]  # the table names the command that made the rows
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"--benchmark-from {url}: not a pilot_check results file ({type(exc).__name__}: {exc})") \
            from None
    if missing:
        raise SystemExit(f"--benchmark-from {url}: no test benchmark for {', '.join(missing)} (it has "
                         f"{', '.join(earlier['results']) or 'none'})")
    return earlier


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--datasets", nargs="+", default=list(GRIDS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--folds", type=int, default=DEFAULT_FOLDS)
    p.add_argument("--epochs", type=int, default=0, help="the pilot's epochs (0: the run's, the pilot's default)")
    p.add_argument("--pilot-seed", type=int, default=0,
                   help="the split seed the pilot sees (default 0); another one replicates the pilot's choice on "
                        "another draw of the user's data against the same benchmark")
    p.add_argument("--benchmark-from", help="take the test benchmark's rows from this earlier results JSON (its "
                                            "command and commit are printed) instead of recomputing them")
    p.add_argument("--out")
    args = p.parse_args(argv)
    earlier = earlier_benchmarks(args.benchmark_from, args.datasets) if args.benchmark_from else None
    session = Session()
    results: dict[str, Any] = {}
    md = ["# Does the pilot's choice hold? (issue 24, item 4)", "", f"Command: `{session.command}`", ""]
    for dataset in args.datasets:
        grid = GRIDS[dataset]
        t0 = time.time()
        session.log(f"{dataset}: pilot on split seed {args.pilot_seed}, {args.folds} folds x "
                    f"{len(settings_of(grid))} settings")
        pilot_dir = "pilot" if args.pilot_seed == 0 else f"pilot-seed{args.pilot_seed}"
        pilot = run_pilot(seeded(dataset, args.pilot_seed), storage.join(args.work, dataset, pilot_dir), grid,
                          args.epochs, folds=args.folds)
        pilot_minutes = (time.time() - t0) / 60
        metric = pilot["metric"]
        bench: dict[str, dict[str, Any]] = {}
        t1 = time.time()
        source = ""
        if earlier:
            bench = earlier["results"][dataset]["benchmark"]
            source = f" (its rows from `{args.benchmark_from}`, made by `{earlier['command']}`)"
        for setting in settings_of(grid) if not earlier else []:
            name = setting_name(setting)
            rows = []
            for seed in args.seeds:
                session.log(f"{dataset}: test benchmark, {name}, seed {seed}")
                rows.append(test_row(args.work, dataset, seed, setting))
            gains = [r["synthesis"][metric] - r["no_synthesis"][metric] for r in rows]
            mean, lo, hi = paired_ci(gains)
            bench[name] = {"mean": mean, "lo": lo, "hi": hi, "gains": gains, "rows": rows}
        ok, why = check(pilot, bench)
        results[dataset] = {"grid": grid, "pilot": pilot, "benchmark": bench, "holds": ok, "why": why,
                            "pilot_minutes": round(pilot_minutes, 1),
                            "benchmark_minutes": round((time.time() - t1) / 60, 1)}
        md += [f"## {dataset}: {'holds' if ok else 'does NOT hold'}", "", why + ".", "",
               f"The pilot (split seed {args.pilot_seed}, {args.folds} folds, {args.epochs or 'the run'}'s epochs, "
               f"{pilot_minutes:.1f} min):", "",
               validation_table(pilot), "",
               f"The test benchmark{source} ({seeds_text(args.seeds, bench, bool(earlier))}, the preset's epochs): gain in "
               f"{metric} over the same recipe without synthesis, 95% bootstrap CI over seeds:", "",
               f"| setting | gain in {metric} (95% CI) | per seed |", "|---|---|---|"]
        for name, b in bench.items():
            md.append(f"| {name}{' **(pilot)**' if name == pilot['chosen'] else ''} | {b['mean']:+.3f} "
                      f"({b['lo']:+.3f} .. {b['hi']:+.3f}) | {', '.join(f'{g:+.3f}' for g in b['gains'])} |")
        if pilot["chosen"] == NO_SYNTHESIS:
            md.append("\nThe pilot said no-go.")
        md.append("")
        session.log(f"{dataset}: {why}")
    md.append(f"Wall time: {session.minutes():.1f} min on this machine.")
    return session.finish("\n".join(md), results, args.out)


if __name__ == "__main__":
    sys.exit(main())
