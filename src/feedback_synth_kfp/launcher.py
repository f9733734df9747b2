"""No orphan tasks: the KFP local runner's task processes end with the run that launched them.

KFP's ``SubprocessRunner`` starts each task as ``sh -ec ... python -m kfp.dsl.executor_main``
and waits for it. If the launching ``feedback-synth run --runner kfp-local`` is stopped by a
signal sent to it alone (``kill``, a supervisor, a test), the task goes on training on its own;
if it is SIGKILLed, nothing in it can react. So:

- on an interrupt, the launcher stops its task processes (``stop_tasks``);
- each task process watches its launcher (``watch_launcher``, started when this package is
  imported inside a task: the launcher passes its pid and start time in ``LAUNCHER_ENV``) and
  exits when it is gone. Its MLflow runs stay RUNNING, to be closed by the next run into the same
  output (``local_runner``: the previous launch id).

On a cluster the variable is not set and nothing is watched: the pods are Kubernetes' to stop.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Optional

LAUNCHER_ENV = "FEEDBACK_SYNTH_KFP_LAUNCHER"  # "<pid>:<create time>" of the kfp-local launcher


def launcher_id() -> str:
    """This process as a launcher: its pid and start time (a reused pid is another process)."""
    import psutil

    me = psutil.Process()
    return f"{me.pid}:{me.create_time():.3f}"


def launcher_alive(value: str) -> bool:
    """Is the process that ``value`` (``launcher_id``) names still running (not a zombie)?"""
    import psutil

    pid, _, created = value.partition(":")
    try:
        proc = psutil.Process(int(pid))
        return f"{proc.create_time():.3f}" == created and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


def watch_launcher(interval: float = 1.0) -> Optional[threading.Thread]:
    """In a kfp-local task process: a daemon thread that ends the process (exit status 137, as a
    SIGKILL would) once its launcher is gone. None outside such a task."""
    value = os.environ.get(LAUNCHER_ENV, "")
    if not value or value.partition(":")[0] == str(os.getpid()):
        return None

    def watch() -> None:
        while launcher_alive(value):
            time.sleep(interval)
        sys.stderr.write("feedback-synth: the kfp-local run that started this task is gone; the task stops\n")
        sys.stderr.flush()
        os._exit(137)

    thread = threading.Thread(target=watch, name="feedback-synth-launcher-watch", daemon=True)
    thread.start()
    return thread


def stop_tasks(timeout: float = 10.0) -> list[int]:
    """Terminate this process's descendants (the running tasks), then kill what is left after
    ``timeout`` seconds; returns their pids."""
    import psutil

    procs = psutil.Process().children(recursive=True)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in procs]
