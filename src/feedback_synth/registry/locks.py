"""The locks that serialise promotions: a file, a PostgreSQL advisory lock, a Kubernetes Lease."""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from typing import Any, Iterator, Optional
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


def _microtime(t: _dt.datetime) -> str:
    # Kubernetes MicroTime wants exactly six fractional digits; datetime.isoformat drops them at .0
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _as_datetime(value: Any) -> Optional[_dt.datetime]:
    if value is None or isinstance(value, _dt.datetime):
        return value
    return _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))


class K8sLeaseLock:
    """A ``coordination.k8s.io/v1`` Lease used as a mutex.

    Free when it has no holder or its holder stopped renewing (``renewTime + leaseDurationSeconds``
    in the past). Taken by create (404) or by a replace that carries the resourceVersion that was
    read, so two pods racing for it cannot both win (the loser gets 409 Conflict and waits).
    While held, a thread renews it every third of its duration. ``api`` is a
    ``kubernetes.client.CoordinationV1Api`` (in-cluster config, else ~/.kube/config).
    """

    def __init__(self, namespace: str, name: str, lease_duration_s: int = 30, api: Any = None,
                 identity: Optional[str] = None):
        self.namespace, self.name = namespace, name
        self.lease_duration_s = int(lease_duration_s)
        self.identity = identity or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._api = api
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def __str__(self) -> str:
        return f"Kubernetes Lease {self.namespace}/{self.name}"

    @property
    def api(self):
        if self._api is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                try:
                    config.load_kube_config()
                except (config.ConfigException, OSError) as exc:
                    raise LockTimeout(f"no Kubernetes config for the {self}: {exc}") from None
            self._api = client.CoordinationV1Api()
        return self._api

    def _free(self, spec: Any, now: _dt.datetime) -> bool:
        if not getattr(spec, "holder_identity", None) or spec.holder_identity == self.identity:
            return True
        renewed = _as_datetime(spec.renew_time or spec.acquire_time)
        duration = spec.lease_duration_seconds or self.lease_duration_s
        return renewed is None or renewed + _dt.timedelta(seconds=duration) < now

    def _try_take(self) -> Optional[str]:
        """One attempt: None when taken, else who holds it."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        now = utcnow()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_duration_s,
                                        acquire_time=_microtime(now), renew_time=_microtime(now),
                                        lease_transitions=0))
            try:
                self.api.create_namespaced_lease(self.namespace, body)
                return None
            except ApiException as exc2:
                if exc2.status == 409:  # created by someone else meanwhile
                    return "another holder (created concurrently)"
                raise
        spec = lease.spec or client.V1LeaseSpec()
        if not self._free(spec, now):
            return spec.holder_identity
        if spec.holder_identity != self.identity:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity = self.identity
        spec.lease_duration_seconds = self.lease_duration_s
        spec.acquire_time = _microtime(now)
        spec.renew_time = _microtime(now)
        lease.spec = spec
        try:  # metadata.resourceVersion is sent back: a stale read gets 409
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            return None
        except ApiException as exc:
            if exc.status == 409:
                return "another holder (conflict)"
            raise

    def acquire(self, timeout: float) -> None:
        from kubernetes.client.rest import ApiException

        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            try:
                holder = self._try_take()
            except ApiException as exc:
                raise LockTimeout(f"the {self} cannot be read or written: {exc.status} {exc.reason}") from None
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{self} still held after {timeout:g} s (by {holder})")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 1.0)
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew_loop, name=f"lease-renew-{self.name}", daemon=True)
        self._renewer.start()

    def _renew_loop(self) -> None:
        from kubernetes.client.rest import ApiException

        while not self._stop.wait(self.lease_duration_s / 3):
            try:
                lease = self.api.read_namespaced_lease(self.name, self.namespace)
                if lease.spec.holder_identity != self.identity:
                    log.warning("%s was taken over by %s while held", self, lease.spec.holder_identity)
                    return
                lease.spec.renew_time = _microtime(utcnow())
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            except ApiException as exc:  # try again at the next tick; the lease outlives 2 misses
                log.warning("renewing %s failed: %s %s", self, exc.status, exc.reason)

    def release(self) -> None:
        from kubernetes.client.rest import ApiException

        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
            self._renewer = None
        for _ in range(3):
            try:
                lease = self.api.read_namespaced_lease(self.name, self.namespace)
                if lease.spec.holder_identity != self.identity:
                    return
                lease.spec.holder_identity = None
                lease.spec.renew_time = _microtime(utcnow())
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
                return
            except ApiException as exc:
                if exc.status != 409:
                    log.warning("releasing %s failed (%s %s); it expires by itself", self, exc.status, exc.reason)
                    return


def parse_lease_uri(uri: str) -> tuple[str, str]:
    rest = uri[len("k8s-lease://"):]
    parts = [p for p in rest.split("/") if p]
    if len(parts) != 2:
        raise ConfigError(f"config field 'promote.lock_uri': expected k8s-lease://NAMESPACE/NAME, got '{uri}'")
    return parts[0], parts[1]


def _local_store_dir(tracking_uri: str) -> Optional[str]:
    """The folder of a local store (sqlite file or file: store), else None."""
    if tracking_uri.startswith("sqlite:///"):
        # sqlite:////abs/file.db or sqlite:///relative/file.db (SQLAlchemy's convention)
        return os.path.dirname(os.path.abspath(tracking_uri[len("sqlite:///"):].split("?", 1)[0]))
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
    if lock_uri.startswith("k8s-lease://"):
        return K8sLeaseLock(*parse_lease_uri(lock_uri))
    if lock_uri.startswith("file://"):
        return FileLock(urlparse(lock_uri).path)
    if lock_uri:
        raise ConfigError(f"config field 'promote.lock_uri': unsupported lock '{lock_uri}'; use '', "
                          "postgresql://..., k8s-lease://NAMESPACE/NAME or file:///PATH")
    if tracking_uri.startswith(POSTGRES_SCHEMES):
        return PostgresAdvisoryLock(tracking_uri, key)
    store = _local_store_dir(tracking_uri)
    if store is not None:
        return FileLock(os.path.join(store, "promote.lock"))
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"feedback-synth-promote-{digest}.lock")
    log.warning("promote.lock_uri is empty and the tracking store (%s) is remote: the file lock %s only "
                "serialises promotions on this machine; set promote.lock_uri (postgresql://... or "
                "k8s-lease://NAMESPACE/NAME) when promotions run in several pods", tracking_uri, path)
    return FileLock(path)


@contextlib.contextmanager
def held(lock, timeout: float) -> Iterator[None]:
    lock.acquire(timeout)
    try:
        yield
    finally:
        lock.release()
