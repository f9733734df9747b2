"""Does synthesis pay off, and does feedback? The benchmark protocol shared by digits_lt.py and
digits_groups.py (docs/method.md: "The benchmark" and "Benchmark statistics").

1. Tuning, on the validation split only (``--tune-seeds``, mean over them):
   a. the balanced loss without synthesis: logit adjustment (tau in a grid), Balanced Softmax (and,
      with groups, group reweighting); the best on the validation gate metric is "the loss";
   b. generation, with the loss: SDEdit strength x guidance scale for guided (entropy) synthesis,
      and the strength of unguided real-conditioned synthesis on its own (a fair comparison);
   c. the class prior of the adjusted loss once synthetic images are mixed in (real vs batch).
2. Rows on the test split, for every seed (``--seeds``), paired: a seed fixes data.split_seed (so
   the test images change from seed to seed; the generator pool never does), the baselines, the
   real start images and the shard seeds of every row.
3. Paired differences with a 95% bootstrap CI over seeds for the key comparisons, and one plain
   sentence each: does the CI exclude zero?
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")

from feedback_synth import storage  # noqa: E402
from feedback_synth.config import RunConfig, load_run_config, preset  # noqa: E402
from feedback_synth.data.imageset import ImageSet, load_split  # noqa: E402
from feedback_synth.errors import DataError  # noqa: E402
from feedback_synth.orchestration.run import RunLayout, synthesis_rounds  # noqa: E402
from feedback_synth.stages.outputs import model_url  # noqa: E402
from feedback_synth.stages.prepare_data import prepare_data  # noqa: E402
from feedback_synth.stages.train_baseline import train_baseline  # noqa: E402
from feedback_synth.tracking.base import NullTracker  # noqa: E402
from feedback_synth.training.classifier import load_classifier  # noqa: E402
from feedback_synth.training.evaluate import evaluate, summary  # noqa: E402
from feedback_synth.training.oracle import fidelity  # noqa: E402
from feedback_synth.training.train import Recipe, train_classifier  # noqa: E402

CRITERIA = ("loss", "entropy", "hardness")


@dataclass
class Benchmark:
    """One dataset's benchmark: its gate metric, its table columns and its loss candidates."""

    dataset: str
    metric: str  # the validation / gate metric: few (long tail) or worst_group (groups)
    columns: tuple[str, ...]
    losses: dict[str, dict[str, Any]]  # row name -> TrainConfig fields (loss, tau)
    starving_rows: bool = False  # add the strict-filter rows that show what re-admission does
    overrides: list[str] = field(default_factory=list)


def base_config(bench: Benchmark) -> RunConfig:
    return load_run_config(base=preset(bench.dataset), overrides=["tracking.enabled=false", *bench.overrides])


class Runner:
    """Rows of the benchmark, cached by name under ``work`` (a re-run resumes: stages skip what is done)."""

    def __init__(self, bench: Benchmark, work: str, log: Callable[[str], None]):
        self.bench, self.work, self.log = bench, work, log
        os.environ.setdefault("FEEDBACK_SYNTH_CACHE", os.path.join(work, "cache"))

    def data(self, seed: int) -> str:
        cfg = base_config(self.bench)
        url = storage.join(self.work, f"seed{seed}", "data")
        prepare_data(replace(cfg.data, split_seed=seed), url)
        return url

    def baseline(self, seed: int, loss: dict[str, Any]) -> str:
        """The baseline of a seed trained with ``loss`` (TrainConfig fields); its stage folder."""
        cfg = base_config(self.bench)
        name = "-".join(f"{k}{v}" for k, v in sorted(loss.items()))
        url = storage.join(self.work, f"seed{seed}", f"baseline-{name}")
        train_baseline(self.data(seed), url, replace(cfg.train, seed=seed, **loss),
                              replace(cfg.data, split_seed=seed))
        return url

    def plain_metrics(self, seed: int, loss: dict[str, Any], split: str) -> dict[str, float]:
        cfg = base_config(self.bench)
        clf = load_classifier(model_url(self.baseline(seed, loss)))
        return summary(evaluate(clf, load_split(self.data(seed), split), replace(cfg.data, split_seed=seed)))

    def synthesis(self, name: str, seed: int, loss: dict[str, Any], changes: dict[str, dict[str, Any]],
                  split: str = "test") -> dict[str, Any]:
        """Plan, generate, filter and retrain (in rounds if ``changes['feedback']['rounds']``) on top
        of the seed's ``loss`` baseline; metrics on ``split``."""
        cfg = base_config(self.bench)
        sections = {s: replace(getattr(cfg, s), **changes.get(s, {})) for s in ("feedback", "generate", "filter", "retrain")}
        cfg = replace(cfg, data=replace(cfg.data, split_seed=seed),
                      generate=replace(sections["generate"], seed=seed), feedback=sections["feedback"],
                      filter=sections["filter"], retrain=replace(sections["retrain"], seed=seed))
        data = self.data(seed)
        baseline = self.baseline(seed, loss)
        layout = RunLayout(storage.join(self.work, f"seed{seed}", name), cfg.feedback.rounds)
        t0 = time.time()
        gen, retrained, filtered = synthesis_rounds(cfg, layout, data, baseline, NullTracker())
        clf = load_classifier(model_url(retrained), "auto")
        m = summary(evaluate(clf, load_split(data, split), cfg.data))
        synthetic = ImageSet.load(storage.join(filtered, "synthetic.npz"))
        report = storage.read_json(storage.join(filtered, "filter_report.json"))
        readmitted = sum(storage.read_json(storage.join(layout.round(r).filtered, "filter_report.json")).get(
            "readmitted", 0) for r in range(1, cfg.feedback.rounds + 1))
        m.update(generated=report.get("generated_so_far", report["generated"]), kept=len(synthetic),
                 readmitted=readmitted, gen_seconds=gen["seconds"], seconds=time.time() - t0,
                 fidelity=fidelity(data, synthetic, cfg.train.model, device="auto", oracle_url=storage.join(self.work, "oracle")))
        return m

    def oracle(self, seed: int) -> dict[str, float]:
        cfg = base_config(self.bench)
        data = self.data(seed)
        clf, _ = train_classifier(load_split(data, "oracle"), replace(cfg.retrain, seed=seed), cfg.train.model,
                                  recipe=Recipe("ce"), desc="oracle")
        return summary(evaluate(clf, load_split(data, "test"), replace(cfg.data, split_seed=seed)))


# ------------------------------------------------------------------------------ statistics


def majority_group_accuracy(predictions: np.ndarray, test: ImageSet, train: ImageSet) -> Optional[float]:
    """The issue's "best group" on group-imbalanced data: per class, the accuracy on the test images
    of the (class, group) cell with the most training images, averaged over classes; None without
    groups."""
    if test.num_groups <= 1:
        return None
    cells = np.zeros((train.num_classes, train.num_groups), np.int64)
    np.add.at(cells, (train.labels, train.groups), 1)
    majority = cells.argmax(1)
    correct = predictions == test.labels
    accs = [correct[(test.labels == c) & (test.groups == majority[c])].mean() for c in range(train.num_classes)
            if ((test.labels == c) & (test.groups == majority[c])).any()]
    return float(np.mean(accs))


def bootstrap_ci(diffs: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of paired differences and its 95% percentile bootstrap CI over seeds (the pilot's own
    definition: ``reporting.stats.paired_ci``)."""
    from feedback_synth.reporting.stats import paired_ci

    return paired_ci(diffs, 0.95, n, seed)


class Session:
    """One benchmark command: its command line, a log with elapsed seconds, and where its
    results go (``OUT.md`` and ``OUT.json`` beside the Markdown printed on stdout)."""

    def __init__(self) -> None:
        self.command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        self.started = time.time()

    def log(self, msg: str) -> None:
        print(f"[{time.time() - self.started:7.0f}s] {msg}", flush=True)

    def minutes(self) -> float:
        return (time.time() - self.started) / 60

    def finish(self, md: str, results: Any, out: Optional[str]) -> int:
        print(md)
        if out:
            storage.write_text(out + ".md", md)
            storage.write_text(out + ".json", json.dumps({"command": self.command, "results": results}, indent=1))
        return 0


def verdict(label: str, metric: str, mean: float, lo: float, hi: float) -> str:
    if lo > 0:
        return f"{label}: {metric} {mean:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}); the CI excludes zero: it pays off."
    if hi < 0:
        return f"{label}: {metric} {mean:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}); the CI excludes zero: it hurts."
    return (f"{label}: {metric} {mean:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}); the CI includes zero: no difference "
            f"that these seeds can tell.")


def fmt(values: list[Optional[float]]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


# ------------------------------------------------------------------------------ the protocol


def run(bench: Benchmark, seeds: list[int], tune_seeds: list[int], work: str, output: str,
        strengths: list[float], scales: list[float], budgets: tuple[float, float] = (1.0, 0.5),
        rounds: int = 3) -> int:
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.0f}s] {msg}", flush=True)

    runner = Runner(bench, work, log)
    metric = bench.metric
    md_tuning: list[str] = []

    # 1a. the balanced loss, on validation
    scores = {}
    md_tuning += [f"### The loss without synthesis (validation {metric}, then overall; mean over seeds {tune_seeds})\n",
                  f"| loss | val {metric} | val overall |", "|---|---|---|"]
    for name, loss in {"cross-entropy": {"loss": "ce"}, **bench.losses}.items():
        vals = [runner.plain_metrics(s, loss, "val") for s in tune_seeds]
        scores[name] = (np.mean([v[metric] for v in vals]), np.mean([v["overall"] for v in vals]))
        md_tuning.append(f"| {name} | {scores[name][0]:.3f} | {scores[name][1]:.3f} |")
        log(f"tune loss {name}: val {metric} {scores[name][0]:.3f}")
    best_loss_name = max(bench.losses, key=lambda n: scores[n])
    best_loss = bench.losses[best_loss_name]
    log(f"chosen loss: {best_loss_name} {best_loss}")

    # 1b. generation settings, with that loss
    def tune_rows(label: str, grid: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        nonlocal md_tuning
        md_tuning += [f"\n### {label} (validation, {best_loss_name}, full budget, mean over seeds {tune_seeds})\n",
                      f"| setting | val {metric} | val overall | kept | fidelity |", "|---|---|---|---|---|"]
        best, best_key = None, None
        for changes in grid:
            tag = ", ".join(f"{k}={v}" for sec in changes.values() for k, v in sec.items())
            ms = [runner.synthesis("tune-" + tag.replace(", ", "-").replace("=", ""), s, best_loss, changes, "val")
                  for s in tune_seeds]
            key = (np.mean([m[metric] for m in ms]), np.mean([m["overall"] for m in ms]))
            md_tuning.append(f"| {tag} | {key[0]:.3f} | {key[1]:.3f} | {np.mean([m['kept'] for m in ms]):.0f} | "
                             f"{fmt([m['fidelity'] for m in ms])} |")
            log(f"tune {label} {tag}: val {metric} {key[0]:.3f}")
            if best_key is None or key > best_key:
                best, best_key = changes, key
        return best

    guided = tune_rows("Guided synthesis (entropy): strength x scale", [
        {"generate": {"criterion": "entropy", "strength": st, "scale": sc}} for st in strengths for sc in scales])
    unguided = tune_rows("Unguided real-conditioned synthesis: strength", [
        {"generate": {"criterion": "none", "strength": st}} for st in strengths])
    prior = tune_rows("The class prior of the adjusted loss with synthetic images in the batch", [
        {**guided, "retrain": {"prior": p}} for p in ("real", "batch")])["retrain"]["prior"]
    g_gen = {**guided["generate"]}
    u_gen = {**unguided["generate"]}
    log(f"chosen: guided {g_gen}, unguided {u_gen}, prior {prior}")

    # 2. the rows, paired by seed
    rows: dict[str, list[dict[str, Any]]] = {}

    def add(name: str, m: dict[str, Any]) -> None:
        rows.setdefault(name, []).append(m)
        log(f"{name}: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}))

    full, half = budgets
    stopped: dict[str, list[str]] = {}
    rounds_row = f"guided (entropy), {rounds} rounds, full budget"
    for seed in seeds:
        add("baseline (cross-entropy)", runner.plain_metrics(seed, {"loss": "ce"}, "test"))
        for name, loss in bench.losses.items():
            add(f"{name}, no synthesis", runner.plain_metrics(seed, loss, "test"))
        ret = {"retrain": {"prior": prior}}
        for budget, label in ((full, "full"), (half, "half")):
            fb = {"feedback": {"budget_fraction": budget}}
            add(f"unguided, real-conditioned, {label} budget",
                runner.synthesis(f"unguided-{label}", seed, best_loss, {**fb, **ret, "generate": u_gen}))
            for crit in CRITERIA:
                add(f"guided ({crit}), {label} budget",
                    runner.synthesis(f"guided-{crit}-{label}", seed, best_loss,
                                     {**fb, **ret, "generate": {**g_gen, "criterion": crit}}))
        add(rounds_row, runner.synthesis(f"guided-entropy-rounds{rounds}", seed, best_loss,
                                         {"feedback": {"budget_fraction": full, "rounds": rounds}, **ret,
                                          "generate": g_gen}))
        if bench.starving_rows:  # strict filters starve rare classes; what does re-admission do?
            strict = {"support_margin": 1.0, "support_quantile": 0.9}
            for floor, label in ((0.0, "no re-admission"), (0.5, "re-admission to 50%")):
                name = f"guided (entropy), strict filters, {label}"
                try:
                    add(name, runner.synthesis(f"strict-floor{floor}", seed, best_loss,
                                               {"feedback": {"budget_fraction": full}, **ret, "generate": g_gen,
                                                "filter": {**strict, "min_kept_fraction": floor}}))
                except DataError as exc:  # the filters kept nothing: the run would stop here
                    stopped.setdefault(name, []).append(f"seed {seed}: {str(exc)[:160]}")
                    log(f"{name}: stopped ({exc})")
        add("oracle (balanced real task data)", runner.oracle(seed))

    # 3. paired differences
    def diff(a: str, b: str) -> Optional[tuple[float, float, float]]:
        if a not in rows or b not in rows:
            return None
        return bootstrap_ci([x[metric] - y[metric] for x, y in zip(rows[a], rows[b])])

    no_syn = f"{best_loss_name}, no synthesis"
    comparisons = [(f"guided ({c}) vs unguided, full budget", f"guided ({c}), full budget",
                    "unguided, real-conditioned, full budget") for c in CRITERIA]
    comparisons += [(f"guided ({c}) vs unguided, half budget", f"guided ({c}), half budget",
                     "unguided, real-conditioned, half budget") for c in CRITERIA]
    comparisons += [(f"synthesis (guided entropy, full) + {best_loss_name} vs {best_loss_name} alone",
                     "guided (entropy), full budget", no_syn),
                    (f"synthesis (unguided, full) + {best_loss_name} vs {best_loss_name} alone",
                     "unguided, real-conditioned, full budget", no_syn),
                    ("guided (entropy) at half budget vs unguided at full budget", "guided (entropy), half budget",
                     "unguided, real-conditioned, full budget"),
                    (f"{rounds} rounds vs one-shot (entropy, full budget)", rounds_row, "guided (entropy), full budget")]
    if bench.starving_rows:
        comparisons.append(("re-admission vs none, under strict filters",
                            "guided (entropy), strict filters, re-admission to 50%",
                            "guided (entropy), strict filters, no re-admission"))
    sentences, diff_lines = [], [f"| comparison | mean paired difference in {metric} | 95% bootstrap CI | "
                                 f"CI excludes 0 |", "|---|---|---|---|"]
    for label, a, b in comparisons:
        d = diff(a, b)
        if d is None:
            continue
        mean, lo, hi = d
        diff_lines.append(f"| {label} | {mean:+.3f} | {lo:+.3f} .. {hi:+.3f} | {'yes' if lo > 0 or hi < 0 else 'no'} |")
        sentences.append("- " + verdict(label, metric, mean, lo, hi))

    # the tables
    extra = ("fidelity", "generated", "kept", "readmitted")
    header = ["setting", *bench.columns, *extra]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, ms in rows.items():
        cells = [fmt([m.get(c) for m in ms]) for c in bench.columns]
        cells.append(fmt([m.get("fidelity") for m in ms]))
        for c in ("generated", "kept", "readmitted"):
            cells.append(f"{np.mean([m[c] for m in ms]):.0f}" if c in ms[0] else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    minutes = (time.time() - t_start) / 60
    cfg = base_config(bench)
    md = [f"# {bench.dataset} benchmark: does synthesis pay off?\n",
          f"Command: `{command}`  ",
          f"Seeds {seeds} (paired: a seed fixes data.split_seed, the baselines, the real start images and the "
          f"shard seeds); tuning on the validation split of seeds {tune_seeds}; wall time {minutes:.1f} min on this "
          f"machine ({os.cpu_count()} CPUs).  ",
          f"Chosen on validation: loss {best_loss_name} {best_loss}; guided {g_gen}; unguided {u_gen}; prior "
          f"{prior}. Generation {cfg.generate.num_inference_steps} DDIM steps, CFG {cfg.generate.cfg_scale}, "
          f"guided every {cfg.generate.guide_every} steps; retrain {cfg.retrain.epochs} epochs, synthetic fraction "
          f"{cfg.retrain.synthetic_fraction}; classifier {cfg.train.model}.\n",
          "Columns: test accuracy, mean ± std over seeds; fidelity = share of kept synthetic images that an oracle "
          "trained on balanced real task data labels as intended; images generated, kept and re-admitted "
          "(for starved classes), mean per seed.\n", "\n".join(lines), "",
          f"## Paired differences (test {metric}, over seeds {seeds})\n", "\n".join(diff_lines), "",
          *sentences, "",
          *(["Rows that stopped (the filters kept nothing, as a run would stop): "
             + "; ".join(f"{k}: {len(v)} seed(s)" for k, v in stopped.items()), ""] if stopped else []),
          "## Tuning (validation split only)\n", *md_tuning, ""]
    storage.write_text(output, "\n".join(md))
    storage.write_json(output.rsplit(".", 1)[0] + ".json", {
        "rows": rows, "chosen": {"loss": best_loss, "loss_name": best_loss_name, "guided": g_gen,
                                 "unguided": u_gen, "prior": prior}, "minutes": minutes, "seeds": seeds})
    print("\n".join(lines + [""] + diff_lines + [""] + sentences))
    log(f"written to {output}")
    return 0


def main_for(bench: Benchmark, argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=f"The {bench.dataset} benchmark (benchmarks/synthesis_benchmark.py)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--tune-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--strengths", type=float, nargs="+", default=[0.6, 0.8, 1.0])
    p.add_argument("--scales", type=float, nargs="+", default=[0.01, 0.03])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="config override for every row, e.g. retrain.epochs=20")
    p.add_argument("--work", help="scratch folder (default: a temporary one); a re-run with the same one resumes")
    p.add_argument("--output", default=f"benchmarks/results/{bench.dataset.replace('-', '_')}.md")
    args = p.parse_args(argv)
    import tempfile

    bench.overrides = list(args.set)
    work = args.work or tempfile.mkdtemp(prefix="fs-bench-")
    return run(bench, args.seeds, args.tune_seeds, work, args.output, args.strengths, args.scales, rounds=args.rounds)
