"""The digits-lt benchmark: does synthesis pay off on a long tail, and does feedback?

Rows (test, paired over seeds): baseline cross-entropy; logit adjustment and Balanced Softmax without
synthesis; with the loss that wins on validation: unguided real-conditioned synthesis and guided
synthesis per criterion at full and half budget, 3 rounds of feedback at the full budget, guided
synthesis under strict filters without and with re-admission of starved classes; the oracle.
Then the paired differences with 95% bootstrap CIs. Protocol: benchmarks/synthesis_benchmark.py.

    python benchmarks/digits_lt.py --work /tmp/bench-lt          # 5 seeds; see results/digits_lt.md for the time
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from synthesis_benchmark import Benchmark, main_for  # noqa: E402

BENCHMARK = Benchmark(
    dataset="digits-lt", metric="few", columns=("overall", "many", "medium", "few", "worst_class"),
    losses={"logit adjustment (tau 1.5)": {"loss": "logit_adjusted", "tau": 1.5},
            "logit adjustment (tau 2)": {"loss": "logit_adjusted", "tau": 2.0},
            "balanced softmax (= logit adjustment at tau 1)": {"loss": "balanced_softmax"}},
    starving_rows=True)

if __name__ == "__main__":
    sys.exit(main_for(BENCHMARK))
