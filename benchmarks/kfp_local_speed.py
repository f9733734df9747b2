"""Benchmark: ``feedback-synth run`` in process against ``--runner kfp-local`` (issue 23: at most 1.5x).

    python benchmarks/kfp_local_speed.py [--repeats 2] [--set KEY=VALUE ...] [--out benchmarks/results/kfp_local_speed.md]

Runs the default run (digits-lt, bundled generator, MLflow on a local store) as a user would, a
fresh output folder each time, in turn: in process, through the KFP local runner with its warm
task server (the default), and with every task process started cold
(``FEEDBACK_SYNTH_KFP_WARM_TASKS=0``, KFP's own behaviour). The fidelity oracle is trained once
before timing (its cache is shared), so every row does the same work. Prints a table: wall time
per repeat, the median, the ratio to in process, and the metrics (they must be equal).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = (("in process", ["--runner", "inprocess"], {}),
        ("kfp-local, warm task server (default)", ["--runner", "kfp-local"], {}),
        ("kfp-local, every task process cold", ["--runner", "kfp-local"], {"FEEDBACK_SYNTH_KFP_WARM_TASKS": "0"}))


def run_once(args: list[str], env: dict[str, str], sets: list[str], work: str) -> tuple[float, dict]:
    out = tempfile.mkdtemp(prefix="run-", dir=work)
    command = [sys.executable, "-m", "feedback_synth.cli", "run", "--output", out, *args,
               *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    subprocess.run(command, env={**os.environ, "TQDM_DISABLE": "1", **env}, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.time() - t0
    summary = json.load(open(os.path.join(out, "report", "run_summary.json")))
    return seconds, {k: round(summary["retrained"][k], 4) for k in ("few", "overall")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="config override for every run")
    p.add_argument("--out", help="also write the table to this file")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="kfp-local-speed-")
    run_once([], {}, a.set, work)  # warm-up: trains and caches the oracle, fills the page cache
    times: dict[str, list[float]] = {name: [] for name, _, _ in ROWS}
    metrics: dict[str, dict] = {}
    for _ in range(a.repeats):  # interleaved, so that a change in the machine's load hits every row alike
        for name, args, env in ROWS:
            seconds, metrics[name] = run_once(args, env, a.set, work)
            times[name].append(seconds)
            print(f"{name}: {seconds:.1f} s {metrics[name]}", file=sys.stderr, flush=True)
    base = statistics.median(times[ROWS[0][0]])
    lines = ["| runner | wall time per run (s) | median (s) | vs in process | few, overall |", "|---|---|---|---|---|"]
    for name, _, _ in ROWS:
        median = statistics.median(times[name])
        lines.append(f"| {name} | {', '.join(f'{t:.1f}' for t in times[name])} | {median:.1f} | {median / base:.2f}x | "
                     f"{metrics[name]['few']}, {metrics[name]['overall']} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
