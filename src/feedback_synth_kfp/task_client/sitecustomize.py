"""A kfp-local task process hands its work to the run's warm task server (feedback_synth_kfp.task_server).

``run --runner kfp-local`` puts this folder on the ``PYTHONPATH`` of its task processes, so Python
imports this module at start-up (``site``), before anything else. In a process that KFP's
``SubprocessRunner`` started as ``python -m kfp.dsl.executor_main ...``, with the server's socket
in ``FEEDBACK_SYNTH_TASK_SERVER``, it sends the command line, environment, working folder and
standard streams to the server, which forks its warm process (torch, timm, diffusers and MLflow
already imported) to run the same command; this process then waits and exits with the task's
status. Signals it receives go on to the task. Anywhere else, or when no server answers, it does
nothing and the process runs as it would without it. Standard library only: it runs before
anything is imported, and must stay cheap.
"""
import os
import sys

SERVER_ENV = "FEEDBACK_SYNTH_TASK_SERVER"
EXECUTOR = ["-m", "kfp.dsl.executor_main"]


def _read(conn, size: int):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _streams() -> list:
    """This process's stdin, stdout and stderr, /dev/null in place of a closed one."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _delegate() -> None:
    path = os.environ.get(SERVER_ENV, "")
    argv = list(getattr(sys, "orig_argv", []))
    if not path or argv[1:3] != EXECUTOR:
        return
    import json
    import signal
    import socket
    import struct

    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        payload = json.dumps({"args": argv[3:], "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        socket.send_fds(conn, [struct.pack("!Q", len(payload))], _streams())
        conn.sendall(payload)
        started = _read(conn, 4)
    except OSError:
        return  # no server (gone, or never started): this process runs the task itself
    if started is None:
        return  # the server closed the connection before starting the task: run it here
    pid = struct.unpack("!i", started)[0]

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        status = _read(conn, 4)
    except OSError:
        status = None
    if status is None:
        sys.stderr.write(f"feedback-synth: the warm task server lost task {pid} without its exit status\n")
        sys.stderr.flush()
        os._exit(1)
    os._exit(struct.unpack("!i", status)[0])


def _chain() -> None:
    """Run the ``sitecustomize`` that this one shadows, if the environment has one."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != here])
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_delegate()
_chain()
