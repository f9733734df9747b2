"""`feedback-synth`: one verb per stage, plus `run` for the whole pipeline."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from typing import Optional

from feedback_synth.cli.common import add_config_args, load_config
from feedback_synth.cli.registry_verbs import add_registry_commands
from feedback_synth.errors import FeedbackSynthError
from feedback_synth.orchestration import DEFAULT_FOLDS


def _default_output() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def cmd_run(args) -> int:
    from feedback_synth import storage
    from feedback_synth.orchestration.run import check_lasting_output

    cfg = load_config(args)
    args.tracking_enabled = cfg.tracking.enabled
    output = args.output or _default_output()
    check_lasting_output(output, "run")
    t0 = time.time()
    if args.pilot:  # the pilot first, into <output>/pilot; its choice is the run's config
        from feedback_synth.config import RunConfig, from_dict
        from feedback_synth.orchestration.tune import validation_table

        pilot_url = storage.join(output, "pilot")
        pilot_cfg = cfg
        if cfg.tracking.enabled and not cfg.tracking.tracking_uri:  # the pilot's MLflow run beside the run's
            from dataclasses import replace

            from feedback_synth.tracking.client import tracking_location

            pilot_cfg = replace(cfg, tracking=replace(cfg.tracking, tracking_uri=tracking_location(cfg.tracking, output)))
        report = run_pilot_verb(pilot_cfg, pilot_url, args.pilot_grid, args.pilot_folds, args.pilot_epochs,
                                args.runner, args.overwrite, flags="--pilot-")
        print(validation_table(report))
        if not report["beats_no_synthesis"]:
            print(f"no-go: the run was not started (the pilot's report: {storage.join(pilot_url, 'tune_report.json')})")
            return 0
        cfg = from_dict(RunConfig, report["config"])
        print(f"go: running with the pilot's choice ({report['chosen']}; {storage.join(pilot_url, 'chosen.yaml')})")
    if args.runner == "kfp-local":
        from feedback_synth_kfp.local_runner import run_kfp_local

        report = run_kfp_local(cfg, output, overwrite=args.overwrite)
    else:
        from feedback_synth.orchestration.run import run_pipeline

        report = run_pipeline(cfg, output, overwrite=args.overwrite)
    from feedback_synth.reporting.tables import format_summary

    print(format_summary(report))
    print(f"\nfinished in {time.time() - t0:.1f} s; resolved config: {storage.join(output, 'config.yaml')}")
    return 0


def cmd_tune(args) -> int:
    from feedback_synth import storage
    from feedback_synth.orchestration.run import check_lasting_output
    from feedback_synth.orchestration.tune import validation_table

    cfg = load_config(args)
    args.tracking_enabled = cfg.tracking.enabled
    output = args.output or _default_output().rstrip("/") + "-tune"
    check_lasting_output(output, "tune")
    report = run_pilot_verb(cfg, output, args.grid, args.folds, args.epochs, args.runner, args.overwrite)
    print(validation_table(report))
    print(f"chosen config: {storage.join(output, 'chosen.yaml')} (feedback-synth run --config it)")
    return 0


def run_pilot_verb(cfg, output: str, grid_args: list[str], folds: int, epochs: int, runner: str,
                   overwrite: bool, flags: str = "--") -> dict:
    """The pilot as ``tune`` and ``run --pilot`` run it: checks before any work, then in process
    or through the KFP local runner (which opens its own MLflow run). ``flags``: how the command
    line names the pilot's options (``--grid`` for tune, ``--pilot-grid`` for run), for the errors."""
    from dataclasses import asdict

    from feedback_synth.config import resolve_devices
    from feedback_synth.errors import ConfigError
    from feedback_synth.orchestration.preflight import preflight
    from feedback_synth.orchestration.run import check_output_outside_dataset, make_tracker
    from feedback_synth.orchestration.tune import (
        DEFAULT_GRID,
        check_grid,
        check_pilot_counts,
        parse_grid,
        remove_pilot_outputs,
        run_pilot,
    )

    resolve_devices(cfg)  # a device this machine lacks: one line, before any work (the pilot resolves its own)
    check_output_outside_dataset(cfg.data.dataset, output)
    try:
        grid = parse_grid(grid_args) if grid_args else DEFAULT_GRID
        check_grid(cfg, grid)  # every setting builds a valid config, before any work
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("--grid", f"{flags}grid", 1)) from None
    check_pilot_counts(folds, epochs, flags)
    preflight(cfg, output)  # the data, the generator against it (class names too), the output (writable)
    if runner == "kfp-local":
        from feedback_synth_kfp.local_runner import run_pilot_kfp_local

        if overwrite:
            remove_pilot_outputs(output)
        return run_pilot_kfp_local(cfg, output, grid, folds, epochs)
    tracker = make_tracker(cfg.tracking, output)
    tracker.start(f"tune {output.rstrip('/').rsplit('/', 1)[-1]}", asdict(cfg))
    status = "FAILED"
    try:
        report = run_pilot(cfg, output, grid, epochs, tracker, overwrite=overwrite, folds=folds)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    return report

def cmd_pretrain_generator(args) -> int:
    from feedback_synth import storage
    from feedback_synth.config import DataConfig, from_dict, parse_overrides
    from feedback_synth.data.prepare import BUILTIN
    from feedback_synth.generation.bundled import PretrainConfig, pretrain_generator
    from feedback_synth.generation.loading import builtin_generator_path

    if args.dataset not in BUILTIN:
        raise FeedbackSynthError(f"pretrain-generator trains the bundled generator of a built-in dataset "
                                 f"({', '.join(BUILTIN)}), not '{args.dataset}'")
    cfg = from_dict(PretrainConfig, parse_overrides(args.set).get("pretrain", {}))
    if args.dataset == "digits-groups":
        cfg.joint_groups = True
    pool = BUILTIN[args.dataset](DataConfig().split_seed)["pool"]
    output = args.output or builtin_generator_path(args.dataset)
    print(pretrain_generator(pool, cfg, output))
    from feedback_synth.devices import resolve_device
    from feedback_synth.generation.bundled import generator_fidelity

    fid = generator_fidelity(output, pool, device=resolve_device(cfg.device, "pretrain.device"))
    meta = storage.read_json(storage.join(output, "generator.json"))
    storage.write_json(storage.join(output, "generator.json"), {**meta, "fidelity": fid})
    print(f"fidelity of unguided samples (pool-trained classifier): {fid['fidelity']:.3f}")
    print(f"generator written to {output}")
    return 0


def cmd_pretrain_oracle(args) -> int:
    import tempfile

    from feedback_synth.config import DataConfig, TrainConfig
    from feedback_synth.data.prepare import prepare_dataset
    from feedback_synth.devices import resolve_device
    from feedback_synth.training.oracle import pretrain_oracle

    model = args.model or TrainConfig().model
    with tempfile.TemporaryDirectory(prefix="feedback-synth-oracle-") as tmp:
        info = prepare_dataset(DataConfig(dataset=args.dataset), tmp)
        if "oracle" not in info.splits:
            raise FeedbackSynthError(f"{args.dataset} has no oracle split (balanced real task data): "
                                     "there is no fidelity oracle to train")
        written = pretrain_oracle(tmp, model, args.output, device=resolve_device(args.device, "--device"))
        print(f"oracle written to {written}")
    return 0


def cmd_stage(args) -> int:
    from feedback_synth.config import resolve_devices
    from feedback_synth.stages.adapt_generator import adapt_generator
    from feedback_synth.stages.evaluate import evaluate_run
    from feedback_synth.stages.extract_feedback import extract_feedback
    from feedback_synth.stages.filter_synthetic import filter_synthetic
    from feedback_synth.stages.generate_shard import generate
    from feedback_synth.stages.prepare_data import prepare_data
    from feedback_synth.stages.retrain import retrain
    from feedback_synth.stages.train_baseline import train_baseline

    cfg = resolve_devices(load_config(args))  # a device this machine lacks: one line, before any work
    out, again = args.output, args.overwrite
    if args.command == "prepare-data":
        result = prepare_data(cfg.data, out, overwrite=again)
    elif args.command == "train-baseline":
        result = train_baseline(args.data, out, cfg.train, cfg.data, overwrite=again)
    elif args.command == "adapt-generator":
        result = adapt_generator(args.data, args.model, out, cfg.adapt, cfg.generate, overwrite=again)
    elif args.command == "extract-feedback":
        result = extract_feedback(args.data, args.model, out, cfg.feedback, overwrite=again)
    elif args.command == "generate":
        result = generate(args.data, args.model, args.feedback, out, cfg.generate, shard_ids=args.shard or None,
                                 overwrite=again)
    elif args.command == "filter":
        result = filter_synthetic(args.data, args.model, args.feedback, args.generated, out, cfg.filter,
                                         overwrite=again)
    elif args.command == "retrain":
        result = retrain(args.data, args.model, args.filtered, out, cfg.retrain, cfg.data, overwrite=again)
    elif args.command == "evaluate":
        from feedback_synth.reporting.tables import format_report

        result = evaluate_run(args.data, args.baseline, args.retrained, args.filtered, out, cfg.data,
                                     device=cfg.device, overwrite=again)
        print(format_report(result.summary))
    else:  # pragma: no cover - argparse restricts the choices
        raise AssertionError(args.command)
    print(json.dumps({k: v for k, v in result.summary.items() if k not in ("per_class", "confusion_matrix")},
                     indent=2, default=str))
    return 0


def cmd_estimate_memory(args) -> int:
    from feedback_synth.data.prepare import BUILTIN
    from feedback_synth.generation.memory import estimate_generation_memory

    cfg = load_config(args)
    g = cfg.generate
    num_classes, image_size, in_chans = args.num_classes, args.image_size, args.in_chans
    if cfg.data.dataset in BUILTIN:  # the classifier's shape follows the built-in data
        train = BUILTIN[cfg.data.dataset]()["train"]
        num_classes = num_classes or len(train.class_names)
        image_size, in_chans = image_size or train.images.shape[1], in_chans or train.images.shape[3]
    if num_classes is None:
        raise FeedbackSynthError("--num-classes is needed for a dataset URL (the classifier's output size)")
    if args.batch_size is not None and args.batch_size < 1:
        raise FeedbackSynthError(f"--batch-size must be >= 1, got {args.batch_size}")
    estimate = estimate_generation_memory(g, args.classifier_model or cfg.train.model, num_classes, image_size or 224,
                                          in_chans or 3, args.batch_size, args.height, args.width, cfg.data.dataset)
    print(estimate.table(g))
    print("estimated without running a kernel (FakeTensorMode); add room for the CUDA context, kernel "
          "workspaces and allocator fragmentation (the benchmark's rule: 4 GiB on a 24 GB card)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feedback-synth", description="feedback-synth: fix imbalanced image classifiers with feedback-guided diffusion synthesis")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline (in process or through the KFP local runner)")
    p.add_argument("--dataset", help="digits-lt | digits-groups | a dataset URL (default: digits-lt)")
    add_config_args(p, "output folder URL (default: a fresh folder under ./runs/)")
    p.add_argument("--runner", choices=("inprocess", "kfp-local"), default="inprocess")
    p.add_argument("--pilot", action="store_true",
                   help="run the pilot first (into OUTPUT/pilot, as tune does) and run with its choice; stop after it "
                        "on no-go")
    p.add_argument("--pilot-grid", action="append", default=[], metavar="SECTION.FIELD=V1,V2",
                   help="with --pilot: a grid axis (repeatable; default: tune's grid)")
    p.add_argument("--pilot-folds", type=int, default=DEFAULT_FOLDS,
                   help=f"with --pilot: folds of train + val (default: {DEFAULT_FOLDS})")
    p.add_argument("--pilot-epochs", type=int, default=0,
                   help="with --pilot: epochs of the pilot's trainings (default 0: the run's)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tune", help="the pilot: try a small grid of synthesis settings on repeated validation "
                                    "splits (folds of train + val) with short trainings; go only when a setting's "
                                    "gain has a CI above zero; write the chosen config")
    p.add_argument("--dataset", help="digits-lt | digits-gap | digits-groups | a dataset URL")
    add_config_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="SECTION.FIELD=V1,V2",
                   help="a grid axis (repeatable); default: adapt.method=none,full x generate.criterion=none,entropy "
                        "x generate.strength=0.8,1.0")
    p.add_argument("--epochs", type=int, default=0,
                   help="epochs of the pilot's baselines and retrainings (default 0: the run's; fewer is faster "
                        "but exaggerates synthesis' gain)")
    p.add_argument("--runner", choices=("inprocess", "kfp-local"), default="inprocess",
                   help="kfp-local: the pilot pipeline through the KFP local runner (folds and cells fanned out)")
    p.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                   help=f"repeated validation splits of train + val (default: {DEFAULT_FOLDS}; each its own "
                        "baseline and seeds; the test split is never read)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("pretrain-generator", help="train the bundled generator on the generator pool")
    p.add_argument("--dataset", default="digits-lt")
    p.add_argument("--set", action="append", default=[], metavar="pretrain.KEY=VALUE")
    p.add_argument("--output", help="where to write it (default: the package's weights folder)")
    p.set_defaults(func=cmd_pretrain_generator)

    p = sub.add_parser("pretrain-oracle", help="train the fidelity oracle that the package ships for a built-in dataset")
    p.add_argument("--dataset", default="digits-lt", help="a built-in dataset or a dataset URL with an oracle split")
    p.add_argument("--model", help="timm model name (default: the run's default, train.model)")
    p.add_argument("--output", help="where to write it (default: the package's weights/oracles folder)")
    p.add_argument("--device", default="auto", help="where it trains: auto (CUDA where present), cpu, cuda[:N], mps")
    p.set_defaults(func=cmd_pretrain_oracle)

    p = sub.add_parser("estimate-memory",
                       help="estimate the GPU memory of one generation batch with this config (no GPU, no weights)")
    p.add_argument("--dataset", help="digits-lt | digits-groups | a dataset URL (default: digits-lt)")
    p.add_argument("--config", help="YAML file with per-stage sections, as with run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set generate.guidance_chunk_size=1 (repeatable)")
    p.add_argument("--batch-size", type=int, help="default: generate.batch_size")
    p.add_argument("--height", type=int, help="image height in pixels (default: the generator's native size)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the generator's native size)")
    p.add_argument("--classifier-model", help="timm model of the baseline classifier (default: train.model)")
    p.add_argument("--num-classes", type=int, help="classes of the classifier (built-in data: its classes)")
    p.add_argument("--image-size", type=int, help="classifier input size (built-in data: its size; else 224)")
    p.add_argument("--in-chans", type=int, help="classifier input channels (built-in data: its channels; else 3)")
    p.set_defaults(func=cmd_estimate_memory)

    stage_args = {
        "prepare-data": [],
        "train-baseline": ["data"],
        "adapt-generator": ["data", "model"],
        "extract-feedback": ["data", "model"],
        "generate": ["data", "model", "feedback"],
        "filter": ["data", "model", "feedback", "generated"],
        "retrain": ["data", "model", "filtered"],
        "evaluate": ["data", "baseline", "retrained", "filtered"],
    }
    helps = {"data": "prepared dataset URL (output of prepare-data)", "model": "baseline model folder URL",
             "feedback": "output URL of extract-feedback", "generated": "output URL of generate",
             "filtered": "output URL of filter", "baseline": "output URL of train-baseline",
             "retrained": "output URL of retrain"}
    for name, needs in stage_args.items():
        p = sub.add_parser(name, help=f"run the {name} stage alone (as its KFP component does)")
        if name == "prepare-data":
            p.add_argument("--dataset", help="digits-lt | digits-gap | digits-groups | a dataset URL")
        for arg in needs:
            p.add_argument(f"--{arg}", required=True, help=helps[arg])
        if name == "generate":
            p.add_argument("--shard", type=int, action="append", help="only this shard (repeatable)")
        add_config_args(p)
        p.set_defaults(func=cmd_stage)
        p.set_defaults(output_required=True)

    add_registry_commands(sub)
    _add_kfp_commands(sub)
    return parser


def _add_kfp_commands(sub) -> None:
    """``compile`` and ``submit`` come from feedback_synth_kfp. Without kfp installed they still show
    in ``--help`` and say what is missing when called; any other import error is a bug and is raised."""
    try:
        from feedback_synth_kfp.cli import add_kfp_commands
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in ("kfp", "kfp_server_api"):
            raise
        missing = exc.name

        def unavailable(args) -> int:
            raise FeedbackSynthError(f"'{args.command}' needs the Kubeflow Pipelines SDK: no module named "
                                     f"'{missing}' (pip install 'kfp>=2.10' kfp-kubernetes)")

        for verb in ("compile", "submit"):
            p = sub.add_parser(verb, help=f"(unavailable: no module named '{missing}')")
            p.set_defaults(func=unavailable)
        return
    add_kfp_commands(sub)


def main(argv: Optional[list[str]] = None) -> int:
    """The command line. Exit codes: 0 done; 2 a one-line error (bad config, data, tracking server,
    output); 130 interrupted (SIGINT, Ctrl-C); 143 terminated (SIGTERM). A re-run of an interrupted
    ``run`` with the same arguments resumes it."""
    from feedback_synth.interrupts import Terminated, handled

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "output_required", False) and not args.output:
        parser.error(f"{args.command}: --output is required")
    try:
        with handled():
            return args.func(args)
    except FeedbackSynthError as exc:
        print(f"feedback-synth: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"feedback-synth: error: file not found: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"feedback-synth: error: permission denied: {exc.filename or exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        where = exc.filename or getattr(args, "output", None) or "the output folder"
        print(f"feedback-synth: error: no space left on the device of {where}; free some space (or use another "
              f"--output) and run the same command again to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"feedback-synth: interrupted (SIGINT): {_closed_runs(args)}run the same command again to resume",
              file=sys.stderr)
        return 130
    except Terminated:
        print(f"feedback-synth: terminated (SIGTERM): {_closed_runs(args)}run the same command again to resume",
              file=sys.stderr)
        return 143


def _closed_runs(args) -> str:
    """What an interrupted command says of its MLflow runs: only a command that tracks opened any
    (``run`` and ``tune`` record ``tracking.enabled`` once their config is read; ``promote`` always tracks)."""
    return "open MLflow runs were closed FAILED; " if getattr(args, "tracking_enabled", args.command == "promote") else ""


if __name__ == "__main__":
    sys.exit(main())
