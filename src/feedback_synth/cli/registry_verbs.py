"""`feedback-synth compare` and `feedback-synth promote`."""
from __future__ import annotations

import json
import os
from typing import Any

from feedback_synth.cli.common import load_config
from feedback_synth.errors import ConfigError, DataError
from feedback_synth.tracking.base import KFP_RUN_ID_ENV

# The verbs import the library when they run, not when the parser is built: --help stays fast.


def _tracking_uri_arg(args) -> str:
    from feedback_synth.config import TrackingConfig
    from feedback_synth.tracking.client import resolve_tracking_uri

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri and getattr(args, "output", None):
        _check_run_folder(args.output)
        uri, _ = resolve_tracking_uri(TrackingConfig(), args.output)
    if not uri:
        raise ConfigError("no tracking store: pass --tracking-uri URI (a run's local store is "
                          "sqlite:///RUN_FOLDER/mlflow/mlflow.db), --output RUN_FOLDER, or set MLFLOW_TRACKING_URI")
    _check_sqlite_store(uri, new_store=False)
    return uri


def sqlite_path(uri: str):
    """The database file of a ``sqlite://`` tracking URI (None for another kind of store)."""
    from feedback_synth.tracking.client import sqlite_file

    return sqlite_file(uri)


def _check_sqlite_store(uri: str, new_store: bool) -> None:
    """MLflow creates a missing SQLite store (and its folders) at the first call: a typo in a URI
    would then read an empty registry, or write one where nobody looks. A verb that only reads
    (``compare``) needs the file; one that writes (``promote``) needs its folder. Nothing is created."""
    path = sqlite_path(uri)
    if path is None:
        return
    if not new_store and not os.path.isfile(path):
        raise DataError(f"no MLflow store at {uri} (no file {path}); pass an existing store, e.g. a run's "
                        "sqlite:///RUN_FOLDER/mlflow/mlflow.db, or --output RUN_FOLDER (nothing was created)")
    folder = os.path.dirname(os.path.abspath(path))
    if new_store and not os.path.isdir(folder):
        raise DataError(f"no folder {folder} for the MLflow store {uri}; create it, or fix the URI "
                        "(nothing was created)")


def _check_run_folder(output: str) -> None:
    """``--output`` names a run folder: one with a run record (run.json) or a local MLflow store; a
    typo is refused here, before resolving the store creates an empty one in its place."""
    from feedback_synth import storage

    local = storage.local_path(output)
    if storage.exists(storage.join(output, "run.json")) or (
            local is not None and os.path.isfile(os.path.join(local, "mlflow", "mlflow.db"))):
        return
    raise DataError(f"--output {output}: no run there (no run.json and no MLflow store mlflow/mlflow.db); pass a "
                    "run's output folder, or --tracking-uri URI")


def cmd_compare(args) -> int:
    from feedback_synth.registry.compare import compare_versions, format_comparison
    from feedback_synth.tracking.client import registry_client

    uri = _tracking_uri_arg(args)
    client = registry_client(uri)
    from feedback_synth.config import TrackingConfig

    name = args.model or TrackingConfig().registered_model
    cmp = compare_versions(client, name, tuple(args.versions) if args.versions else None)
    if args.json:
        print(json.dumps(cmp, indent=2))
    else:
        print(f"tracking {uri}")
        print(format_comparison(cmp))
    return 0


def _read_report(url: str) -> dict[str, Any]:
    from feedback_synth import storage

    if not url.endswith(".json"):
        url = storage.join(url, "report.json")
    if not storage.exists(url):
        raise DataError(f"evaluation report not found: {url}")
    report = storage.read_json(url)
    if not isinstance(report, dict) or "retrained" not in report:
        raise DataError(f"{url} is not an evaluation report (no 'retrained' metrics)")
    return report


def check_checkpoint(model_url: str) -> None:
    """DataError unless ``model_url`` is a classifier checkpoint folder (model.safetensors + config.json)."""
    from feedback_synth import storage

    missing = [n for n in ("model.safetensors", "config.json") if not storage.exists(storage.join(model_url, n))]
    if missing:
        what = "does not exist" if not storage.exists(model_url) else f"has no {' and no '.join(missing)}"
        raise DataError(f"--model {model_url} {what}: pass a classifier checkpoint folder (model.safetensors + "
                        "config.json), e.g. RUN_FOLDER/retrained/model (no MLflow run was opened)")


def cmd_promote(args) -> int:
    from dataclasses import asdict

    from feedback_synth import storage
    from feedback_synth.registry.register import register_and_promote
    from feedback_synth.tracking.mlflow_tracker import MLflowTracker

    cfg = load_config(args)
    if args.tracking_uri:
        cfg.tracking.tracking_uri = args.tracking_uri
    if args.registered_model:
        cfg.tracking.registered_model = args.registered_model
    report = _read_report(args.report)
    check_checkpoint(args.model)  # before any run is opened (a typo left two FAILED runs)
    output = args.output or "."
    if not (cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or args.output):
        raise ConfigError("promote: pass --tracking-uri (or tracking.tracking_uri / MLFLOW_TRACKING_URI), or "
                          "--output RUN_FOLDER to use that run's local store")
    _check_sqlite_store(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", ""), new_store=True)
    tracker = MLflowTracker(cfg.tracking, output, parent_run_id=args.parent_run_id, kfp_run_id=args.kfp_run_id)
    tracker.start(args.run_name or "promote", {"tracking": asdict(cfg.tracking), "promote": asdict(cfg.promote)})
    status = "FAILED"
    try:
        with tracker.stage("promote", asdict(cfg.promote)) as log:
            result = register_and_promote(tracker, args.model, report, cfg.promote, run_id=log.run_id,
                                          test_dataset_url=args.dataset)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    print(json.dumps(result, indent=2))
    if args.result:
        storage.write_json(args.result, result)
    return 0


def add_registry_commands(subparsers) -> None:
    """``feedback-synth compare`` and ``feedback-synth promote`` (called by cli.build_parser)."""
    p = subparsers.add_parser(
        "compare", help="print two versions of a registered model side by side, from the registry: the champion vs "
                        "the latest challenger, or after a promotion the champion vs the one it replaced",
        description="Without --versions: the champion vs the latest challenger when they differ; after a "
                    "promotion (the champion is the latest challenger), the new champion vs the champion it "
                    "replaced. Each version's gate decision and reason follow the table.")
    p.add_argument("--model", help="registered model name (default: tracking.registered_model)")
    p.add_argument("--versions", nargs=2, metavar=("A", "B"), help="compare these two versions instead (delta: B - A)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--output", help="a run folder: use its local store (<RUN>/mlflow/mlflow.db)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser("promote", help="register a model folder with its metrics and apply the "
                                              "champion/challenger gate (the promote stage alone)")
    p.add_argument("--model", required=True, help="checkpoint folder URL (model.safetensors + config.json)")
    p.add_argument("--report", required=True,
                   help="evaluation report: report.json or the evaluate stage's output folder URL")
    p.add_argument("--dataset", help="the prepared dataset folder URL whose test split the report's metrics come "
                                     "from (logged as the model's evaluation dataset)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.tracking_uri, $MLFLOW_TRACKING_URI)")
    p.add_argument("--registered-model", help="registered model name (default: tracking.registered_model)")
    p.add_argument("--parent-run-id", help="attach to this MLflow parent run (a KFP component)")
    p.add_argument("--kfp-run-id", help=f"tag the run with this KFP run id (default: ${KFP_RUN_ID_ENV})")
    p.add_argument("--run-name", help="name of a new parent run (without --parent-run-id)")
    p.add_argument("--result", help="also write the decision as JSON to this URL")
    p.add_argument("--config", help="YAML file (its tracking and promote sections are used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="e.g. --set promote.min_gain=0.02 (repeatable)")
    p.add_argument("--output", help="run folder whose local store to use when no tracking URI is set")
    p.set_defaults(func=cmd_promote)
