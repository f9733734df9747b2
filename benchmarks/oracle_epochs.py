"""Benchmark: how long must the fidelity oracle train?

    python benchmarks/oracle_epochs.py [--epochs 40 20 15 10] [--seeds 0 1 2] [--out benchmarks/results/oracle_epochs]
    python benchmarks/oracle_epochs.py --run runs/RUN [--epochs 40 20] [--seeds 0 1 2] [--out ...]

The oracle (``training.oracle``) is trained on each built-in dataset's balanced ``oracle`` split and
measures fidelity: the share of synthetic images it labels as their intended class. It is only as
good as its own accuracy on real task images, so this trains it for each number of epochs and
seed and prints its accuracy on the dataset's ``test`` split (never seen by it), and the seconds
each training took on this machine (one process, the threads torch picks). With ``--run`` (a
finished ``feedback-synth run`` folder), it trains the oracle of that run's dataset only and
prints, beside its test accuracy, the fidelity it gives the run's kept synthetic images: what the
run's report would say with that oracle.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from feedback_synth import storage  # noqa: E402
from feedback_synth.config import RetrainConfig  # noqa: E402
from feedback_synth.data.digits import make_digits_gap, make_digits_groups, make_digits_lt, make_digits_rare  # noqa: E402
from feedback_synth.data.imageset import ImageSet, load_info, load_split  # noqa: E402
from feedback_synth.training.evaluate import predict_logits  # noqa: E402
from feedback_synth.training.oracle import ORACLE_EPOCHS  # noqa: E402
from feedback_synth.training.train import train_classifier  # noqa: E402

DATASETS = {"digits-lt": make_digits_lt, "digits-gap": make_digits_gap, "digits-groups": make_digits_groups,
            "digits-rare": make_digits_rare}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[40, 20, 15, 10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="resnet10t")
    p.add_argument("--run", default="", help="a finished run's folder: its dataset's oracle, and fidelity on its kept images")
    p.add_argument("--out", default="")
    args = p.parse_args()
    rows = []
    if args.run:
        data = storage.join(args.run, "data")
        for needed in (storage.join(data, "info.json"), storage.join(args.run, "filtered", "synthetic.npz")):
            if not storage.exists(needed):
                p.error(f"--run {args.run}: no {needed}; give the folder of a finished feedback-synth run")
        sources = {load_info(data).name: (load_split(data, "oracle"), load_split(data, "test"))}
        synthetic = ImageSet.load(storage.join(args.run, "filtered", "synthetic.npz"))
    else:
        sources = {name: (splits["oracle"], splits["test"]) for name, splits in
                   ((name, make(0)) for name, make in DATASETS.items())}
        synthetic = None
    for name, (oracle, test) in sources.items():
        for epochs in args.epochs:
            accs, secs, fids = [], [], []
            for seed in args.seeds:
                t0 = time.time()
                model, _ = train_classifier(oracle, RetrainConfig(seed=seed, epochs=epochs, device="cpu"), args.model,
                                            desc="oracle")
                secs.append(time.time() - t0)
                accs.append(float((predict_logits(model, test).argmax(1) == test.labels).mean()))
                if synthetic is not None:
                    fids.append(float((predict_logits(model, synthetic).argmax(1) == synthetic.labels).mean()))
            rows.append({"dataset": name, "oracle_images": len(oracle), "epochs": epochs, "test_accuracy": accs,
                         "fidelity": fids, "seconds": secs})
            print(f"{name} {epochs} epochs: {np.mean(accs):.3f} ({np.mean(secs):.1f} s)", file=sys.stderr, flush=True)
    lines = [f"# The fidelity oracle by training epochs ({args.model}, seeds {' '.join(map(str, args.seeds))}; the "
             f"default is {ORACLE_EPOCHS})", "",
             "| dataset | oracle images | epochs | test accuracy, mean (min .. max) | "
             + ("fidelity on the run's kept images, mean (per seed) | " if synthetic is not None else "")
             + "seconds per oracle |", "|---|---|---|---|" + ("---|" if synthetic is not None else "") + "---|"]
    for r in rows:
        a, f = r["test_accuracy"], r["fidelity"]
        fid = f"{np.mean(f):.3f} ({', '.join(f'{x:.3f}' for x in f)}) | " if synthetic is not None else ""
        lines.append(f"| {r['dataset']} | {r['oracle_images']} | {r['epochs']} | {np.mean(a):.3f} ({min(a):.3f} .. "
                     f"{max(a):.3f}) | {fid}{np.mean(r['seconds']):.1f} |")
    print("\n".join(lines))
    if args.out:
        with open(args.out + ".md", "w") as f:
            f.write("\n".join(lines) + "\n\nCommand: `python benchmarks/oracle_epochs.py " + " ".join(sys.argv[1:]) + "`\n")
        with open(args.out + ".json", "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
