"""One device setting, resolved once, reaching every stage: the CPU-side tests of the GPU path.

The first GPU run crashed because an inference helper ran on its own ``device="cpu"`` default
while the classifier lived on ``cuda``. These tests would have caught it on a CPU: the helpers run
on a classifier on the ``meta`` device, no parameter defaults to the CPU, a device the machine
lacks stops every entry point before any work, settings that do not change results do not block a
resume, and the compiled pipeline's GPU tasks resolve the device they request.
"""
from __future__ import annotations

import ast
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from feedback_synth.cli.main import main
from feedback_synth.config import RunConfig, load_run_config, resolve_devices, result_settings
from feedback_synth.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REDUCED = ["train.model=test_resnet", "train.epochs=1", "retrain.epochs=1", "feedback.budget_fraction=0.1",
           "feedback.shard_size=16", "generate.num_inference_steps=4", "generate.guide_every=2",
           "tracking.enabled=false", "filter.filters=degenerate"]


def _sets(values):
    return [arg for v in values for arg in ("--set", v)]


# ------------------------------------------------------------------ helpers follow the module's device


def _on_meta(clf):
    """``clf`` moved to the meta device, recording the device of every input its forward sees."""
    seen = []
    first_layer = next(m for m in clf.modules() if isinstance(m, torch.nn.Conv2d))  # every path passes it
    first_layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].device))
    return clf.to("meta"), seen


@pytest.mark.parametrize("helper", ["predict_logits", "extract_features", "evaluate"])
def test_inference_helpers_run_on_the_classifiers_own_device(helper, small_classifier, digits):
    """A classifier on another device than the CPU gets its inputs there (on ``meta`` the forward
    runs and only the copy of the result back to the CPU fails; with a CPU default the forward
    itself would fail on mixed devices)."""
    from feedback_synth.config import DataConfig
    from feedback_synth.synthesis.feedback import extract_features
    from feedback_synth.training.classifier import load_classifier
    from feedback_synth.training.evaluate import evaluate, predict_logits

    clf, seen = _on_meta(load_classifier(small_classifier[1], "cpu"))
    call = {"predict_logits": lambda: predict_logits(clf, digits["test"]),
            "extract_features": lambda: extract_features(clf, digits["test"]),
            "evaluate": lambda: evaluate(clf, digits["test"], DataConfig())}[helper]
    with pytest.raises(NotImplementedError, match="meta"):  # the copy out of a meta tensor, after the forward
        call()
    assert seen and all(d.type == "meta" for d in seen)


def _device_defaults(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, function) of every parameter named like a device whose default is a device string."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if "device" in arg.arg and isinstance(default, ast.Constant) and default.value in ("cpu", "cuda"):
                    found.append((node.lineno, node.name))
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and "device" in node.target.id \
                and isinstance(node.value, ast.Constant) and node.value.value in ("cpu", "cuda"):
            found.append((node.lineno, node.target.id))
    return found


def test_house_rule_no_hidden_cpu_device_default():
    """No function parameter and no config field defaults to a fixed device: a device is passed
    explicitly, or follows the module (``devices.module_device``), or is the run's (auto)."""
    offenders = []
    for root in ("src", "components", "pipelines"):
        for path in sorted((ROOT / root).rglob("*.py")):
            for line, name in _device_defaults(ast.parse(path.read_text(), str(path))):
                offenders.append(f"{path.relative_to(ROOT)}:{line} {name}")
    assert not offenders, offenders
    # the rule itself catches what it is for
    assert _device_defaults(ast.parse("def f(x, device='cpu'): pass\nclass C:\n    device: str = 'cpu'\n"))


# ------------------------------------------------------------------ one setting, resolved once


def test_one_device_setting_reaches_every_section_and_a_section_may_override():
    cfg = load_run_config(overrides=["device=cpu", "generate.device=auto"])
    resolved = resolve_devices(cfg)
    assert resolved.device == "cpu"
    assert {getattr(resolved, s).device for s in ("train", "retrain", "adapt", "feedback", "filter")} == {"cpu"}
    assert resolved.generate.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cfg.train.device == "" and cfg.device == "cpu"  # the config as asked is not changed
    assert resolve_devices(RunConfig()).device == ("cuda" if torch.cuda.is_available() else "cpu")  # auto


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("setting, field", [("device=cuda", "device"), ("retrain.device=cuda:0", "retrain.device"),
                                            ("filter.device=cuda", "filter.device")])
def test_a_missing_device_is_one_line_naming_the_field(setting, field):
    with pytest.raises(ConfigError, match=rf"^config field '{field}': .* no CUDA device"):
        resolve_devices(load_run_config(overrides=[setting]))


def test_a_device_name_is_checked_when_the_config_is_built():
    with pytest.raises(ConfigError, match=r"config field 'train.device': 'gpu' is not a device"):
        load_run_config(overrides=["train.device=gpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("verb", ["run", "train-baseline", "tune"])
def test_every_entry_point_checks_the_device_before_any_work(verb, tmp_path, capsys):
    out = tmp_path / "out"
    args = {"run": ["run", "--output", str(out)], "train-baseline": ["train-baseline", "--data", str(tmp_path / "nodata"),
                                                                        "--output", str(out)],
            "tune": ["tune", "--output", str(out)]}[verb]
    assert main([*args, "--set", "device=cuda", "--set", "tracking.enabled=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["feedback-synth: error: config field 'device': 'cuda' but this machine has no CUDA device "
                   f"(torch {torch.__version__}); use auto or cpu"]
    assert not out.exists()


def test_settings_that_do_not_change_results_are_not_fingerprinted():
    from feedback_synth.config import GenerateConfig

    fast = GenerateConfig(device="cuda", batch_size=8, compile_unet=True, gradient_checkpointing=True,
                          guidance_chunk_size=2, pad_last_batch=True)
    assert result_settings(fast) == result_settings(GenerateConfig())
    assert result_settings(GenerateConfig(scale=0.05)) != result_settings(GenerateConfig())
    assert "device" in asdict(fast)  # recorded in the config all the same


@pytest.mark.slow
def test_a_run_resumes_with_another_device_and_batch_size(tmp_path, tiny_generator, capsys):
    """A run started with one device and batch size resumes with another (here ``cpu`` then ``auto``,
    the CPU on this machine, and other inference batch and chunk sizes): every stage is reused, and
    the report is the same."""
    out = str(tmp_path / "run")
    base = [*REDUCED, f"generate.generator={tiny_generator}"]
    assert main(["run", "--output", out, *_sets([*base, "device=cpu", "generate.batch_size=64"])]) == 0
    first = json.loads((tmp_path / "run" / "report" / "run_summary.json").read_text())
    capsys.readouterr()
    assert main(["run", "--output", out, *_sets([*base, "device=auto", "generate.batch_size=8",
                                                 "generate.guidance_chunk_size=2", "train.device=auto"])]) == 0
    again = json.loads((tmp_path / "run" / "report" / "run_summary.json").read_text())
    assert again["generation"]["skipped"] == again["generation"]["shards"] > 0
    for key in ("baseline", "retrained", "delta", "kept", "fidelity"):
        assert again[key] == first[key], key
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["devices"]["run"] == ("cuda" if torch.cuda.is_available() else "cpu")
    # the config kept is the one asked for (auto stays auto), so a third run with it resumes too
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("device: auto")


# ------------------------------------------------------------------ Kubeflow: one place decides the GPU tasks


def test_compiled_gpu_tasks_resolve_the_device_they_request(tmp_path):
    """Every task the compiled pipeline puts on a GPU (an accelerator request and the GPU image)
    is one that ``placement`` names, and on its pod it resolves the run's device: ``cuda`` asked on
    a pod without CUDA stops it with one line, auto takes the pod's GPU where there is one. A CPU
    task runs on the CPU whatever the run asks."""
    import yaml
    from kfp import dsl

    from feedback_synth.orchestration.stage_table import STAGES
    from feedback_synth_kfp import tracking as kfp_tracking
    from feedback_synth_kfp.components import GPU_IMAGE
    from feedback_synth_kfp.pipelines.feedback_synth_pipeline import compile_pipeline
    from feedback_synth_kfp.placement import GPU_STAGES, on_gpu

    spec = next(yaml.safe_load_all(Path(compile_pipeline(str(tmp_path / "p.yaml"))).read_text()))
    executors = spec["deploymentSpec"]["executors"]
    stage_of_task = {s.component_name: s.name for s in STAGES}
    on_accelerator = {stage_of_task[name.removeprefix("exec-").replace("-", "_")] for name, e in executors.items()
                      if "accelerator" in e["container"].get("resources", {})}
    assert on_accelerator == GPU_STAGES == {"train_baseline", "adapt_generator", "generate", "retrain"}
    for name, e in executors.items():
        task = name.removeprefix("exec-").replace("-", "_")
        assert (e["container"]["image"] == GPU_IMAGE) == (stage_of_task.get(task) in GPU_STAGES), name
    tasks = [n.removeprefix("exec-").replace("-", "_") for n in executors]
    assert set(tasks) - set(stage_of_task) == {"start_tracking", "finish_tracking"}  # no stage: tracking only
    for task in set(tasks) & set(stage_of_task):
        stage = stage_of_task[task]
        for asked in ("auto", "cuda"):
            cfg = RunConfig(device=asked)
            art = dsl.Artifact(name="tracking", uri="/nowhere",
                               metadata={kfp_tracking.CONFIG_KEY: json.dumps(asdict(cfg))})
            if on_gpu(stage) and asked == "cuda" and not torch.cuda.is_available():
                with pytest.raises(ConfigError, match="no CUDA device"):
                    kfp_tracking.run_config(art, stage)
                continue
            resolved = kfp_tracking.run_config(art, stage)
            want = ("cuda" if asked == "cuda" or torch.cuda.is_available() else "cpu") if on_gpu(stage) else "cpu"
            assert {resolved.device, resolved.train.device, resolved.retrain.device, resolved.generate.device,
                    resolved.adapt.device} == {want}, (task, asked)


def test_every_component_resolves_its_config_for_its_own_stage():
    """Each stage component runs its stage table row (``run_table_stage(tracking, <its stage>, ...)``,
    which resolves the config on the task's pod), on the image of its row."""
    from feedback_synth.orchestration.stage_table import STAGES

    for row in STAGES:
        if row.name == "promote":
            continue
        tree = ast.parse((ROOT / "components" / f"{row.component_name}.py").read_text())
        calls = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "run_table_stage"]
        assert [c.args[1].value for c in calls] == [row.name], row.name
        images = [c for c in ast.walk(tree) if isinstance(c, ast.Call) and getattr(c.func, "id", "") == "image_for"]
        assert [c.args[0].value for c in images] == [row.name], row.name


# ------------------------------------------------------------------ the benchmark's GPU code path, on the CPU


def test_throughput_benchmark_smoke_runs(tmp_path, capsys):
    """``generation_throughput.py --smoke``: the SD-sized code path with tiny widths, on this
    device (it broke once on an import that moved, and nothing ran it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generation_throughput", ROOT / "benchmarks" / "generation_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        assert module.main(["--smoke", "--skip-estimate", "--output", str(tmp_path / "out.md")]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "SD 2.1 (text), 64 px [smoke]" in printed and "SD 2.1 unCLIP (image), 64 px [smoke]" in printed
    assert not (tmp_path / "out.md").exists()  # --smoke writes no results


# ------------------------------------------------------------------ on a real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_whole_run_on_cuda(tmp_path, tiny_generator, capsys):
    """The whole pipeline on the GPU at test size: every stage, the oracle and the report."""
    out = tmp_path / "run"
    assert main(["run", "--output", str(out), *_sets([*REDUCED, f"generate.generator={tiny_generator}",
                                                      "device=cuda", "adapt.method=full", "adapt.steps=5"])]) == 0
    record = json.loads((out / "run.json").read_text())
    assert set(record["devices"].values()) == {"cuda"}
    summary = json.loads((out / "report" / "run_summary.json").read_text())
    assert summary["generated"] > 0 and summary["retrained"]["overall"] > 0
    assert os.path.exists(out / "report" / "report.md")
