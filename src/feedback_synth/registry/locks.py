"""The locks that serialise promotions: a file lock and a PostgreSQL advisory lock."""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import socket
import tempfile
from typing import Iterator, Optional
from urllib.parse import urlparse

from feedback_synth.config import POSTGRES_SCHEMES
from feedback_synth.errors import ConfigError

log = logging.getLogger(__name__)


class LockTimeout(Exception):
    """The promotion lock was not acquired in time (or its store could not be reached)."""


class FileLock:
    """An exclusive file lock (the ``filelock`` package: ``flock`` on Unix): serialises processes on
    one machine (or one volume). Who holds it is written beside it (``<path>.holder``), so that a
    timeout can say."""

    def __init__(self, path: str):
        self.path = path
        self._lock = None

    def __str__(self) -> str:
        return f"file lock {self.path}"

    @property
    def holder_path(self) -> str:
        return self.path + ".holder"

    def acquire(self, timeout: float) -> None:
        import filelock

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        lock = filelock.FileLock(self.path)
        try:
            lock.acquire(timeout=timeout, poll_interval=0.05)
        except filelock.Timeout:
            holder = _read_small(self.holder_path)
            by = f" (by {holder})" if holder else ""
            raise LockTimeout(f"{self} still held after {timeout:g} s{by}") from None
        self._lock = lock
        with contextlib.suppress(OSError):
            with open(self.holder_path, "w") as f:
                f.write(f"pid {os.getpid()} on {socket.gethostname()}")

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(OSError):
                open(self.holder_path, "w").close()  # before letting go: the next holder writes its own
            self._lock.release()
            self._lock = None


def _read_small(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read(200).strip()
    except OSError:
        return ""


def psycopg2_dsn(uri: str) -> str:
    """``postgresql+psycopg2://`` (SQLAlchemy) and ``postgres://`` as a libpq URI."""
    scheme, rest = uri.split("://", 1)
    if scheme not in ("postgresql", "postgres", "postgresql+psycopg2"):
        raise ConfigError(f"not a PostgreSQL URI: {scheme}://...")
    return f"postgresql://{rest}"


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` from a lock name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class PostgresAdvisoryLock:
    """``pg_advisory_lock`` on a PostgreSQL database, bounded by ``statement_timeout``.

    The lock belongs to the database session: if the holder dies, its connection drops and the
    lock is released, so a crashed pod cannot block promotions.
    """

    def __init__(self, uri: str, name: str):
        self.dsn = psycopg2_dsn(uri)
        self.name = name
        self.key = advisory_key(name)
        self._conn = None

    def __str__(self) -> str:
        u = urlparse(self.dsn)
        return f"PostgreSQL advisory lock '{self.name}' on {u.hostname}:{u.port or 5432}{u.path}"

    def acquire(self, timeout: float) -> None:
        import psycopg2
        import psycopg2.errors

        try:
            conn = psycopg2.connect(self.dsn, connect_timeout=max(1, min(int(timeout), 10)),
                                    application_name="feedback-synth-promote")
        except psycopg2.OperationalError as exc:
            raise LockTimeout(f"cannot connect for the {self}: {str(exc).strip()}") from None
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", (max(1, int(timeout * 1000)),))
                try:
                    cur.execute("SELECT pg_advisory_lock(%s)", (self.key,))
                except psycopg2.errors.QueryCanceled:
                    raise LockTimeout(f"{self} still held after {timeout:g} s") from None
                cur.execute("SET statement_timeout = 0")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def release(self) -> None:
        if self._conn is not None:
            try:
                with self._conn.cursor() as cur:
                    cur.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            finally:
                self._conn.close()  # closing alone would release it too
                self._conn = None


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _local_store_dir(tracking_uri: str) -> Optional[str]:
    """The folder of a local store (sqlite file or file: store), else None."""
    if tracking_uri.startswith("sqlite:///"):
        # sqlite:////abs/file.db or sqlite:///relative/file.db (SQLAlchemy's convention)
        from feedback_synth.tracking.client import sqlite_file

        return os.path.dirname(os.path.abspath(sqlite_file(tracking_uri)))
    if tracking_uri.startswith("file:"):
        return os.path.abspath(urlparse(tracking_uri).path)
    if "://" not in tracking_uri and tracking_uri:
        return os.path.abspath(tracking_uri)
    return None


def make_lock(lock_uri: str, tracking_uri: str, model_name: str):
    """The lock named by ``promote.lock_uri`` (see the module docstring)."""
    key = f"feedback-synth/promote/{model_name}"
    if lock_uri.startswith(POSTGRES_SCHEMES):
        return PostgresAdvisoryLock(lock_uri, key)
    if lock_uri.startswith("file://"):
        return FileLock(urlparse(lock_uri).path)
    if lock_uri:
        raise ConfigError(f"config field 'promote.lock_uri': unsupported lock '{lock_uri}'; use '', "
                          "postgresql://... or file:///PATH")
    if tracking_uri.startswith(POSTGRES_SCHEMES):
        return PostgresAdvisoryLock(tracking_uri, key)
    store = _local_store_dir(tracking_uri)
    if store is not None:
        return FileLock(os.path.join(store, "promote.lock"))
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"feedback-synth-promote-{digest}.lock")
    log.warning("promote.lock_uri is empty and the tracking store (%s) is remote: the file lock %s only "
                "serialises promotions on this machine; set promote.lock_uri (postgresql://...) "
                "when promotions run in several pods", tracking_uri, path)
    return FileLock(path)


@contextlib.contextmanager
def held(lock, timeout: float) -> Iterator[None]:
    lock.acquire(timeout)
    try:
        yield
    finally:
        lock.release()
