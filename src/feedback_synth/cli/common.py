"""What the verbs share: how a run configuration is read from the command line."""
from __future__ import annotations

import argparse


def load_config(args: argparse.Namespace):
    """The dataset's preset < ``--config`` < ``--set``, as every verb reads it (a ``RunConfig``)."""
    from feedback_synth.config import resolve_run_config  # here, not at start-up: --help stays fast

    return resolve_run_config(getattr(args, "dataset", None), args.config, getattr(args, "set", None))


def add_config_args(p: argparse.ArgumentParser, output_help: str = "output folder URL") -> None:
    p.add_argument("--config", help="YAML file with per-stage sections (data, train, feedback, generate, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set generate.scale=0.01 (repeatable)")
    p.add_argument("--output", help=output_help)
    p.add_argument("--overwrite", action="store_true",
                   help="redo outputs made with another config or from other inputs, instead of refusing")
