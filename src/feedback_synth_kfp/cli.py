"""`feedback-synth compile` and `feedback-synth submit`."""
from __future__ import annotations

import json
import os
import tempfile
import time

from feedback_synth.errors import ConfigError
from feedback_synth_kfp.submit import (
    DEFAULT_EXPERIMENT,
    compile_to,
    config_parameters,
    cron_expression,
    merge_parameters,
    parse_params,
    pipeline_parameters,
    submit,
)


def cmd_compile(args) -> int:
    path = compile_to(args.output, args)
    print(f"pipeline written to {path}")
    return 0


def cmd_submit(args) -> int:
    from feedback_synth.config import resolve_run_config

    if bool(args.recurring) != bool(args.job_name):
        raise ConfigError("--recurring CRON and --job-name NAME go together")
    if args.recurring:
        cron_expression(args.recurring)  # check it before any work
    if args.timeout <= 0:
        raise ConfigError(f"--timeout must be > 0, got {args.timeout}")
    run_name = args.run_name or f"{args.run_name_prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or next((p.split("=", 1)[1] for p in args.param if p.startswith("dataset=")), None)
        cfg = resolve_run_config(dataset, args.config, args.set)
        # the built-in pipeline, compiled with the rounds the config asks for (KFP unrolls them)
        package = args.package or compile_to(os.path.join(tmp, "feedback_synth_pipeline.yaml"),
                                             rounds=cfg.feedback.rounds)
        spec = pipeline_parameters(package)
        explicit = parse_params(args.param, spec)
        params = merge_parameters(config_parameters(cfg, spec), explicit)
        result = submit(args.host, package, params, namespace=args.namespace, experiment=args.experiment,
                        run_name=run_name, recurring=args.recurring, job_name=args.job_name, timeout_s=args.timeout)
    what = "recurring run" if args.recurring else "run"
    print(f"submitted {what} to {args.host}: {json.dumps(result)}")
    return 0


def add_kfp_commands(subparsers) -> None:
    """``compile`` and ``submit`` (called by cli.build_parser)."""
    p = subparsers.add_parser("compile", help="compile the KFP pipeline to a YAML file")
    p.add_argument("--output", required=True, help="where to write the compiled pipeline (YAML)")
    p.add_argument("--pipeline", choices=("run", "pilot", "piloted"), default="run",
                   help="run: the whole pipeline (default); pilot: the pilot, its folds and cells fanned out; "
                        "piloted: the pilot, then the run with its choice when it says go")
    p.add_argument("--parallelism", type=int, help="generation shards running at once (default: 8)")
    p.add_argument("--rounds", type=int, help="feedback rounds, unrolled in the pipeline (default: 1; runs must "
                                              "set the same feedback.rounds)")
    p.add_argument("--gpu-type", help="accelerator resource of the GPU tasks (default: nvidia.com/gpu)")
    p.add_argument("--gpu-retries", type=int, help="retries of a GPU task, for preemptible nodes (default: 3)")
    p.set_defaults(func=cmd_compile)

    p = subparsers.add_parser("submit", help="send the pipeline to a Kubeflow Pipelines API (a run, or a recurring run)")
    p.add_argument("--host", required=True, help="KFP API URL, e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888")
    p.add_argument("--namespace", help="namespace of the run (multi-user KFP: the profile namespace)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help=f"experiment name (default: {DEFAULT_EXPERIMENT})")
    names = p.add_mutually_exclusive_group()
    names.add_argument("--run-name", help="the run's name")
    names.add_argument("--run-name-prefix", default="feedback-synth",
                       help="name the run PREFIX-YYYYmmdd-HHMMSS (default prefix: feedback-synth)")
    p.add_argument("--dataset", help="digits-lt | digits-groups | a dataset URL (default: digits-lt); "
                                      "a built-in dataset brings its preset, as with run")
    p.add_argument("--config", help="YAML file with per-stage sections, as with run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set generate.strength=0.6 (repeatable)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a pipeline parameter, over the configuration (repeatable); dicts and lists as JSON, e.g. "
                        "--param 'gpu_node_selector={\"cloud.google.com/gke-accelerator\": \"nvidia-l4\"}'")
    p.add_argument("--package", help="a compiled pipeline YAML (default: compile the built-in pipeline)")
    p.add_argument("--recurring", metavar="CRON",
                   help="create a recurring run on this schedule (5-field crontab, or KFP's 6 fields)")
    p.add_argument("--job-name", help="name of the recurring run (with --recurring)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the KFP API to answer before giving up (default: 10)")
    p.set_defaults(func=cmd_submit)
