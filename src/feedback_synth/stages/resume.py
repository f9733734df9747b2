"""Resume what is done, refuse what is stale: every stage runs through ``run_stage``.

Every stage output folder ends with ``_STAGE.json``, written last: the stage's fingerprint (its
name, its config, the digests of its inputs and the code version) and its ``StageResult``. A stage
asked to write where a finished output with the same fingerprint already is returns that result
without redoing the work (a re-run resumes). One with another fingerprint was made from other
inputs or settings: the stage refuses, naming what changed, unless told to ``overwrite``. Shards
carry the same kind of fingerprint in their ``_SUCCESS`` (``generation.shards``); the
fingerprints themselves: ``feedback_synth.fingerprints``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Optional

from feedback_synth import storage
from feedback_synth.fingerprints import MARKER, fingerprint, finished_output, input_digest
from feedback_synth.stages.result import StageResult


def digests(**urls: Optional[str]) -> dict[str, str]:
    """``{name: input_digest(URL)}`` for the inputs that are given (None: not an input)."""
    return {name: input_digest(url) for name, url in urls.items() if url}


def run_stage(stage: str, output_url: str, config: dict[str, Any], inputs: dict[str, str],
              work: Callable[[], StageResult], overwrite: bool = False) -> StageResult:
    """Run ``work`` (which writes ``output_url``) unless that output is done with this fingerprint.

    Args:
        stage: the stage's name.
        output_url: its output folder.
        config: its config (and any argument that changes its output), as plain data.
        inputs: ``{name: digest}`` of what it reads (``digests(name=URL, ...)``).
        work: does the stage's work and returns its result.
        overwrite: redo a finished output made with another fingerprint instead of refusing.

    Returns the result, from the marker when the output was done already (``summary['resumed']``).
    """
    fp = fingerprint(stage, config, inputs)
    done = finished_output(storage.join(output_url, MARKER), fp, f"a finished '{stage}'", overwrite)
    if done is not None:
        result = StageResult.from_dict(done["result"], output_url)
        result.summary["resumed"] = True
        return result
    storage.remove(storage.join(output_url, MARKER))
    before = _files(output_url)
    started = time.time()
    result = work()
    result.seconds = round(time.time() - started, 2)  # the work's own time (a runner adds its logging)
    # the files this stage wrote (new, or rewritten since it started): what --overwrite may remove
    written = sorted(rel for rel, mtime in _files(output_url).items() if rel not in before or mtime >= started - 1)
    storage.write_json(storage.join(output_url, MARKER), {**fp, "result": result.to_dict(output_url), "files": written,
                                                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return result


def _files(url: str) -> dict[str, float]:
    """``{path relative to url: modification time (0 where the store gives none)}`` of the files under ``url``."""
    fs, path = storage.fs_and_path(url)
    if not fs.exists(path):
        return {}
    root = path.rstrip("/")
    out = {}
    for name, info in fs.find(root, detail=True).items():
        mtime = info.get("mtime") or info.get("created") or 0
        try:
            out[name[len(root) + 1:]] = float(mtime.timestamp() if hasattr(mtime, "timestamp") else mtime)
        except (TypeError, ValueError):  # a store that reports its times as text: a file there before the
            out[name[len(root) + 1:]] = float("-inf")  # stage is then never taken for the stage's own
    return out
