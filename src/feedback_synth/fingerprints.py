"""Fingerprints of what made an output: a stage's folder (``_STAGE.json``) or a shard (``_SUCCESS``).

A fingerprint holds what made the output: the stage's name, its config, the digests of its inputs
and the code version; its digest changes when any of them does. An input's digest is its own
``_STAGE.json`` digest (or its parent's: a ``model/`` folder inside a training stage's output); a
folder that no stage made (a dataset, a generator) is digested from its file listing (names and
sizes, plus the content of files up to 64 MiB).

The code version is a digest of the package's source (``code_version``): a re-run after the code
changed refuses to reuse the outputs of the old code and says so ("code version A -> B"), and
``--overwrite`` redoes them.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from feedback_synth import storage
from feedback_synth.errors import ConfigError

MARKER = "_STAGE.json"
_CONTENT_LIMIT = 64 * 2**20


class StaleOutputError(ConfigError):
    """An output folder holds a finished stage made from other inputs or settings."""


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version plus a digest of the library's own source files (``feedback_synth/**.py``
    and its presets): it changes whenever the code does, so that a resume after an upgrade or an
    edit never reuses an output that other code made. Nobody has to remember to bump it."""
    from feedback_synth import __version__

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{__version__}+{h.hexdigest()[:12]}"


def digest_of(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def fingerprint(stage: str, config: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    """What made a stage output: its name, config, input digests and the code version."""
    payload = {"stage": stage, "config": config, "inputs": inputs, "version": code_version()}
    return {"digest": digest_of(payload), **payload}


def finished_output(marker_url: str, fp: dict[str, Any], what: str, overwrite: bool) -> Optional[dict[str, Any]]:
    """The one rule for a finished output (a stage's ``_STAGE.json``, a shard's ``_SUCCESS``):
    the marker at ``marker_url`` when it was made with fingerprint ``fp`` (reuse it); None when
    there is none, or when it was made differently and ``overwrite`` says redo it; otherwise a
    StaleOutputError that names what changed (``what``: e.g. "a finished 'retrain'")."""
    if not storage.exists(marker_url):
        return None
    done = storage.read_json(marker_url)
    if done.get("digest") == fp["digest"]:
        return done
    if not overwrite:
        where = marker_url.rstrip("/").rsplit("/", 1)[0]
        raise StaleOutputError(f"{where} holds {what} made differently ({explain_change(done, fp)}); "
                               f"write elsewhere, or pass --overwrite to redo it")
    return None


def read_marker(url: str) -> Optional[dict[str, Any]]:
    marker = storage.join(url, MARKER)
    return storage.read_json(marker) if storage.exists(marker) else None


def folder_digest(url: str, content: bool = True) -> str:
    """A digest of the files under ``url``: names and sizes, and (``content``) the bytes of files up
    to 64 MiB; larger ones by their size and modification time or checksum as the store reports it."""
    fs, path = storage.fs_and_path(url)
    if not fs.exists(path):
        return "missing:" + url
    if fs.isfile(path):
        entries = {"": fs.info(path)}
    else:
        entries = {k[len(path.rstrip("/")) + 1:]: v for k, v in fs.find(path, detail=True).items()}
    h = hashlib.sha256()
    for name in sorted(entries):
        info = entries[name]
        size = int(info.get("size") or 0)
        h.update(f"{name}\0{size}\0".encode())
        full = f"{path.rstrip('/')}/{name}" if name else path
        if content and size <= _CONTENT_LIMIT:
            with fs.open(full, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        elif not content or size > _CONTENT_LIMIT:
            h.update(str(info.get("mtime") or info.get("updated") or info.get("md5Hash") or info.get("etag")).encode())
    return h.hexdigest()[:32]


def input_digest(url: str) -> str:
    """The digest of a stage input: the stage marker of ``url`` or of its parent, else its files'."""
    for candidate in (url, url.rstrip("/").rsplit("/", 1)[0]):
        marker = read_marker(candidate)
        if marker is not None:
            return marker["digest"]
    return folder_digest(url)


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``field: old -> new`` for every config value that differs between two nested dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def explain_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Why two fingerprints differ, in words."""
    reasons = differences(old.get("config", {}), new.get("config", {}), f"{new.get('stage', '')} config ")
    changed_inputs = [k for k in sorted(set(old.get("inputs", {})) | set(new.get("inputs", {})))
                      if old.get("inputs", {}).get(k) != new.get("inputs", {}).get(k)]
    if changed_inputs:
        reasons.append("its inputs changed: " + ", ".join(changed_inputs))
    if old.get("version") != new.get("version"):
        reasons.append(f"code version {old.get('version')} -> {new.get('version')}")
    return "; ".join(reasons) or "its fingerprint changed"
