"""``feedback-synth``: one verb per stage, plus ``run`` for the whole pipeline.

A thin shell over the library: parse arguments, build the typed configs, call a stage function.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from . import io
from .config import RunConfig, resolve_run_config
from .errors import FeedbackSynthError

def _load_config(args) -> RunConfig:
    return resolve_run_config(getattr(args, "dataset", None), args.config, getattr(args, "set", None))


def _default_output() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def _add_common(p: argparse.ArgumentParser, output_help: str = "output folder URL") -> None:
    p.add_argument("--config", help="YAML file with per-stage sections (data, train, feedback, generate, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set generate.scale=0.01 (repeatable)")
    p.add_argument("--output", help=output_help)


def cmd_run(args) -> int:
    cfg = _load_config(args)
    output = args.output or _default_output()
    t0 = time.time()
    if args.runner == "kfp-local":
        from .kfp_runner import run_kfp_local

        report = run_kfp_local(cfg, output)
    else:
        from .run import run_pipeline

        report = run_pipeline(cfg, output)
    from .run import format_summary

    print(format_summary(report))
    print(f"\nfinished in {time.time() - t0:.1f} s; resolved config: {io.join(output, 'config.yaml')}")
    return 0


def cmd_pretrain_generator(args) -> int:
    from .config import DataConfig
    from .data import BUILTIN
    from .generators import PretrainConfig, builtin_generator_path, pretrain_generator
    from .config import from_dict, parse_overrides

    if args.dataset not in BUILTIN:
        raise FeedbackSynthError(f"pretrain-generator trains the bundled generator of a built-in dataset "
                                 f"({', '.join(BUILTIN)}), not '{args.dataset}'")
    cfg = from_dict(PretrainConfig, parse_overrides(args.set).get("pretrain", {}), "pretrain")
    if args.dataset == "digits-groups":
        cfg.joint_groups = True
    pool = BUILTIN[args.dataset](DataConfig().split_seed)["pool"]
    output = args.output or builtin_generator_path(args.dataset)
    print(pretrain_generator(pool, cfg, output))
    from .generators import generator_fidelity

    fid = generator_fidelity(output, pool)
    meta = io.read_json(io.join(output, "generator.json"))
    io.write_json(io.join(output, "generator.json"), {**meta, "fidelity": fid})
    print(f"fidelity of unguided samples (pool-trained classifier): {fid['fidelity']:.3f}")
    print(f"generator written to {output}")
    return 0


def cmd_stage(args) -> int:
    from . import stages
    from .generate import generate

    cfg = _load_config(args)
    out = args.output
    if args.command == "prepare-data":
        result = stages.prepare_data(cfg.data, out)
    elif args.command == "train-baseline":
        result = stages.train_baseline(args.data, out, cfg.train, cfg.data)
    elif args.command == "extract-feedback":
        result = stages.extract_feedback(args.data, args.model, out, cfg.feedback)
    elif args.command == "generate":
        result = generate(stages.plan_url(args.feedback), args.data, args.model, args.feedback, out, cfg.generate,
                          shard_ids=args.shard or None)
    elif args.command == "filter":
        result = stages.filter_synthetic(args.data, args.model, args.feedback, args.generated, out, cfg.filter)
    elif args.command == "retrain":
        result = stages.retrain(args.data, args.model, args.filtered, out, cfg.retrain, cfg.data)
    elif args.command == "evaluate":
        result = stages.evaluate_run(args.data, args.baseline, args.retrained, args.filtered, out, cfg.data)
        print(stages.format_report(result))
    else:  # pragma: no cover - argparse restricts the choices
        raise AssertionError(args.command)
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_class", "confusion_matrix")}, indent=2,
                     default=str))
    return 0


def cmd_estimate_memory(args) -> int:
    from .data import BUILTIN
    from .generate import estimate_generation_memory

    cfg = _load_config(args)
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
    parser = argparse.ArgumentParser(prog="feedback-synth", description=__doc__.splitlines()[0].strip("`"))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the whole pipeline (in process or through the KFP local runner)")
    p.add_argument("--dataset", help="digits-lt | digits-groups | a dataset URL (default: digits-lt)")
    _add_common(p, "output folder URL (default: a fresh folder under ./runs/)")
    p.add_argument("--runner", choices=("inprocess", "kfp-local"), default="inprocess")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("pretrain-generator", help="train the bundled generator on the generator pool")
    p.add_argument("--dataset", default="digits-lt")
    p.add_argument("--set", action="append", default=[], metavar="pretrain.KEY=VALUE")
    p.add_argument("--output", help="where to write it (default: the package's weights folder)")
    p.set_defaults(func=cmd_pretrain_generator)

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
            p.add_argument("--dataset", help="digits-lt | digits-groups | a dataset URL")
        for arg in needs:
            p.add_argument(f"--{arg}", required=True, help=helps[arg])
        if name == "generate":
            p.add_argument("--shard", type=int, action="append", help="only this shard (repeatable)")
        _add_common(p)
        p.set_defaults(func=cmd_stage)
        p.set_defaults(output_required=True)

    try:  # the KFP and registry verbs live in their own modules
        from .kfp_cli import add_kfp_commands

        add_kfp_commands(sub)
    except ImportError:
        pass
    try:
        from .mlflow_tracking import add_registry_commands

        add_registry_commands(sub)
    except ImportError:
        pass
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "output_required", False) and not args.output:
        parser.error(f"{args.command}: --output is required")
    try:
        return args.func(args)
    except FeedbackSynthError as exc:
        print(f"feedback-synth: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"feedback-synth: error: file not found: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
