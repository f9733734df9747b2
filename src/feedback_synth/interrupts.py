"""How a process stops. SIGINT and SIGTERM stop a run by raising where the process is (``KeyboardInterrupt`` or
:class:`Terminated`), so that every ``finally`` closes what it opened: MLflow runs end FAILED, not
RUNNING forever. Inside a tracking call (:func:`deferred`) the signal waits until the call returns:
an exception raised half-way through a write of MLflow's SQLite store leaves its transaction open,
and the store stays locked for the very calls that close the runs. A second signal does not wait.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, Optional


class Terminated(Exception):
    """SIGTERM, raised where the process is."""


_depth = 0  # nesting of deferred() sections in the main thread (signal handlers run only there)
_pending: Optional[int] = None


def _exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def _on_signal(signum, frame) -> None:
    global _pending
    if _depth and _pending is None:
        _pending = signum  # raised when the tracking call returns
        return
    raise _exception(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section that SIGINT and SIGTERM do not interrupt; a signal that arrived inside is raised
    when the outermost section ends."""
    global _depth, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise _exception(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGINT and SIGTERM raise (after any :func:`deferred` section) while inside; the previous
    handlers afterwards. A signal ignored when this starts (``nohup``, ``trap "" INT``, a background
    job of a non-interactive shell) stays ignored: the process was told to outlive it."""
    global _pending
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        _pending = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def exit_without_teardown(code: int) -> None:
    """End the process as the interpreter ends it (its threads joined, its at-exit handlers run,
    its standard streams flushed) but without tearing down the modules. With torch, timm,
    diffusers and MLflow loaded, that teardown frees the whole heap one object at a time: 2-3 s of
    a short command, and of every forked task (measured). Files a caller left open are not flushed:
    call it only once everything the process wrote is closed."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - what the interpreter runs at exit; as multiprocessing's children do
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
