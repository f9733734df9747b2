"""The GPU check: one report of what the product does on this machine's GPU (scripts/gpu-check.sh).

It runs, in order, and writes one markdown report (``benchmarks/results/gpu_check.md`` unless
``--output`` says otherwise) with the card, the driver, torch and the date:

1. the ``gpu``-marked tests;
2. a whole ``feedback-synth run`` of each preset (digits-lt, digits-gap, digits-groups) with
   ``device=cuda`` and tracking off: wall time, the seconds of each stage, and the time spent
   outside the stages;
3. the throughput benchmark's GPU rows for both SD-sized generators
   (``benchmarks/generation_throughput.py --skip-cpu``), whose table puts the measured peak memory
   next to the estimate of ``feedback-synth estimate-memory`` for every row.

``--smoke`` runs the same steps at toy size on whatever device there is (the CPU here): a check of
the script itself, not a measurement, and it writes nothing unless ``--output`` is given.

    python benchmarks/gpu_check.py                # on the GPU machine (scripts/gpu-check.sh)
    python benchmarks/gpu_check.py --smoke --output /tmp/gpu_check.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.md"
PRESETS = ("digits-lt", "digits-gap", "digits-groups")
# toy size for --smoke: every stage runs, in seconds
SMOKE_SETS = ["train.model=test_resnet", "train.epochs=1", "retrain.epochs=1", "feedback.budget_fraction=0.05",
              "generate.num_inference_steps=4", "adapt.steps=2", "filter.filters=degenerate"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / ".site"), str(ROOT / "src"), str(ROOT / "tests"),
                                                    env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _run(cmd: list[str], timeout: float) -> tuple[int, float, str]:
    """(exit code, wall seconds, the last lines of stdout and stderr) of ``cmd`` in the repository root."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = 124, f"timed out after {timeout:.0f} s\n" + ((exc.stdout or b"").decode(errors="replace")
                                                                 if isinstance(exc.stdout, bytes) else (exc.stdout or ""))
    seconds = time.time() - t0
    print(out[-2000:], flush=True)
    return code, seconds, "\n".join(out.strip().splitlines()[-15:])


def device_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device (CPU: {os.cpu_count()} cores, {platform.machine()}); torch {torch.__version__}"
    props = torch.cuda.get_device_properties(0)
    driver = ""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return (f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**20:,.0f} MiB"
            + (f", driver {driver}" if driver else "") + f"); torch {torch.__version__}, CUDA {torch.version.cuda}")


def gpu_tests(timeout: float) -> str:
    code, seconds, tail = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                "tests/test_devices.py", "tests/test_generation_scale.py"], timeout)
    last = tail.splitlines()[-1] if tail else ""
    return f"`pytest -m gpu` (exit {code}, {seconds:.0f} s): {last}"


def preset_runs(device: str, smoke: bool, timeout: float) -> str:
    lines = ["| preset | exit | wall s | in stages s | outside stages s | stage seconds |", "|---|---|---|---|---|---|"]
    for preset in PRESETS:
        with tempfile.TemporaryDirectory() as tmp:
            sets = [f"device={device}", "tracking.enabled=false", *(SMOKE_SETS if smoke else [])]
            cmd = [sys.executable, "-m", "feedback_synth.cli.main", "run", "--dataset", preset, "--output",
                   os.path.join(tmp, "run")] + [a for s in sets for a in ("--set", s)]
            code, seconds, tail = _run(cmd, timeout)
            summary_path = Path(tmp, "run", "report", "run_summary.json")
            if code == 0 and summary_path.exists():
                timings = json.loads(summary_path.read_text())["timings"]
                inside = sum(timings.values())
                stages = ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
                lines.append(f"| {preset} | 0 | {seconds:.1f} | {inside:.1f} | {seconds - inside:.1f} | {stages} |")
            else:
                lines.append(f"| {preset} | {code} | {seconds:.1f} | - | - | {tail.splitlines()[-1] if tail else ''} |")
    return "\n".join(lines)


def throughput(smoke: bool, timeout: float) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "throughput.md")
        cmd = [sys.executable, "benchmarks/generation_throughput.py", "--skip-cpu", "--repeats", "1",
               "--output", out] + (["--smoke", "--skip-estimate"] if smoke else [])
        code, seconds, tail = _run(cmd, timeout)
        body = Path(out).read_text() if Path(out).exists() else f"(exit {code})\n\n```\n{tail}\n```"
    return f"`{' '.join(cmd[1:])}` (exit {code}, {seconds:.0f} s; its own report follows)\n\n" + body.replace(
        "\n# ", "\n### ").replace("\n## ", "\n### ")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy size on any device: a check of this script")
    ap.add_argument("--output", help=f"report file (default: {RESULTS.relative_to(ROOT)}; none with --smoke)")
    ap.add_argument("--skip", action="append", default=[], choices=("tests", "runs", "throughput"))
    args = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("gpu_check: no CUDA device here; run it on the GPU machine, or pass --smoke to check the script",
              file=sys.stderr)
        return 2
    t0 = time.time()
    parts = [f"# GPU check{' (smoke: toy size, not a measurement)' if args.smoke else ''}",
             f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}  \nDevice: {device_line()}  \n"
             f"Command: `python benchmarks/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    if "tests" not in args.skip:
        parts.append("## The gpu tests\n\n" + gpu_tests(300))
    if "runs" not in args.skip:
        parts.append(f"## A whole run of each preset (device={device}, tracking off)\n\n" + preset_runs(device, args.smoke, 240)
                     + "\n\nOutside the stages: process start-up, imports, pre-flight and the report, "
                       "from the wall time of the command.")
    if "throughput" not in args.skip:
        parts.append("## Generation throughput, SD-sized (measured peak memory next to the estimate)\n\n"
                     + throughput(args.smoke, 360))
    parts.append(f"Total: {time.time() - t0:.0f} s.")
    report = "\n\n".join(parts) + "\n"
    print(report)
    output = args.output or (None if args.smoke else str(RESULTS))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(report)
        print(f"written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
