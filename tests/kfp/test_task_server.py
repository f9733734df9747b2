"""kfp-local's warm task server (feedback_synth_kfp.task_server): the real KFP local runner's task
processes hand their task to a forked child of one warm process, which runs it as the task process
would have (its environment, its streams, its exit status, its signals); without a server, tasks
run cold. (No ``from __future__ import annotations`` here: KFP reads the components' annotations.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from kfp import dsl

from feedback_synth.tracking.client import scoped_environ
from feedback_synth_kfp.task_server import CLIENT_DIR, SERVER_ENV, supported, warm_tasks

pytestmark = pytest.mark.skipif(not supported(), reason="the task server forks: Linux only")


@dsl.component(install_kfp_package=False)
def parent_command() -> str:
    import os

    import psutil

    return " ".join(psutil.Process(os.getppid()).cmdline())


@dsl.component(install_kfp_package=False)
def env_value(name: str) -> str:
    import os

    return os.environ.get(name, "<unset>")


@dsl.component(install_kfp_package=False)
def failing(message: str):
    raise ValueError(message)


@pytest.fixture
def local_runner(tmp_path, kfp_workspace):
    import kfp.local

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
                   workspace_root=kfp_workspace,
                   raise_on_error=True)


def test_tasks_fork_from_the_server_and_see_their_own_environment(local_runner):
    with warm_tasks(modules=()) as warm:
        assert set(warm) == {SERVER_ENV, "PYTHONPATH"}
        # set after the server started: the task must see its own process's environment
        with scoped_environ({**warm, "FEEDBACK_SYNTH_TEST_VALUE": "from-the-task"}):
            assert "feedback_synth_kfp.task_server" in parent_command().output
            assert env_value(name="FEEDBACK_SYNTH_TEST_VALUE").output == "from-the-task"
            assert env_value(name=SERVER_ENV).output == "<unset>"  # what the task starts runs cold
    with warm_tasks(enabled=False) as cold:
        assert cold == {}
        assert "feedback_synth_kfp.task_server" not in parent_command().output


def test_a_failing_task_fails_with_its_traceback(local_runner, capsys):
    with warm_tasks(modules=()) as warm, scoped_environ(warm):
        with pytest.raises(RuntimeError, match="failing"):
            failing(message="the task's own error")
    assert "ValueError: the task's own error" in capsys.readouterr().out


def test_without_a_server_a_task_runs_itself(local_runner, tmp_path):
    with scoped_environ({SERVER_ENV: str(tmp_path / "no-server.sock"), "PYTHONPATH": CLIENT_DIR}):
        assert "feedback_synth_kfp.task_server" not in parent_command().output


def _task_process(tmp_path: Path, body: str, env: dict[str, str]) -> subprocess.Popen:
    """A task process as KFP's SubprocessRunner starts it, for a function ``task`` with ``body``."""
    module = tmp_path / "ephemeral_component.py"
    module.write_text("import os, time\n\ndef task():\n" + "".join(f"    {line}\n" for line in body.splitlines()))
    executor_input = {"inputs": {}, "outputs": {"outputFile": str(tmp_path / "executor_output.json")}}
    return subprocess.Popen([sys.executable, "-m", "kfp.dsl.executor_main", "--component_module_path", str(module),
                             "--function_to_execute", "task", "--executor_input", json.dumps(executor_input)],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_exit_status_and_signals_go_between_the_task_process_and_its_task(tmp_path):
    mark = tmp_path / "task.pid"
    with warm_tasks(modules=()) as warm:
        status = _task_process(tmp_path, "raise SystemExit(3)", warm)
        assert status.wait(timeout=60) == 3

        proc = _task_process(tmp_path, f"open({str(mark)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)", warm)
        deadline = time.time() + 60
        while not mark.exists() and time.time() < deadline:
            time.sleep(0.05)
        task = psutil.Process(int(mark.read_text()))
        assert task.pid != proc.pid and "feedback_synth_kfp.task_server" in " ".join(task.parent().cmdline())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM  # the task's status: killed by the forwarded signal
        assert not task.is_running() or task.status() == psutil.STATUS_ZOMBIE


def test_the_server_ends_with_its_launcher(tmp_path):
    """A launcher killed (SIGKILL: no teardown of its own): the server stops and removes its socket
    and the folder warm_tasks made for it."""
    from feedback_synth_kfp.task_server import FOLDER_PREFIX

    folder = tmp_path / f"{FOLDER_PREFIX}x"
    folder.mkdir()
    launcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        ident = f"{launcher.pid}:{psutil.Process(launcher.pid).create_time():.3f}"  # as launcher_id() names one
        server = subprocess.Popen([sys.executable, "-m", "feedback_synth_kfp.task_server", str(folder / "s.sock"),
                                   "--launcher", ident, "--preload", ""])
        time.sleep(1.5)
        assert server.poll() is None, "the server stopped while its launcher runs"
    finally:
        launcher.kill()
        launcher.wait()
    assert server.wait(timeout=15) == 0
    assert not folder.exists()


def test_a_killed_launchs_scratch_folder_is_removed_by_the_next_launch(tmp_path):
    """A launch killed with SIGKILL leaves its scratch folder (KFP's workspace, the error file);
    the next launch removes it, and leaves a live launch's folder and one still being made."""
    from feedback_synth_kfp.launcher import launcher_id
    from feedback_synth_kfp.local_runner import SCRATCH_OWNER, SCRATCH_PREFIX, remove_orphaned_scratch

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    ident = f"{dead.pid}:{psutil.Process(dead.pid).create_time():.3f}"  # as launcher_id() names one
    dead.wait()
    folders = {name: tmp_path / f"{SCRATCH_PREFIX}{name}" for name in ("killed", "live", "being-made")}
    for folder in folders.values():
        (folder / "workspace").mkdir(parents=True)
    (folders["killed"] / SCRATCH_OWNER).write_text(ident)
    (folders["live"] / SCRATCH_OWNER).write_text(launcher_id())
    other = tmp_path / "someone-elses"
    other.mkdir()
    assert remove_orphaned_scratch(str(tmp_path)) == [str(folders["killed"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [folders["live"].name, folders["being-made"].name, other.name])


@pytest.mark.slow
def test_the_server_preloads_every_module_and_may_fork():
    """What the server imports loads in a task's runtime (_KFP_RUNTIME) and leaves it safe to fork:
    else every kfp-local task would silently start cold again."""
    code = ("import sys; from feedback_synth_kfp.task_server import PRELOAD, preload; preload(); "
            "missing = [m for m in PRELOAD if m not in sys.modules]; assert not missing, missing")
    env = {k: v for k, v in os.environ.items() if k not in (SERVER_ENV, "FEEDBACK_SYNTH_KFP_LAUNCHER")}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "_KFP_RUNTIME": "true"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_environments_own_sitecustomize_still_runs_in_a_task_process(tmp_path):
    """The task client is a ``sitecustomize`` and shadows any the environment has (a coverage hook,
    a company's proxy settings): it runs that one too, in every process, delegated or not."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import os\nos.environ['THEIRS_RAN'] = 'yes'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([CLIENT_DIR, str(theirs)])}
    env.pop(SERVER_ENV, None)
    out = subprocess.run([sys.executable, "-c", "import os, sitecustomize; print(os.environ.get('THEIRS_RAN'), "
                                                "os.path.dirname(sitecustomize.__file__))"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["yes", CLIENT_DIR]  # ours was imported, and it ran theirs


def test_a_long_temp_folder_still_gets_a_listening_server(tmp_path, monkeypatch):
    """A TMPDIR too long for a Unix socket's path (107 bytes): the socket goes under /tmp, the
    server listens (else every task would start cold without a word), and its folder goes after."""
    import tempfile

    long_tmp = tmp_path / ("t" * 100)
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    with warm_tasks(modules=()) as warm:
        assert SERVER_ENV in warm, "the server did not listen"
        socket_path = warm[SERVER_ENV]
        assert os.path.exists(socket_path) and socket_path.startswith("/tmp/")
    assert not os.path.exists(os.path.dirname(socket_path))
