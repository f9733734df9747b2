"""fsspec helpers: every stage reads and writes URLs (file://, gs://, memory://, or plain paths).

Writes are atomic where the store allows it: write to a temporary sibling, then move into place,
so that a reader never sees a half-written file.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
import uuid
from typing import Any, Optional

import fsspec
import numpy as np
import yaml


def cache_dir() -> str:
    """Where work that does not depend on the run is kept between runs (the fidelity oracle):
    ``$FEEDBACK_SYNTH_CACHE``, else ``$XDG_CACHE_HOME/feedback-synth``
    (``~/.cache/feedback-synth``). Any fsspec URL."""
    if os.environ.get("FEEDBACK_SYNTH_CACHE"):
        return os.environ["FEEDBACK_SYNTH_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "feedback-synth")


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Resolve ``url`` into its filesystem and the path inside it."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def local_path(url: str) -> Optional[str]:
    """The local path of a ``file://`` URL or a plain path, else None (a remote URL)."""
    if "://" not in url:
        return os.path.abspath(url)
    if url.startswith("file://"):
        return os.path.abspath(url[len("file://"):])
    return None


def join(url: str, *parts: str) -> str:
    """Join URL parts with '/', whatever the protocol."""
    out = url.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _scheme_and_path(url: str) -> tuple[str, str]:
    scheme, sep, path = url.partition("://")
    return (scheme + sep, path) if sep else ("", url)


def relative(url: str, start: str) -> str:
    """``url`` as a path relative to the folder ``start`` (``../baseline/model``); ``url`` itself
    when the two are on different stores. A record keeps it beside the absolute URL, so that it
    still finds what it names after the run folder that holds both was moved (``relocated``)."""
    (scheme, path), (start_scheme, start_path) = _scheme_and_path(url), _scheme_and_path(start)
    if scheme != start_scheme:
        return url
    if not scheme:  # plain paths: from the working directory when relative
        path, start_path = os.path.abspath(path), os.path.abspath(start_path)
    return posixpath.relpath(path, start_path)


def resolve(start: str, path: str) -> str:
    """The URL of ``path`` (from ``relative``, or absolute) read from a record in the folder ``start``."""
    if "://" in path or os.path.isabs(path):
        return path
    scheme, start_path = _scheme_and_path(start)
    return scheme + posixpath.normpath(posixpath.join(start_path, path))


def relocated(start: str, relative_path: Optional[str], url: str) -> str:
    """The URL a record in the folder ``start`` names: its ``relative_path`` from there when that
    exists (it moved with the run, or never moved), else the ``url`` it was written with (a dataset
    or model outside the run folder, which stays where it was when the run moves)."""
    if relative_path:
        candidate = resolve(start, relative_path)
        if candidate == url or exists(candidate):
            return candidate
    return url


def exists(url: str) -> bool:
    fs, path = fs_and_path(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = fs_and_path(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = True) -> None:
    """Remove a file or folder if it exists."""
    fs, path = fs_and_path(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def find(url: str) -> list[str]:
    """The URLs of every file under the folder ``url`` (none when it does not exist)."""
    fs, path = fs_and_path(url)
    if not fs.exists(path):
        return []
    root = path.rstrip("/")
    return [join(url, f[len(root) + 1:]) for f in sorted(fs.find(root))]


def write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` atomically (temporary sibling, then move)."""
    fs, path = fs_and_path(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:  # a full disk, an interrupt: no half-written temporary file is left behind
        try:
            if fs.exists(tmp):
                fs.rm(tmp)
        except OSError:
            pass
        raise
    fs.invalidate_cache()


def read_bytes(url: str) -> bytes:
    fs, path = fs_and_path(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def write_json(url: str, obj: Any) -> None:
    write_text(url, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(url: str) -> Any:
    return json.loads(read_text(url))


def write_yaml(url: str, obj: Any) -> None:
    write_text(url, yaml.safe_dump(obj, sort_keys=False))


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice (YAML forbids it; PyYAML keeps the last silently)."""

    def __init__(self, key: Any, node: yaml.Node, first: yaml.Node):
        self.key, self.line, self.first_line = key, node.start_mark.line + 1, first.start_mark.line + 1
        super().__init__(None, None, f"duplicate key '{key}' (first on line {self.first_line})", node.start_mark)


class YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with two changes: a number in scientific notation without a dot or an
    exponent sign (``1e-3``, ``5e4``, ``1.0e3``) is a float, as in YAML 1.2 and Python, not the
    string YAML 1.1 makes of it; and a key given twice in one mapping is a :class:`DuplicateKeyError`
    (naming the key and both lines), not the last value silently winning. Quoted scalars stay strings."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                if first is not key_node:
                    raise DuplicateKeyError(key, key_node, first)
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML text with :class:`YamlLoader` (safe; ``1e-3`` is a float; duplicate keys refused)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(url: str) -> Any:
    return load_yaml(read_text(url))


def write_npz(url: str, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes(url, buf.getvalue())


def read_npz(url: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(read_bytes(url)), allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
