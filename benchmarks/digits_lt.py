"""The paper's ablation in miniature on the built-in digits-lt (DESIGN: The benchmark).

Rows: baseline cross-entropy; logit adjustment (no generation); class-conditional samples with no
real conditioning; samples conditioned on real task images (SDEdit, no feedback); the same plus
feedback guidance per criterion; each generating row at the full and at half budget; an oracle on
balanced real task data. Mean ± std over seeds. The guidance scale and schedule are chosen on the
validation split (``--tune``), never on the test set.

    python benchmarks/digits_lt.py --seeds 0 1 2 --tune      # ~30-40 min on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")

from feedback_synth import storage
from feedback_synth.config import DataConfig, GenerateConfig, RunConfig, load_run_config
from feedback_synth.data.imageset import ImageSet, load_split  # noqa: E402
from feedback_synth.generation.shards import generate  # noqa: E402
from feedback_synth.pipeline import stages  # noqa: E402
from feedback_synth.training.classifier import load_classifier  # noqa: E402
from feedback_synth.training.evaluate import evaluate, summary  # noqa: E402
from feedback_synth.training.train import train_classifier  # noqa: E402

COLUMNS = ("overall", "many", "medium", "few", "worst_class")


def preset() -> RunConfig:
    from feedback_synth.config import preset as dataset_preset

    return load_run_config(base=dataset_preset("digits-lt"), overrides=["tracking.enabled=false"])


def synthesis_row(name: str, work: str, data_url: str, base_url: str, cfg: RunConfig, gen_cfg: GenerateConfig,
                  budget: float, seed: int, eval_split: str = "test") -> dict:
    """Plan, generate, filter and retrain with one generation setting; evaluate on ``eval_split``."""
    fb, gen, flt, ret = (storage.join(work, name, d) for d in ("feedback", "generated", "filtered", "retrained"))
    model = stages.model_url(base_url)
    plan = stages.extract_feedback(data_url, model, fb, replace(cfg.feedback, budget_fraction=budget))
    t0 = time.time()
    generate(stages.plan_url(fb), data_url, model, fb, gen, replace(gen_cfg, seed=seed))
    seconds = time.time() - t0
    report = stages.filter_synthetic(data_url, model, fb, gen, flt, cfg.filter)
    synthetic = ImageSet.load(storage.join(flt, "synthetic.npz"))
    retrain_cfg = replace(cfg.retrain, seed=seed)
    clf, _ = train_classifier(load_split(data_url, "train"), retrain_cfg, cfg.train.model, synthetic=synthetic,
                              synthetic_fraction=retrain_cfg.synthetic_fraction, desc=name)
    m = summary(evaluate(clf, load_split(data_url, eval_split), cfg.data))
    m.update(generated=plan["num_images"], kept=report["kept"], gen_seconds=seconds,
             fidelity=stages.fidelity(data_url, synthetic, cfg.train.model, oracle_url=storage.join(work, "oracle")))
    return m


def plain_row(data_url: str, split: str, cfg: RunConfig, seed: int, loss: str = "ce", eval_split: str = "test") -> dict:
    clf, _ = train_classifier(load_split(data_url, split), replace(cfg.train, seed=seed, loss=loss), cfg.train.model,
                              loss=loss)
    return summary(evaluate(clf, load_split(data_url, eval_split), cfg.data))


def generation_settings(cfg: RunConfig) -> dict[str, GenerateConfig]:
    g = cfg.generate
    out = {"unguided, class-conditional (no real image)": replace(g, criterion="none", condition_on_real=False),
           "unguided, conditioned on real images": replace(g, criterion="none")}
    for crit in ("loss", "entropy", "hardness"):
        out[f"guided ({crit})"] = replace(g, criterion=crit)
    return out


def tune(work: str, data_url: str, cfg: RunConfig, scales, everys, strengths, criterion: str,
         metric: str = "few", columns: tuple[str, ...] = ("overall", "few", "worst_class")) -> tuple[dict, list[str]]:
    """Grid over (strength, scale, guide_every) for one criterion, scored on the validation split
    (``metric``, then overall), seed 0. Returns the best setting and the table's lines."""
    base = storage.join(work, "tune-baseline")
    stages.train_baseline(data_url, base, replace(cfg.train, seed=0), cfg.data)
    lines = ["| strength | scale | guide_every | " + " | ".join(f"val {c}" for c in columns) + " | kept | fidelity |",
             "|---|---|---|" + "---|" * len(columns) + "---|---|"]
    b = summary(evaluate(load_classifier(stages.model_url(base)), load_split(data_url, "val"), cfg.data))
    lines.append("| baseline (no synthesis) | - | - | " + " | ".join(f"{b[c]:.3f}" for c in columns) + " | - | - |")
    best, best_key = None, None
    for st in strengths:
        for s in scales:
            for k in everys:
                name = f"tune-{criterion}-t{st}-s{s}-k{k}"
                g = replace(cfg.generate, criterion=criterion, scale=s, guide_every=k, strength=st)
                m = synthesis_row(name, work, data_url, base, cfg, g, cfg.feedback.budget_fraction, 0,
                                  eval_split="val")
                lines.append(f"| {st} | {s} | {k} | " + " | ".join(f"{m[c]:.3f}" for c in columns)
                             + f" | {m['kept']} | {fmt([m['fidelity']])} |")
                print(lines[-1], flush=True)
                key = (m[metric], m["overall"])
                if best_key is None or key > best_key:
                    best, best_key = {"scale": s, "guide_every": k, "strength": st}, key
    return best, lines


def add_tuning_arguments(p: argparse.ArgumentParser, scales: list[float], strengths: list[float],
                         what: str) -> None:
    """--tune and its grid (both benchmarks)."""
    p.add_argument("--tune", action="store_true", help=f"choose {what} on the validation split first")
    p.add_argument("--tune-criterion", default="entropy")
    p.add_argument("--scales", type=float, nargs="+", default=scales)
    p.add_argument("--everys", type=int, nargs="+", default=[5])
    p.add_argument("--strengths", type=float, nargs="+", default=strengths)


def fmt(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add_tuning_arguments(p, scales=[0.01, 0.03, 0.1], strengths=[0.6], what="scale and schedule")
    p.add_argument("--set", action="append", default=[], help="config override for every row, e.g. retrain.epochs=20")
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--output", default="benchmarks/results/digits_lt.md")
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    cfg = preset()
    if args.set:
        from feedback_synth.config import preset as dataset_preset

        cfg = load_run_config(base=dataset_preset("digits-lt"), overrides=["tracking.enabled=false", *args.set])
    work = args.work or tempfile.mkdtemp(prefix="fs-bench-")
    t_start = time.time()
    data_url = storage.join(work, "data")
    stages.prepare_data(DataConfig(), data_url)
    tune_lines: list[str] = []
    if args.tune:
        best, tune_lines = tune(work, data_url, cfg, args.scales, args.everys, args.strengths,
                                args.tune_criterion)
        cfg.generate = replace(cfg.generate, **best)
        print(f"chosen on validation: {best}", flush=True)
    rows: dict[str, list[dict]] = {}

    def add(name: str, m: dict) -> None:
        rows.setdefault(name, []).append(m)
        print(f"[{time.time() - t_start:6.0f}s] {name}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                                                    for k, v in m.items()}), flush=True)

    for seed in args.seeds:
        base = storage.join(work, f"seed{seed}", "baseline")
        stages.train_baseline(data_url, base, replace(cfg.train, seed=seed), cfg.data)
        add("baseline (cross-entropy)", summary(storage.read_json(storage.join(base, "metrics.json"))))
        add("logit adjustment (no generation)", plain_row(data_url, "train", cfg, seed, loss="logit_adjusted"))
        for name, g in generation_settings(cfg).items():
            for budget, label in ((1.0, "full"), (0.5, "half")):
                row = f"{name}, {label} budget"
                add(row, synthesis_row(f"seed{seed}/{row}".replace(" ", "_").replace(",", "").replace("(", "")
                                       .replace(")", ""), work, data_url, base, cfg, g, budget, seed))
        add("oracle (balanced real task data)", plain_row(data_url, "oracle", cfg, seed))

    header = ["setting", *COLUMNS, "fidelity", "generated", "kept", "gen s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, ms in rows.items():
        cells = [fmt([m.get(c) for m in ms]) for c in COLUMNS]
        cells.append(fmt([m.get("fidelity") for m in ms]))
        for c in ("generated", "kept"):
            cells.append(str(int(np.mean([m[c] for m in ms]))) if "generated" in ms[0] else "-")
        cells.append(f"{np.mean([m['gen_seconds'] for m in ms]):.1f}" if "gen_seconds" in ms[0] else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    g = cfg.generate
    md = ["# digits-lt benchmark\n", f"Command: `{command}`  ", f"Seeds: {args.seeds}; wall time "
          f"{(time.time() - t_start) / 60:.1f} min on this machine ({os.cpu_count()} CPUs).  ",
          f"Generation: {g.num_inference_steps} DDIM steps, strength {g.strength}, CFG {g.cfg_scale}, "
          f"embedding dropout {g.cond_dropout}, scale {g.scale}, guided every {g.guide_every} step(s); "
          f"retrain {cfg.retrain.epochs} epochs, synthetic fraction {cfg.retrain.synthetic_fraction}; "
          f"classifier {cfg.train.model}.\n", "Columns: test accuracy (overall, many/medium/few-shot, worst class), "
          "fidelity = share of kept synthetic images that an oracle trained on balanced real task data labels as "
          "intended, images generated and kept (mean per seed), generation seconds (mean per seed).\n", table, ""]
    if tune_lines:
        md += [f"\n## Tuning on the validation split ({args.tune_criterion}, seed 0, full budget)\n", *tune_lines, ""]
    storage.write_text(args.output, "\n".join(md))
    print(f"\nwritten to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
