"""Item 1's validation rule (``retrain_variants.goal_choice``) on the seeds of several committed results files.

    python benchmarks/pooled_choice.py --json A.json [B.json ...] --dataset digits-gap [--preset VARIANT]

``retrain_variants.py`` applies the rule to the seeds of one run. A decision fixed over the seeds of
several rounds (for example the same setting run on split seeds 0-9, 10-19 and 20-29) reads their
results files together: the seeds are pooled (a seed in two files is refused), and the rule reads
the validation split only, as in ``retrain_variants.py``. ``--preset`` defaults to the dataset's preset
(``retrain_variants.PRESET_VARIANT``).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from paired_rows import pooled_seeds  # noqa: E402  (the benchmarks' shared parts)
from retrain_variants import NO_SYN, PRESET_VARIANT, SAME_STEPS, goal_choice, measured  # noqa: E402


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", nargs="+", required=True, help="retrain_variants.py results files; their seeds are pooled")
    p.add_argument("--dataset", required=True)
    p.add_argument("--preset", help="the variant the rule keeps unless beaten (default: the dataset's preset)")
    p.add_argument("--reference", choices=[SAME_STEPS, NO_SYN], default=SAME_STEPS)
    args = p.parse_args(argv)
    by_seed = pooled_seeds(args.json, args.dataset)
    seeds = sorted(by_seed, key=int)
    missing = [s for s in seeds if args.reference not in by_seed[s]]
    if missing:
        raise SystemExit(f"seeds {', '.join(missing)} have no {args.reference!r} row")
    preset = args.preset or PRESET_VARIANT.get(args.dataset, "")
    variants = measured(by_seed, seeds)
    if not variants:
        raise SystemExit(f"no retraining variant is in every seed of {', '.join(args.json)}")
    print(f"Item 1's rule (goal_choice), validation, {args.dataset}, seeds {', '.join(seeds)} "
          f"(against {args.reference}; preset: {preset or 'none'}): "
          f"{goal_choice(by_seed, seeds, args.reference, preset)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
