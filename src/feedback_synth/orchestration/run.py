"""The whole pipeline, in process: every stage in order, on one machine.

    prepare data -> train baseline -> adapt generator -> [extract feedback -> generate -> filter
    -> retrain] x rounds -> evaluate -> promote

A run owns its output folder: ``config.yaml`` (the resolved config), ``run.json`` (which process
writes it, and its MLflow parent run), one folder per stage (``data/``, ``baseline/``,
``feedback/``, ``generated/``, ``filtered/``, ``retrained/``, ``report/``; with feedback in rounds,
``rounds/round-<r>/{feedback,generated,filtered,retrained}``) and, for a local store, ``mlflow/``.

Re-running the same command into the same folder resumes: every finished stage (and shard) is
skipped by its fingerprint (``pipeline.resume``), and the MLflow runs that the dead process left
RUNNING are closed KILLED. Another config into a folder that holds a run is refused, naming the
fields that differ; ``overwrite=True`` (``--overwrite``) starts over in it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import asdict, replace
from typing import Any, Iterator, Optional

import yaml

from feedback_synth import storage
from feedback_synth.config import RunConfig, resolve_devices, strip_runtime
from feedback_synth.errors import ConfigError, DataError
from feedback_synth.fingerprints import StaleOutputError, differences
from feedback_synth.orchestration import stage_table
from feedback_synth.orchestration.preflight import preflight
from feedback_synth.orchestration.shared import (
    STAGE_FOLDERS,
    RunLayout,
    log_run_epilogue,
    run_logged_stage,
    write_run_summary,
)
from feedback_synth.orchestration.stage_table import STAGES, Stage, StageContext
from feedback_synth.stages.outputs import model_url
from feedback_synth.stages.promote import promote_once
from feedback_synth.stages.result import StageResult
from feedback_synth.tracking.base import NullTracker

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------ owning the output


def make_tracker(cfg, output_url: str):
    """The tracker for a run: MLflow when ``cfg.enabled`` (``cfg``: the run's TrackingConfig), else
    the null tracker."""
    if not cfg.enabled:
        return NullTracker()
    from feedback_synth.tracking.mlflow_tracker import MLflowTracker  # mlflow only when tracking

    return MLflowTracker(cfg, output_url)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


LOCK_FILE = ".feedback-synth.lock"  # held by the process that writes a local output folder


def check_lasting_output(output_url: str, verb: str = "run") -> None:
    """A whole run's ``--output`` must outlive the process: ``memory://`` is this process's memory
    (the stage verbs and the library take it; a whole run from the command line would lose it all)."""
    if output_url.startswith("memory://"):
        raise ConfigError(f"--output {output_url}: a memory:// folder is gone when this process ends, and a whole "
                          f"{verb} would lose every output; use a local folder or a bucket (gs://...)")


def check_output_outside_dataset(dataset: str, output_url: str) -> None:
    """A run's ``--output`` must not lie inside the dataset root: its outputs would become part of
    the dataset (a new class, a domain, a changed dataset digest on resume)."""
    if "://" not in dataset and "/" not in dataset and not os.path.exists(dataset):
        return  # a built-in dataset (or an unknown name, refused by pre-flight)
    data_local, out_local = storage.local_path(dataset), storage.local_path(output_url)
    if (data_local is None) != (out_local is None):
        return
    if data_local is not None:
        root, out = os.path.realpath(data_local), os.path.realpath(out_local)
    else:
        (data_fs, root), (out_fs, out) = storage.fs_and_path(dataset), storage.fs_and_path(output_url)
        if data_fs.protocol != out_fs.protocol:
            return
        root, out = root.rstrip("/"), out.rstrip("/")
    if out == root or out.startswith(root.rstrip("/") + "/"):
        raise ConfigError(f"--output {output_url} is inside the dataset root {dataset}: the run's outputs would "
                          f"become part of the dataset; use an --output outside it")


@contextlib.contextmanager
def owned_output(cfg: RunConfig, output_url: str, overwrite: bool) -> Iterator[Optional[dict[str, Any]]]:
    """Own ``output_url`` for the whole run, the first thing a run does (both runners):

    1. an exclusive lock on the folder (a local one: ``filelock`` on ``.feedback-synth.lock``), so
       that a second run into it stops at once instead of racing the first;
    2. pre-flight (``pipeline.preflight``): a failure there leaves nothing behind (a folder that this
       run created is removed again);
    3. ``claim_output``: the config check, and with ``overwrite`` the removal of what runs wrote.

    Once claimed, the folder gets this process's record (``run.json``, state ``running``) before the
    runner writes ``config.yaml``, so a ``config.yaml`` with no record beside it is never a run's; when
    the runner leaves the record ``running`` (kfp-local writes none of its own), it is settled here
    (``finished`` or ``failed``). A run refused before any work (pre-flight, the claim, or a runner
    that wrote no ``config.yaml``) leaves the folder as it found it: no lock file, no record.

    Yields the previous process's record (``run.json``), if any.
    """
    check_output_outside_dataset(cfg.data.dataset, output_url)  # before anything is created
    local = storage.local_path(output_url)
    existed = storage.exists(output_url)
    lock, lock_existed, claimed, previous = None, False, False, None
    if local is not None:
        from filelock import FileLock, Timeout

        try:
            os.makedirs(local, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot write to the output folder {output_url}: {exc.strerror or exc}") from None
        lock_existed = os.path.lexists(os.path.join(local, LOCK_FILE))
        lock = FileLock(os.path.join(local, LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(f"output {output_url} is being written by another feedback-synth process (it holds "
                              f"{LOCK_FILE}); wait for it to finish, or use another --output") from None
        except OSError as exc:  # a read-only file system, a folder in the lock's place, ...
            if not existed:
                shutil.rmtree(local, ignore_errors=True)
            raise DataError(f"cannot write to the output folder {output_url}: cannot create its lock file "
                            f"{LOCK_FILE}: {exc.strerror or exc}") from None
    try:
        try:
            preflight(cfg, output_url)
        except BaseException:
            if not existed and local is not None:
                lock.release()
                lock = None
                shutil.rmtree(local, ignore_errors=True)
            raise
        previous = claim_output(cfg, output_url, overwrite)
        write_record(output_url, "running", NullTracker(), fresh=True)
        claimed = True
        state = "failed"
        try:
            yield previous
            state = "finished"
        finally:
            _settle_record(output_url, state, previous)
    finally:
        if lock is not None:
            lock.release()
            if not claimed or not storage.exists(storage.join(output_url, "config.yaml")):  # refused before any work
                with contextlib.suppress(OSError):
                    if not lock_existed:
                        os.remove(os.path.join(local, LOCK_FILE))
                    if not existed:
                        os.rmdir(local)  # only if empty


def _settle_record(output_url: str, state: str, previous: Optional[dict[str, Any]]) -> None:
    """After the runner: a record this process left ``running`` becomes ``state``; a run that wrote
    no ``config.yaml`` (refused before any work) gets the previous record back (or none)."""
    record_url = storage.join(output_url, "run.json")
    try:
        if not storage.exists(storage.join(output_url, "config.yaml")):
            if previous is not None:
                storage.write_json(record_url, previous)
            elif storage.exists(record_url):
                storage.remove(record_url)
            return
        record = storage.read_json(record_url) if storage.exists(record_url) else None
        if _ours(record) and record.get("state") == "running":
            storage.write_json(record_url, {**record, "state": state})
    except (OSError, ValueError) as exc:  # e.g. the disk is full: the run's own error is the one to report
        log.warning("could not update %s: %s", record_url, exc)


def _ours(record: Any) -> bool:
    """Was ``record`` (a ``run.json``) written by this process?"""
    return isinstance(record, dict) and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()


def claim_output(cfg: RunConfig, output_url: str, overwrite: bool) -> Optional[dict[str, Any]]:
    """Make ``output_url`` this run's: refuse a folder that holds a run with another config (naming
    the fields), one that a live process is writing, or (a first run) one whose stage folders hold
    files that no run wrote; with ``overwrite`` remove what runs wrote there (``remove_run_outputs``:
    the local MLflow store stays, it is the history, and so does every file of the user's).

    A ``config.yaml`` that no run wrote (no ``run.json`` beside it and no finished stage) is the
    user's: refused, even with ``overwrite``. In a local folder the lock is the truth about a live
    writer (whoever held it is gone once this process holds it); a remote folder has no lock, so a
    ``running`` record of a live process on this host is refused there.
    Returns the previous process's record (``run.json``)."""
    config_url, record_url = storage.join(output_url, "config.yaml"), storage.join(output_url, "run.json")
    previous = _read_record(record_url, output_url)
    if storage.local_path(output_url) is None and previous and previous.get("host") == socket.gethostname() \
            and previous.get("pid") != os.getpid() and _alive(int(previous.get("pid", -1))) \
            and previous.get("state") == "running":
        raise ConfigError(f"output {output_url} is being written by process {previous['pid']} (started "
                          f"{previous.get('started')}); wait for it, or use another --output")
    if storage.exists(config_url) and previous is None and not _has_run_outputs(output_url):
        raise ConfigError(f"output {output_url} holds a config.yaml that no run wrote (no run.json beside it); "
                          f"move it away or use another --output (nothing was changed)")
    if not storage.exists(config_url):
        foreign = [u for name in STAGE_FOLDERS for u in storage.find(storage.join(output_url, name))]
        if foreign:
            raise ConfigError(f"output {output_url} holds no run, but its folder {foreign[0][len(output_url):].lstrip('/')} "
                              f"(and {len(foreign) - 1} more file(s)) is where a run writes; use an empty or new "
                              f"--output (nothing was changed)")
        return previous
    try:
        recorded = storage.read_yaml(config_url) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # not YAML (or not text): not a run's config
        recorded = exc
    if not isinstance(recorded, dict):
        raise ConfigError(f"output {output_url} holds a config.yaml that is not a run's config (not a YAML mapping); "
                          f"move it away or use another --output (nothing was changed)")
    # the device, inference batch sizes, compile and chunking may differ: a run may resume on other hardware
    changed = differences(strip_runtime(recorded, RunConfig), strip_runtime(asdict(cfg), RunConfig))
    if changed and not overwrite:
        changed = [c if len(c) <= 120 else c[:117] + "..." for c in changed]
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ConfigError(f"output {output_url} holds a run with another config ({shown}); use another --output, "
                          f"or --overwrite to start over there")
    if changed or overwrite:
        remove_run_outputs(output_url)
    return previous


def _read_record(record_url: str, output_url: str) -> Optional[dict[str, Any]]:
    """``run.json``, or None; one that is not a run's record is refused in one line."""
    if not storage.exists(record_url):
        return None
    try:
        record = storage.read_json(record_url)
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise ConfigError(f"output {output_url} holds a run.json that is not a run's record (not a JSON object); "
                          f"move it away or use another --output (nothing was changed)")
    return record


def _has_run_outputs(output_url: str) -> bool:
    """Does ``output_url`` hold a finished stage or shard (a run's), or a kfp-local pipeline root?"""
    from feedback_synth.fingerprints import MARKER

    if storage.exists(storage.join(output_url, "kfp")):
        return True
    return any(u.rsplit("/", 1)[-1] in (MARKER, "_SUCCESS") for name in STAGE_FOLDERS
               for u in storage.find(storage.join(output_url, name)))


KFP_RECORDS = "kfp"  # kfp-local's pipeline root in a local --output: one folder per KFP run
_KFP_RUN_FOLDER = re.compile(r"^feedback-synth-\d{4}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-\d+$")


def _remove_kfp_records(output_url: str) -> list[str]:
    """The task records the KFP local runner wrote (``kfp/feedback-synth-<timestamp>/``: executor
    outputs and artifacts), so that ``--overwrite`` treats a kfp-local run's folder as an in-process
    one's; other folders under ``kfp/`` are not a run's and stay."""
    records = storage.join(output_url, KFP_RECORDS)
    if not storage.exists(records):
        return []
    fs, path = storage.fs_and_path(records)
    removed = []
    for child in fs.ls(path, detail=False):
        name = child.rstrip("/").rsplit("/", 1)[-1]
        if _KFP_RUN_FOLDER.match(name) and fs.isdir(child):
            url = storage.join(records, name)
            storage.remove(url)
            removed.append(url)
    return removed


def remove_run_outputs(output_url: str, folders: tuple[str, ...] = tuple(STAGE_FOLDERS)) -> list[str]:
    """Remove what runs wrote under ``output_url`` and nothing else: the files each finished stage
    lists in its marker (``_STAGE.json``: ``files``), the files each committed shard wrote
    (``generation.shards.SHARD_FILES``), the run's own files (``run_summary.json``, ``promotion.json``), then the
    folders left empty. A file of the user's in one of these folders stays, a shard folder's too.
    ``folders``: the top-level folders that runs write (default: the pipeline's stage folders).
    Returns the removed URLs."""
    from feedback_synth.fingerprints import MARKER
    from feedback_synth.generation.shards import remove_shard_files

    removed = []
    for name in folders:
        for url in storage.find(storage.join(output_url, name)):
            folder, base = url.rsplit("/", 1)
            if base == MARKER:
                marker = storage.read_json(url)
                for rel in marker.get("files", []):
                    if storage.exists(storage.join(folder, rel)):
                        storage.remove(storage.join(folder, rel))
                        removed.append(storage.join(folder, rel))
                storage.remove(url)
                removed.append(url)
            elif base == "_SUCCESS" and folder.rsplit("/", 1)[-1].startswith("shard-"):
                removed += remove_shard_files(folder)
            elif base in ("run_summary.json", "promotion.json") or ".tmp-" in base:
                storage.remove(url)
                removed.append(url)
    removed += _remove_kfp_records(output_url)
    local = storage.local_path(output_url)
    if local is not None:  # the folders left empty, deepest first
        for name in (*folders, KFP_RECORDS):
            for root, dirs, files in sorted(os.walk(os.path.join(local, name)), key=lambda t: -len(t[0])):
                if not os.listdir(root):
                    os.rmdir(root)
    return removed


def stage_devices(cfg: RunConfig) -> dict[str, str]:
    """``{"run": device, section: device}`` of a resolved config: where this process runs each stage."""
    from feedback_synth.config import SECTION_DEVICES

    return {"run": cfg.device, **{name: getattr(cfg, name).device for name in SECTION_DEVICES}}


def write_record(output_url: str, state: str, tracker: Any, devices: Optional[dict[str, str]] = None,
                 fresh: bool = False) -> None:
    """``run.json``: which process writes the run (pid, host, when it started), its state and its
    MLflow parent run. ``started`` is kept from this process's own ``running`` record (the time the
    run claimed the folder), unless ``fresh`` (the claim itself)."""
    record_url = storage.join(output_url, "run.json")
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    if not fresh:
        with contextlib.suppress(OSError, ValueError):
            record = storage.read_json(record_url) if storage.exists(record_url) else None
            if _ours(record) and record.get("state") == "running" and record.get("started"):
                started = record["started"]
    storage.write_json(record_url, {
        "pid": os.getpid(), "host": socket.gethostname(), "started": started, "output": output_url,
        "state": state, "tracking_uri": getattr(tracker, "tracking_uri", None), "parent_run_id": tracker.run_id,
        **({"devices": devices} if devices else {})})


def close_stale_runs(tracker: Any, output_url: str, previous: Optional[dict[str, Any]]) -> list[str]:
    """The MLflow runs a dead earlier process left RUNNING in this output: closed KILLED. They carry
    the output's URL as that process saw it (its record's ``output``): the folder may have moved since."""
    from feedback_synth.tracking.stale import close_runs_of_output

    if previous is None or previous.get("state") != "running" or not getattr(tracker, "tracking_uri", None):
        return []
    return [run_id for url in dict.fromkeys([output_url, previous.get("output") or output_url])
            for run_id in close_runs_of_output(tracker.tracking_uri, tracker.cfg.experiment, url,
                                               exclude=[tracker.run_id])]


# ------------------------------------------------------------------------------ the run


def run_pipeline(cfg: RunConfig, output_url: str, tracker: Optional[NullTracker] = None,
                 run_name: Optional[str] = None, overwrite: bool = False) -> dict[str, Any]:
    """Run every stage in this process; returns the evaluation report plus timings and paths.

    Args:
        cfg: the resolved run config.
        output_url: the run's folder (any fsspec URL); see the module docstring for its layout.
        tracker: where to log (default: MLflow when ``cfg.tracking.enabled``, else nothing).
        run_name: the MLflow parent run's name (default: the folder's name).
        overwrite: start over in a folder that holds a run with another config.
    """
    with owned_output(cfg, output_url, overwrite) as previous:
        return _run_pipeline(cfg, output_url, tracker, run_name, previous)


def _run_pipeline(cfg: RunConfig, output_url: str, tracker: Optional[NullTracker], run_name: Optional[str],
                  previous: Optional[dict[str, Any]]) -> dict[str, Any]:
    layout = RunLayout(output_url, cfg.feedback.rounds)
    tracker = tracker or make_tracker(cfg.tracking, output_url)
    tracker.start(run_name or output_url.rstrip("/").rsplit("/", 1)[-1], asdict(cfg))  # an unreachable server stops here
    storage.write_yaml(storage.join(output_url, "config.yaml"), asdict(cfg))  # as asked (auto stays auto)
    cfg = resolve_devices(cfg)  # once: every stage below gets a concrete device
    devices = stage_devices(cfg)
    tracker.set_tags({"feedback_synth.device": cfg.device})
    closed = close_stale_runs(tracker, output_url, previous)
    if closed:
        tracker.set_tags({"feedback_synth.closed_stale_runs": str(len(closed))})
    write_record(output_url, "running", tracker, devices)
    timings: dict[str, float] = {}
    status = "FAILED"
    worked, refused = [], False  # stages that did work here (not resumed); a stale output refused before any

    try:
        produced: dict[str, Any] = {}
        results, gen = run_table(cfg, layout, tracker, produced, timings, worked=worked)
        evaluation = results["evaluate"]
        report = evaluation.summary
        log_run_epilogue(tracker, evaluation)  # the parent run: no synthesis, with synthesis, difference
        promotion = None
        if tracker.run_id is not None:  # a registry to promote in
            t0 = time.time()
            promotion = promote_once(tracker, model_url(produced["retrained"]), produced["evaluation"], report,
                                     cfg.promote, cfg.tracking, test_dataset_url=produced["data"])
            if not promotion.get("resumed"):
                timings["promote"] = round(time.time() - t0, 2)
        status = "FINISHED"
    except StaleOutputError:  # e.g. a resume after a code change: refused before this process did any work
        refused = previous is not None and not worked
        raise
    finally:
        tracker.finish(status)
        try:
            if refused:  # run.json stays the earlier run's record (a finished run stays finished)
                storage.write_json(storage.join(output_url, "run.json"), previous)
            else:
                write_record(output_url, "finished" if status == "FINISHED" else "failed", tracker, devices)
        except OSError as exc:  # e.g. the disk is full: the run's own error is the one to report
            log.warning("could not update %s: %s", storage.join(output_url, "run.json"), exc)
    return write_run_summary(layout.stage("report"), report, timings=timings, generation=gen,
                             outputs=layout.outputs(), promotion=promotion, mlflow_run_id=tracker.run_id,
                             closed_stale_runs=len(closed))


def run_table(cfg: RunConfig, layout: RunLayout, tracker: Any, produced: dict[str, Any],
              timings: Optional[dict[str, float]] = None, names: Optional[list[str]] = None,
              worked: Optional[list[str]] = None) -> tuple[dict[str, StageResult], dict[str, Any]]:
    """Run the rows of the stage table (``orchestration.stage_table.STAGES``) named in ``names`` (default:
    every row but promote, which the runner does itself), in table order. A row that runs once gets
    the outputs ``produced`` so far; consecutive per-round rows run ``feedback.rounds`` times, round
    r reading ``latest`` (the baseline, then the previous round's retrained model) and the previous
    round's outputs. Each stage runs in its nested MLflow run (``orchestration.shared.run_logged_stage``; its
    seconds added to ``timings``); ``produced`` (output name -> URL) is filled in as stages finish,
    and ``worked`` gets the names of those that did work (were not resumed).

    Returns (the last result of each stage, the generation summary over all rounds).
    """
    rows = [stage_table.stage(n) for n in (names or [s.name for s in STAGES if s.name != "promote"])]
    timings = {} if timings is None else timings
    rounds = cfg.feedback.rounds
    results: dict[str, StageResult] = {}
    generation = {"shards": 0, "skipped": 0, "num_images": 0, "seconds": 0.0, "criterion": cfg.generate.criterion}

    def run_row(row: Stage, available: dict[str, Any], r: int) -> str:
        in_rounds = rounds if row.per_round else 1
        out = storage.join(layout.output, RunLayout.folder(row.folder, r, in_rounds))
        ctx = StageContext(cfg, stage_table.inputs_of(row, available), out, r)
        result = run_logged_stage(tracker, RunLayout.run_name(row.name, r, in_rounds), row.params(ctx),
                                  lambda on_epoch: row.call(replace(ctx, on_epoch=on_epoch)))
        timings[row.name] = round(timings.get(row.name, 0.0) + result.seconds, 2)
        results[row.name] = result
        if worked is not None and not result.summary.get("resumed"):
            worked.append(row.name)
        if row.name == "generate":
            for key in ("shards", "skipped", "num_images"):
                generation[key] += result.summary[key]
            generation["seconds"] = round(generation["seconds"] + result.summary["seconds"], 3)
        return out

    stage_table.walk(rows, rounds, produced, run_row)
    return results, generation


def synthesis_rounds(cfg: RunConfig, layout: RunLayout, data: str, baseline: str, tracker: Any,
                     timings: Optional[dict[str, float]] = None, adapted: Optional[str] = None
                     ) -> tuple[dict[str, Any], str, str]:
    """The per-round rows of the stage table alone (feedback, generation, filtering, retraining,
    once or in rounds) on top of a finished ``baseline`` stage folder (and ``adapted``, if the
    generator was adapted): what the pilot and the benchmarks run. Returns (generation summary over
    all rounds, the last retrained output, the last filter output)."""
    produced = {"data": data, "baseline": baseline, **({"adapted": adapted} if adapted else {})}
    _, generation = run_table(cfg, layout, tracker, produced, timings, [s.name for s in STAGES if s.per_round])
    return generation, produced["retrained"], produced["filtered"]
