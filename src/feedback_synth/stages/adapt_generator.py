"""The adapt_generator stage: fine-tune the generator on the task's real images, and measure the gap
to the real data before and after."""
from __future__ import annotations

from dataclasses import asdict

from feedback_synth import storage
from feedback_synth.config import AdaptConfig, GenerateConfig, result_settings
from feedback_synth.data.imageset import load_info, load_split
from feedback_synth.devices import resolve_device
from feedback_synth.fingerprints import folder_digest
from feedback_synth.stages.result import StageResult
from feedback_synth.stages.resume import digests, run_stage
from feedback_synth.synthesis.gap_checks import gap_report
from feedback_synth.tracking.descriptors import splits

SAMPLING_FIELDS = ("generator", "strength", "condition_on_real", "num_inference_steps", "cfg_scale", "cond_dropout",
                   "prompt_template", "class_map", "noise_level")


def sampling_settings(gen_cfg: GenerateConfig) -> dict:
    """The generate settings the stage samples its before/after images with (part of its
    fingerprint: an adaptation is the same one only with the same)."""
    return {k: getattr(gen_cfg, k) for k in SAMPLING_FIELDS}


def adapt_generator(dataset_url: str, baseline_model_url: str, output_url: str, cfg: AdaptConfig,
                    gen_cfg: GenerateConfig, overwrite: bool = False) -> StageResult:
    """Fine-tune the generator (``gen_cfg.generator``) on the task's real training images
    (``generation.adapt``) and measure the gap to the real data before and after, per class.

    Writes ``generator/`` (a diffusers folder that generation loads instead of the original),
    ``adapt_report.json`` (losses, gap, near-copy share and diversity before and after, per
    class), ``loss.png`` and ``samples_before_after.png`` under ``output_url``. With
    ``cfg.method`` none it writes nothing and names the original generator. ``summary['generator']``
    is the generator folder to generate with either way.
    """
    from feedback_synth.generation.loading import generator_path

    if cfg.method == "none":
        return StageResult("adapt_generator", {"generator": gen_cfg.generator, "method": "none"})
    base = generator_path(gen_cfg.generator, load_info(dataset_url).name)
    sampling = sampling_settings(gen_cfg)
    return run_stage("adapt_generator", output_url, {"adapt": result_settings(cfg), "sampling": sampling},
                     {**digests(data=dataset_url, baseline=baseline_model_url), "generator": folder_digest(base)},
                     lambda: _adapt_generator(dataset_url, baseline_model_url, output_url, cfg, gen_cfg, base),
                     overwrite)


def _adapt_generator(dataset_url: str, baseline_model_url: str, output_url: str, cfg: AdaptConfig,
                     gen_cfg: GenerateConfig, base: str) -> StageResult:
    import numpy as np

    from feedback_synth.generation.adapt import adapt_unet, sample_per_class, save_adapted
    from feedback_synth.generation.adapters import adapter_of
    from feedback_synth.generation.loading import class_index, generator_meta, load_generator
    from feedback_synth.reporting import plots

    train = load_split(dataset_url, "train")
    info = load_info(dataset_url)
    index_map = class_index(base, train.class_names, gen_cfg.class_map)
    pipe = load_generator(gen_cfg.generator, info.name, device=resolve_device(cfg.device, "adapt.device"))
    kind = adapter_of(pipe).name
    before, labels = sample_per_class(pipe, train, cfg.samples_per_class, gen_cfg, index_map, cfg.seed)
    losses = adapt_unet(pipe, kind, train, cfg, index_map, gen_cfg.prompt_template, gen_cfg=gen_cfg)
    after, _ = sample_per_class(pipe, train, cfg.samples_per_class, gen_cfg, index_map, cfg.seed)
    meta = generator_meta(base)
    generator_url = storage.join(output_url, "generator")
    save_adapted(pipe, kind, cfg.method, base, generator_url, {
        **{k: v for k, v in meta.items() if k in ("class_names", "group_names", "joint_groups")},
        "class_names": meta.get("class_names") or train.class_names, "task_class_names": train.class_names,
        "adapted_from": base, "adapt": asdict(cfg), "final_loss": float(np.mean(losses[-50:]))})
    device = resolve_device(cfg.device, "adapt.device")
    gap_before = gap_report(dataset_url, baseline_model_url, before, labels, device)
    gap_after = gap_report(dataset_url, baseline_model_url, after, labels, device)
    report = {"method": cfg.method, "kind": kind, "generator": generator_url, "base": base, "losses": losses,
              "final_loss": float(np.mean(losses[-50:])), "class_names": train.class_names,
              "train_class_counts": train.class_counts().tolist(), "before": gap_before, "after": gap_after,
              "copy_guard": getattr(losses, "copy_guard", None)}
    storage.write_json(storage.join(output_url, "adapt_report.json"), report)
    storage.write_bytes(storage.join(output_url, "loss.png"), plots.loss_curve(losses, f"adapting the generator ({cfg.method})"))
    storage.write_bytes(storage.join(output_url, "samples_before_after.png"), plots.sample_grid(
        {"real (train)": (train.images, train.labels), "before adaptation": (before, labels),
         "after adaptation": (after, labels)}, train.class_names,
        title="Unguided samples per class, before and after adapting the generator to the task"))
    storage.write_bytes(storage.join(output_url, "gap_per_class.png"), plots.gap_per_class(
        gap_before, gap_after, train.class_names, train.class_counts().tolist()))
    metrics = {"final_loss": report["final_loss"]}
    for when, g in (("before", gap_before), ("after", gap_after)):
        for measure in ("off_support", "discriminator", "near_copy", "diversity"):
            if g[measure]["overall"] is not None:
                metrics[f"{measure}_{when}"] = g[measure]["overall"]
    weights = [u for u in storage.find(generator_url) if u.endswith(".safetensors")]
    summary = {k: v for k, v in report.items() if k != "losses"}
    return StageResult("adapt_generator", summary, metrics,
                       [storage.join(output_url, n) for n in ("adapt_report.json", "loss.png", "samples_before_after.png",
                                                               "gap_per_class.png")] + weights,
                       datasets=[splits(dataset_url, "train", "val")])
