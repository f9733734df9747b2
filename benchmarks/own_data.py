"""Benchmark: the issue's user, again: your own data from a URL, with the library's defaults.

    python benchmarks/own_data.py --work /tmp/bench/own [--seeds 0 1 2] [--out benchmarks/results/own_data]

Writes digits-gap's splits (split seed 0: grey handwritten digits in another style than the
bundled generator's pool, imbalance 30) as PNG class folders (``train/<class>/<i>.png``, ``val``,
``test``) and runs ``feedback-synth run --dataset file://...`` on them as a user would: the URL
defaults (no preset), the bundled digits generator given by its folder, the generator adapted
(``adapt.method=full``), entropy guidance; once with the library's default retraining
(distillation from the no-synthesis model at 0.25) and once without it (``retrain.distill_weight=0``,
the default before round 11). Per seed (the training, adaptation and generation seeds): each
run's report, the retrained model against its own "no synthesis" row (the same recipe and
optimiser steps), per class group. Paired means and 95% bootstrap CIs over seeds.
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from typing import Any

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from synthesis_benchmark import Session, bootstrap_ci  # noqa: E402  (the benchmarks' shared parts)

from feedback_synth import storage  # noqa: E402
from feedback_synth.data.digits import make_digits_gap  # noqa: E402

GENERATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "feedback_synth", "weights",
                         "digits-lt-generator")
# name -> (its runs' folder under --work, its overrides of the defaults)
SETTINGS = {"distillation 0.25 (the default)": ("distill", []),
            "no distillation": ("plain", ["retrain.distill_weight=0"])}
KEYS = ("overall", "many", "medium", "few")


def write_class_folders(root: str) -> None:
    """digits-gap's train / val / test (split seed 0) as ``root/<split>/<class>/<i>.png``."""
    from PIL import Image

    if storage.exists(storage.join(root, "test")):
        return
    for split, images in make_digits_gap(0).items():
        if split not in ("train", "val", "test"):
            continue
        for i, (image, label) in enumerate(zip(images.images, images.labels)):
            buf = io.BytesIO()
            Image.fromarray(image[..., 0], "L").save(buf, "PNG")  # uint8 grey
            storage.write_bytes(storage.join(root, split, images.class_names[label], f"{i}.png"), buf.getvalue())


def run_once(data_url: str, output: str, seed: int, extra: list[str]) -> dict[str, Any]:
    sets = [f"train.seed={seed}", f"retrain.seed={seed}", f"adapt.seed={seed}", f"generate.seed={seed}",
            "adapt.method=full", f"generate.generator={GENERATOR}", "generate.criterion=entropy",
            "tracking.enabled=false", *extra]
    if not storage.exists(storage.join(output, "report", "report.json")):
        cmd = [sys.executable, "-m", "feedback_synth.cli", "run", "--dataset", data_url, "--output", output]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return storage.read_json(storage.join(output, "report", "report.json"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out")
    args = p.parse_args(argv)
    session = Session()
    data = storage.join(args.work, "digits-gap-folders")
    write_class_folders(data)
    results: dict[str, dict[str, Any]] = {name: {} for name in SETTINGS}
    for seed in args.seeds:
        for name, (folder, extra) in SETTINGS.items():
            t0 = time.time()
            report = run_once(data, storage.join(args.work, f"{folder}-seed{seed}"), seed, extra)
            results[name][str(seed)] = {"retrained": report["retrained"], "no_synthesis": report["no_synthesis"],
                                        "kept": report.get("kept"), "seconds": round(time.time() - t0, 1)}
            session.log(f"seed {seed}, {name}: " + ", ".join(
                f"{k} {report['retrained'][k] - report['no_synthesis'][k]:+.3f}" for k in KEYS))
    lines = ["# Your own data, with the library's defaults (issue 24; benchmarks/own_data.py)", "", "```",
             session.command, "```", "",
             f"Wall time {session.minutes():.1f} min on this {os.cpu_count()}-CPU machine. Each run against its own "
             "'no synthesis' row (the same recipe and optimiser steps); mean over seeds, 95% bootstrap CI.", "",
             "| retraining | " + " | ".join(KEYS) + " | kept |", "|---|" + "---|" * (len(KEYS) + 1)]
    for name, by_seed in results.items():
        cells = []
        for k in KEYS:
            mean, lo, hi = bootstrap_ci([r["retrained"][k] - r["no_synthesis"][k] for r in by_seed.values()])
            cells.append(f"{mean:+.3f} ({lo:+.3f} .. {hi:+.3f})")
        kept = np.mean([r["kept"] or 0 for r in by_seed.values()])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {kept:.0f} |")
    return session.finish("\n".join(lines) + "\n", results, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
