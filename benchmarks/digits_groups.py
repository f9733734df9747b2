"""The digits-groups benchmark: does synthesis pay off on rare (class, colour) groups, and does feedback?

Rows (test, paired over seeds): baseline cross-entropy; logit adjustment, Balanced Softmax and group
reweighting without synthesis; with the loss that wins on validation (worst-group accuracy):
unguided real-conditioned synthesis and guided synthesis per criterion at full and half budget of
the per-cell rule, 3 rounds of feedback at the full budget; the oracle on group-balanced real task
data. Then the paired differences with 95% bootstrap CIs. Protocol: benchmarks/synthesis_benchmark.py.

    python benchmarks/digits_groups.py --work /tmp/bench-groups  # 5 seeds; see results/digits_groups.md for the time
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthesis_benchmark import Benchmark, main_for  # noqa: E402

BENCHMARK = Benchmark(
    dataset="digits-groups", metric="worst_group", columns=("overall", "average_group", "worst_group", "worst_class"),
    losses={"logit adjustment (tau 2)": {"loss": "logit_adjusted", "tau": 2.0},
            "balanced softmax": {"loss": "balanced_softmax"},
            "group reweighting": {"loss": "group_reweighted"}})

if __name__ == "__main__":
    sys.exit(main_for(BENCHMARK))
