"""Guided generation, shard by shard, resumable and idempotent.

A shard's outputs live in ``<output>/shards/shard-NNNNN/``: ``images.npz`` and ``metadata.csv``,
then a ``_SUCCESS`` marker written last. A shard with the marker is finished and is skipped on a
re-run; one without it (killed mid-batch, a preempted pod) is wiped and redone from scratch. Images
depend only on (seed, class, group, index), so a redone shard reproduces the same images.
"""
from __future__ import annotations

import csv
import io as _io
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from feedback_synth import storage
from feedback_synth.config import GenerateConfig, result_settings
from feedback_synth.data.imageset import ImageSet, load_info, load_split
from feedback_synth.devices import resolve_device
from feedback_synth.errors import DataError
from feedback_synth.fingerprints import (
    digest_of,
    fingerprint,
    finished_output,
    folder_digest,
    input_digest,
    read_marker,
)
from feedback_synth.generation.adapters import BatchConditions, adapter_of
from feedback_synth.generation.loading import class_index, generator_path, load_generator
from feedback_synth.generation.performance import DTYPES, GUIDANCE_DTYPES, apply_performance_options, pad_batch
from feedback_synth.guidance.feedback_guidance import FeedbackGuidance, guided_step_indices
from feedback_synth.synthesis.feedback import load_class_stats
from feedback_synth.synthesis.plan import GenerationPlan, Shard, image_seed
from feedback_synth.training.classifier import load_classifier

METADATA_COLUMNS = ("index", "class_index", "class_name", "group_index", "group_name", "image_index", "seed",
                    "criterion", "criterion_value", "condition", "finite")


def shard_url(output_url: str, shard_id: int) -> str:
    return storage.join(output_url, "shards", f"shard-{shard_id:05d}")


SHARD_FILES = ("images.npz", "metadata.csv", "_SUCCESS")  # what a shard writes in its folder (_SUCCESS last)


def remove_shard_files(url: str) -> list[str]:
    """Remove what a shard wrote in its folder ``url`` (``SHARD_FILES``, and the temporary files of a
    write that a kill cut short), then the folder if that left it empty; a file of the user's there
    stays. Returns the removed URLs."""
    removed = [u for u in storage.find(url)
               if u.rsplit("/", 1)[-1] in SHARD_FILES or u.rsplit("/", 1)[-1].split(".tmp-")[0] in SHARD_FILES]
    for u in removed:
        storage.remove(u)
    local = storage.local_path(url)
    if local is not None and os.path.isdir(local) and not os.listdir(local):
        os.rmdir(local)
    return removed


def shard_done(output_url: str, shard_id: int) -> bool:
    return storage.exists(storage.join(shard_url(output_url, shard_id), "_SUCCESS"))


def shard_fingerprint(plan: GenerationPlan, shard: Shard, dataset_url: str, model_url: str, feedback_url: str,
                      cfg: GenerateConfig, generator_folder: str) -> dict[str, Any]:
    """What makes a shard's images: its plan entries, the generate config, and the digests of the
    data, the classifier, the feedback (class statistics) and the generator."""
    # not the device, batch size, compile or chunking: a shard may resume elsewhere; and not the
    # generator's URL, which its digest stands for: a run folder moved with its adapted generator resumes
    settings = {k: v for k, v in result_settings(cfg).items() if k != "generator"}
    config = {"entries": [asdict(e) for e in shard.entries], "per_group": plan.per_group, "generate": settings}
    inputs = {"data": input_digest(dataset_url), "model": input_digest(model_url),
              "feedback": input_digest(feedback_url), "generator": folder_digest(generator_folder)}
    return fingerprint("generate_shard", config, inputs)


def check_plan_matches_data(feedback_url: str, dataset_url: str, train: ImageSet, plan: GenerationPlan) -> None:
    """The plan must come from this dataset (another run's data would mix up classes and images)."""
    marker = read_marker(feedback_url)
    if marker is not None and marker["inputs"].get("data") not in (None, input_digest(dataset_url)):
        raise DataError(f"the plan in {feedback_url} was made from another dataset than {dataset_url}; "
                        f"pass the --data that extract-feedback read")
    cells = set(plan.counts)
    known = set(train.class_names) if not plan.per_group else {
        f"{c}/{g}" for c in train.class_names for g in train.group_names}
    if not cells <= known:
        raise DataError(f"the plan in {feedback_url} names classes that {dataset_url} does not have: "
                        f"{sorted(cells - known)[:5]}")


def generated_digest(output_urls: Union[str, list[str]], plan: GenerationPlan) -> str:
    """A digest of the committed shards of ``plan`` (their fingerprints, in plan order)."""
    found = []
    for s in plan.shards:
        url = find_shard(output_urls, s.shard_id)
        found.append(storage.read_json(storage.join(url, "_SUCCESS")).get("digest") if url else "missing")
    return digest_of(found)


@dataclass
class ShardItem:
    class_index: int
    group_index: int
    image_index: int
    seed: int
    source: int  # index into the train split of the real image we start from (-1 = none)


def shard_items(shard: Shard, train: ImageSet, run_seed: int, condition_on_real: bool, per_group: bool) -> list[ShardItem]:
    """Expand a shard into items, each with its seed and the real image it is conditioned on.

    The real image of item i of (class, group) is the (i mod n)-th of a permutation of that cell's
    training images, seeded by (seed, class, group): each sample starts from a different real image
    as long as there are enough, and shards agree on the assignment without talking to each other.
    """
    items = []
    for e in shard.entries:
        mask = train.labels == e.class_index
        if per_group:
            mask &= train.groups == e.group_index
        pool = np.flatnonzero(mask)
        if len(pool) == 0:  # a (class, group) cell with no real image: use the class's images
            pool = np.flatnonzero(train.labels == e.class_index)
        perm = np.random.default_rng(image_seed(run_seed, e.class_index, e.group_index, -1 % 2**31)).permutation(pool)
        for i in range(e.start, e.start + e.count):
            items.append(ShardItem(e.class_index, e.group_index, i, image_seed(run_seed, e.class_index, e.group_index, i),
                                   int(perm[i % len(perm)]) if condition_on_real else -1))
    return items


def _images_to_uint8(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    finite = torch.isfinite(x).flatten(1).all(dim=1)
    x = torch.nan_to_num(x, nan=0.0).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), finite.numpy()


def generate_shard(plan: GenerationPlan, shard_id: int, dataset_url: str, model_url: str, feedback_url: str,
                   output_url: str, cfg: GenerateConfig, pipe=None, progress: Optional[tqdm] = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Generate one shard of the plan; skip it if it is already committed with the same fingerprint
    (``shard_fingerprint``); refuse one committed with another unless ``overwrite``.

    Args:
        plan: the generation plan of the feedback stage.
        shard_id: which shard.
        dataset_url: prepared dataset (real images to condition on).
        model_url: the frozen baseline classifier (feedback).
        feedback_url: the feedback stage's output (class statistics).
        output_url: where ``shards/`` go.
        cfg: generation settings.
        pipe: an already loaded generator pipeline (reused across shards in-process).
        overwrite: redo a shard committed with another fingerprint instead of refusing.
    """
    shard = next((s for s in plan.shards if s.shard_id == shard_id), None)
    if shard is None:
        raise DataError(f"shard {shard_id} is not in the plan (it has shards 0..{len(plan.shards) - 1})")
    info = load_info(dataset_url)
    generator_folder = generator_path(cfg.generator, info.name)
    fp = shard_fingerprint(plan, shard, dataset_url, model_url, feedback_url, cfg, generator_folder)
    url = shard_url(output_url, shard_id)
    done = finished_output(storage.join(url, "_SUCCESS"), fp, "a shard", overwrite)
    if done is not None:
        return {"shard_id": shard_id, "skipped": True, **done["summary"]}
    remove_shard_files(url)  # a half-written shard from a killed run (or an overwritten one): redo it from scratch
    train = load_split(dataset_url, "train")
    check_plan_matches_data(feedback_url, dataset_url, train, plan)
    device = resolve_device(cfg.device, "generate.device")
    if pipe is None:
        pipe = load_generator(cfg.generator, info.name, device=device, dtype=DTYPES[cfg.dtype])
    pipe = apply_performance_options(pipe, cfg)
    feedback, scorer = guidance_of(load_classifier(model_url, device), cfg, feedback_url)
    index_map = class_index(generator_folder, train.class_names, cfg.class_map)
    items = shard_items(shard, train, cfg.seed, cfg.condition_on_real, plan.per_group)
    real = train.to_tensor() if cfg.condition_on_real else None  # the images to start from (SDEdit)
    images, rows, t0 = [], [], time.time()
    for b in range(0, len(items), cfg.batch_size):
        batch = items[b:b + cfg.batch_size]
        arr, batch_rows = generate_batch(pipe, batch, train, real, plan.per_group, cfg, feedback, scorer, index_map,
                                         device)
        images.append(arr)
        rows += [{"index": len(rows) + i, **r} for i, r in enumerate(batch_rows)]
        if progress is not None:
            progress.update(len(batch))
    summary = commit_shard(url, fp, images, rows, cfg, time.time() - t0)
    return {"shard_id": shard_id, "skipped": False, **summary}


def guidance_of(clf, cfg: GenerateConfig, feedback_url: str) -> tuple[Optional[FeedbackGuidance], FeedbackGuidance]:
    """The feedback that steers sampling (None when ``cfg.criterion`` is none) and an independent
    scorer that records every image's criterion value, guided or not (for comparisons)."""
    precision = GUIDANCE_DTYPES[cfg.guidance_dtype]
    stats = load_class_stats(feedback_url) if cfg.criterion != "none" else None
    feedback = None
    if cfg.criterion != "none":
        feedback = FeedbackGuidance(clf, cfg.criterion, cfg.scale, stats, precision=precision,
                                    chunk_size=cfg.guidance_chunk_size)
    record = cfg.criterion if cfg.criterion != "none" else "entropy"
    return feedback, FeedbackGuidance(clf, record, 0.0, stats if record == "hardness" else None, precision=precision)


def generate_batch(pipe, batch: list, train, real: Optional[torch.Tensor], per_group: bool, cfg: GenerateConfig,
                   feedback: Optional[FeedbackGuidance], scorer: FeedbackGuidance, index_map, device
                   ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One batch of the shard's items through the generator (``real``: the training images as a
    tensor, to start from; None: from noise): the images (uint8) and their metadata rows (without
    ``index``)."""
    n_real = len(batch)
    if cfg.pad_last_batch or cfg.compile_unet:  # fixed shapes: the padding's outputs are dropped below
        batch = pad_batch(batch, cfg.batch_size)
    labels = torch.tensor([it.class_index for it in batch])
    generators = [torch.Generator().manual_seed(it.seed) for it in batch]
    init = real[[it.source for it in batch]] if real is not None else None
    steps_run = max(1, int(round(cfg.num_inference_steps * (cfg.strength if init is not None else 1.0))))
    conditions = BatchConditions(
        [it.class_index for it in batch], [it.group_index for it in batch], train.class_names, train.group_names,
        per_group, init, cfg.strength, cfg.prompt_template, cfg.group_prompt_template, cfg.noise_level, index_map)
    kwargs = dict(generators=generators, images=init, strength=cfg.strength,
                  num_inference_steps=cfg.num_inference_steps, cfg_scale=cfg.cfg_scale, cond_dropout=cfg.cond_dropout,
                  feedback=feedback, guide_steps=guided_step_indices(steps_run, cfg.guide_every, cfg.guide_from),
                  grad_through_unet=cfg.grad_through_unet, criterion_labels=labels)
    out = pipe(**{**kwargs, **adapter_of(pipe).conditioning(pipe, conditions)})
    batch, labels, out_images = batch[:n_real], labels[:n_real], out.images[:n_real]
    values = scorer.score_images(out_images.to(device), labels.to(device)).detach().cpu()
    arr, finite = _images_to_uint8(out_images)
    rows = [{"class_index": it.class_index, "class_name": train.class_names[it.class_index],
             "group_index": it.group_index, "group_name": train.group_names[it.group_index],
             "image_index": it.image_index, "seed": it.seed, "criterion": scorer.criterion_name,
             "criterion_value": round(float(v), 6),
             "condition": str(train.ids[it.source]) if it.source >= 0 else "none", "finite": bool(ok)}
            for it, v, ok in zip(batch, values.tolist(), finite.tolist())]
    return arr, rows


def commit_shard(url: str, fp: dict[str, Any], images: list[np.ndarray], rows: list[dict[str, Any]],
                 cfg: GenerateConfig, seconds: float) -> dict[str, Any]:
    """Write the shard's images and metadata, then ``_SUCCESS`` (the fingerprint and the summary)
    last: a shard without it is not done. Returns the summary."""
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METADATA_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    storage.write_npz(storage.join(url, "images.npz"), images=np.concatenate(images))
    storage.write_text(storage.join(url, "metadata.csv"), buf.getvalue())
    summary = {"num_images": len(rows), "seconds": round(seconds, 3), "criterion": cfg.criterion,
               "mean_criterion_value": float(np.mean([r["criterion_value"] for r in rows]))}
    storage.write_json(storage.join(url, "_SUCCESS"), {**fp, "summary": summary})  # the commit: written last
    return summary


def generate(plan_url: str, dataset_url: str, model_url: str, feedback_url: str, output_url: str,
             cfg: GenerateConfig, shard_ids: Optional[list[int]] = None, overwrite: bool = False) -> dict[str, Any]:
    """Generate every shard of the plan (or ``shard_ids``) in this process; finished ones are skipped."""
    plan = GenerationPlan.load(plan_url)
    ids = [s.shard_id for s in plan.shards] if shard_ids is None else list(shard_ids)
    unknown = sorted(set(ids) - {s.shard_id for s in plan.shards})
    if unknown:
        raise DataError(f"shard {unknown[0]} is not in the plan {plan_url} (it has shards 0..{len(plan.shards) - 1})")
    info = load_info(dataset_url)
    todo = [i for i in ids if not shard_done(output_url, i)]
    pipe = load_generator(cfg.generator, info.name, device=resolve_device(cfg.device, "generate.device"),
                          dtype=DTYPES[cfg.dtype]) if todo else None
    total = sum(s.num_images for s in plan.shards if s.shard_id in ids)
    results = []
    with tqdm(total=total, desc=f"generate ({cfg.criterion})", unit="img") as bar:
        for i in ids:
            r = generate_shard(plan, i, dataset_url, model_url, feedback_url, output_url, cfg, pipe=pipe, progress=bar,
                               overwrite=overwrite)
            if r["skipped"]:
                bar.update(r["num_images"])
            results.append(r)
    summary = {"shards": len(results), "skipped": sum(r["skipped"] for r in results),
               "num_images": sum(r["num_images"] for r in results),
               "seconds": round(sum(r["seconds"] for r in results if not r["skipped"]), 3), "criterion": cfg.criterion}
    storage.write_json(storage.join(output_url, "generate_config.json"), asdict(cfg))
    return summary


def read_metadata(url: str) -> list[dict[str, Any]]:
    rows = list(csv.DictReader(_io.StringIO(storage.read_text(url))))
    for r in rows:
        for k in ("index", "class_index", "group_index", "image_index", "seed"):
            r[k] = int(r[k])
        r["criterion_value"] = float(r["criterion_value"])
        r["finite"] = r["finite"] == "True"
    return rows


def find_shard(output_urls: Union[str, list[str]], shard_id: int) -> Optional[str]:
    """The committed folder of ``shard_id`` in any of ``output_urls`` (KFP: one output per shard task)."""
    for url in [output_urls] if isinstance(output_urls, str) else output_urls:
        if shard_done(url, shard_id):
            return shard_url(url, shard_id)
    return None


def load_generated(output_urls: Union[str, list[str]], plan: GenerationPlan, train: ImageSet,
                   require_all: bool = True) -> tuple[ImageSet, list[dict[str, Any]]]:
    """All committed shards as one ImageSet plus their metadata rows (in shard order).

    ``output_urls``: the generate stage's output folder, or a list of them (one per shard task).
    Every shard must be the plan's: its entries (classes, groups, image indices) and its image
    count are checked against the plan, so that a shard of another plan is never used.
    """
    found = {s.shard_id: find_shard(output_urls, s.shard_id) for s in plan.shards}
    missing = [i for i, url in found.items() if url is None]
    if missing and require_all:
        raise DataError(f"{len(missing)} shard(s) of the plan are not finished in {output_urls}: "
                        f"{missing[:10]} (re-run generation: finished shards are skipped)")
    imgs, rows = [], []
    for s in plan.shards:
        url = found[s.shard_id]
        if url is None:
            continue
        done = storage.read_json(storage.join(url, "_SUCCESS"))
        entries = (done.get("config") or {}).get("entries")
        if entries is not None and entries != [asdict(e) for e in s.entries]:
            raise DataError(f"{url} was generated for another plan (its classes or image indices differ from "
                            f"shard {s.shard_id} of this plan); regenerate it (generate --overwrite)")
        shard_images = storage.read_npz(storage.join(url, "images.npz"))["images"]
        shard_rows = read_metadata(storage.join(url, "metadata.csv"))
        if len(shard_images) != s.num_images or len(shard_rows) != s.num_images:
            raise DataError(f"{url} holds {len(shard_images)} images and {len(shard_rows)} metadata rows; shard "
                            f"{s.shard_id} of the plan has {s.num_images}")
        imgs.append(shard_images)
        for r in shard_rows:
            r["shard_id"] = s.shard_id
            rows.append(r)
    h, w, c = train.images.shape[1:]
    images = np.concatenate(imgs) if imgs else np.zeros((0, h, w, c), np.uint8)
    data = ImageSet(images, np.array([r["class_index"] for r in rows], np.int64),
                    np.array([r["group_index"] for r in rows], np.int64),
                    np.array([f"shard-{r['shard_id']:05d}:{r['index']}" for r in rows]),
                    list(train.class_names), list(train.group_names))
    return data, rows
