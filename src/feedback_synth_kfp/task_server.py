"""Warm task processes for ``run --runner kfp-local``: a fork server for KFP's local runner.

KFP's ``SubprocessRunner`` starts every task as a fresh ``python -m kfp.dsl.executor_main``, and
a fresh process spends 3-7 s importing torch, timm, diffusers and MLflow before the task's work
begins: with about a dozen tasks per run that was most of kfp-local's cost over the in-process
run. So, for the length of a kfp-local run, the launcher starts one server process that imports
those once (``PRELOAD``) and waits on a Unix socket. Each task process, at start-up, hands its
command line, environment, working folder and standard streams to the server
(``task_client/sitecustomize.py``); the server forks, and the child runs the task's command
(``kfp.dsl.executor_main`` with the task's own arguments) exactly as the task process would have,
in its own process, with the task's environment. The task process relays signals and exits with
the child's status. Nothing in KFP is patched: the local runner still starts, watches and reads
every task as before, with the same executor input and outputs.

When the server is not there (not started, failed, or gone), a task process runs its task itself.
Only on Linux (fork after importing torch is not safe on macOS), and never when preloading would
leave threads running or CUDA initialised (a forked child could not use it).

    python -m feedback_synth_kfp.task_server SOCKET [--launcher PID:CREATED] [--no-preload]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Iterator, Optional

from feedback_synth.interrupts import exit_without_teardown
from feedback_synth_kfp.launcher import LAUNCHER_ENV

log = logging.getLogger(__name__)

SERVER_ENV = "FEEDBACK_SYNTH_TASK_SERVER"  # the socket's path, in the task processes' environment
CLIENT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "task_client")
# what the tasks import (their heavy part): imported once by the server, shared by every task
FOLDER_PREFIX = "feedback-synth-tasks-"  # the temporary folder of a server's socket (warm_tasks)
SOCKET_PATH_MAX = 100  # bytes: a Unix socket's path holds 107 on Linux
PRELOAD = ("kfp.dsl.executor_main", "torch", "timm", "diffusers", "mlflow", "mlflow.store.tracking.sqlalchemy_store",
           "sklearn.metrics", "feedback_synth_kfp.artifacts", "feedback_synth_kfp.tracking", "feedback_synth_kfp.pilot",
           "feedback_synth.orchestration.preflight", "feedback_synth.orchestration.tune",
           "feedback_synth.generation.loading", "feedback_synth.generation.shards",
           "feedback_synth.training.classifier", "feedback_synth.synthesis.feedback", "feedback_synth.reporting.plots")


def supported() -> bool:
    """Can this platform fork a warm process that has imported torch? (Linux: yes.)"""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(socket, "send_fds")


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the task process closed the connection")
        data += chunk
    return data


def preload(modules: tuple[str, ...] = PRELOAD) -> None:
    """Import ``modules`` (a missing optional one is skipped); refuse to serve where a forked child
    would not be safe: a thread left running, or CUDA initialised."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.debug("task server: not preloading %s (%s)", name, exc)
    if threading.active_count() != 1:
        raise RuntimeError(f"preloading left threads running ({[t.name for t in threading.enumerate()]}); "
                           "forking would not be safe")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("preloading initialised CUDA; a forked task could not use it")


def _exit_status(wait_status: int) -> int:
    """A child's exit status as a shell reports it (128 + the signal that killed it)."""
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def _run_task(request: dict, streams: list[int], inherited: list) -> None:
    """In the forked child: become the task process ``request`` describes, run its command, and
    end with its status. ``inherited``: the server's sockets and file descriptors, closed here."""
    signal.set_wakeup_fd(-1)
    for inherited_one in inherited:
        if isinstance(inherited_one, int):
            os.close(inherited_one)
        else:
            inherited_one.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in zip((0, 1, 2), streams):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(SERVER_ENV, None)  # a process this task starts runs cold
    sys.stdout.reconfigure(line_buffering=True)  # KFP streams the task's log line by line
    from feedback_synth_kfp.launcher import watch_launcher

    watch_launcher()  # the task ends with its launcher, as a cold task process does
    import runpy

    sys.argv = ["kfp.dsl.executor_main", *request["args"]]
    code = 0
    try:
        runpy.run_module("kfp.dsl.executor_main", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:  # noqa: BLE001 - printed as the interpreter prints an uncaught exception
        import traceback

        traceback.print_exc()
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    exit_without_teardown(code)  # the usual teardown would touch, and so copy, every page of the preloaded heap


def serve(socket_path: str, launcher: str = "", modules: tuple[str, ...] = PRELOAD) -> None:
    """Listen on ``socket_path``, preload ``modules``, then fork a child per task request, until
    the launcher (``launcher_id``, checked every second) is gone or this process is terminated
    (its running tasks are then terminated too)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path)
    try:
        _serve_bound(listener, launcher, modules)
    finally:  # the socket is this server's (only the server gets here: a child ends with os._exit)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)
        folder = os.path.dirname(os.path.abspath(socket_path))
        if os.path.basename(folder).startswith(FOLDER_PREFIX):  # warm_tasks' own: its launcher may be gone
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _serve_bound(listener: socket.socket, launcher: str, modules: tuple[str, ...]) -> None:
    listener.listen(64)  # tasks that connect while the server preloads wait here
    preload(modules)
    gc.freeze()  # the preloaded objects out of the collector's sight: a child's collections leave them (and their pages) alone
    running: dict[int, socket.socket] = {}  # child pid -> its task process's connection
    signal.signal(signal.SIGTERM, _terminated)
    # a finished child wakes the loop at once (its status goes back to its task process)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        _loop(listener, running, launcher, (wake_read, wake_write))
    finally:
        for pid in running:  # stopped with the server, so that stopping the launcher's tree stops them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _terminated(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def _loop(listener: socket.socket, running: dict[int, socket.socket], launcher: str, wake: tuple[int, int]) -> None:
    from feedback_synth_kfp.launcher import launcher_alive

    checked = time.monotonic()
    while True:
        ready = select.select([listener, wake[0]], [], [], 1.0)[0]
        if wake[0] in ready:
            os.read(wake[0], 512)
        for pid, conn in list(running.items()):
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                with contextlib.suppress(OSError):
                    conn.sendall(struct.pack("!i", _exit_status(wait_status)))
                conn.close()
                del running[pid]
        if launcher and time.monotonic() - checked > 1.0:
            if not launcher_alive(launcher):
                return
            checked = time.monotonic()
        if listener not in ready:
            continue
        conn, _ = listener.accept()
        conn.settimeout(30)  # a task process sends its request at once; one that does not must not stall the rest
        streams: list[int] = []
        try:
            header, streams, _, _ = socket.recv_fds(conn, 8, 3)
            request = json.loads(_read(conn, struct.unpack("!Q", header)[0]))
            conn.settimeout(None)
        except (OSError, ValueError, struct.error) as exc:
            log.warning("task server: a bad request (%s); the task process runs its task itself", exc)
            for fd in streams:
                os.close(fd)
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _run_task(request, streams, [listener, conn, *running.values(), *wake])
            finally:  # reached only when becoming the task failed: never back into the server's loop
                import traceback

                traceback.print_exc()
                os._exit(1)
        for fd in streams:
            os.close(fd)
        try:
            conn.sendall(struct.pack("!i", pid))
        except OSError:  # the task process is gone: so is its task
            os.kill(pid, signal.SIGTERM)
        running[pid] = conn


def _socket_folder() -> str:
    """A new temporary folder for the server's socket: under /tmp where the temp folder's path
    (TMPDIR) is too long for a Unix socket's (107 bytes on Linux; the server could not listen)."""
    folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)
    if len(os.path.join(folder, "tasks.sock")) > SOCKET_PATH_MAX and os.path.isdir("/tmp"):
        os.rmdir(folder)
        folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir="/tmp")
    return folder


@contextlib.contextmanager
def warm_tasks(enabled: bool = True, modules: tuple[str, ...] = PRELOAD) -> Iterator[dict[str, str]]:
    """For the code inside, a task server: yields the environment that sends the task processes
    to it (empty where it is off or unsupported: tasks then start cold). Stopped on the way out."""
    if not enabled or not supported():
        yield {}
        return
    from feedback_synth_kfp.launcher import launcher_id

    folder = _socket_folder()
    path = os.path.join(folder, "tasks.sock")
    # the environment of a task process (KFP sets _KFP_RUNTIME in it), without the launcher's
    # identity: the server watches the launcher from its loop (a watching thread would be forked)
    env = {k: v for k, v in os.environ.items() if k not in (LAUNCHER_ENV, SERVER_ENV)}
    env["_KFP_RUNTIME"] = "true"
    command = [sys.executable, "-m", "feedback_synth_kfp.task_server", path, "--launcher", launcher_id()]
    server = subprocess.Popen(command + ([] if modules == PRELOAD else ["--preload", ",".join(modules)]), env=env)
    try:
        for _ in range(200):  # the socket exists once the server listens (before it preloads)
            if os.path.exists(path) or server.poll() is not None:
                break
            time.sleep(0.05)
        if server.poll() is not None:
            log.warning("the warm task server stopped before it listened on %s (exit status %s): tasks start cold",
                        path, server.returncode)
        pythonpath = os.pathsep.join(p for p in (CLIENT_DIR, os.environ.get("PYTHONPATH", "")) if p)
        yield {SERVER_ENV: path, "PYTHONPATH": pythonpath} if server.poll() is None else {}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m feedback_synth_kfp.task_server", description=__doc__.split("\n")[0])
    p.add_argument("socket", help="the Unix socket to listen on")
    p.add_argument("--launcher", default="", help="stop when this process (launcher_id) is gone")
    p.add_argument("--preload", default=None, help="comma-separated modules to import first (default: PRELOAD)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="feedback-synth task server: %(message)s")
    modules = PRELOAD if args.preload is None else tuple(m for m in args.preload.split(",") if m)
    try:
        serve(args.socket, args.launcher, modules)
    except RuntimeError as exc:  # tasks start cold, as without a server
        log.warning("%s; the tasks start cold", exc)
        return 1
    except OSError as exc:  # the socket: a missing folder, a path in use
        log.warning("cannot listen on %s (%s); the tasks start cold", args.socket, exc.strerror or exc)
        return 2
    return 0

if __name__ == "__main__":
    sys.exit(main())
