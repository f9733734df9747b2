"""KFP components: one per stage, each a thin wrapper over one library function.

Every component is a lightweight Python component on our own image (``install_kfp_package=False``:
the image already has kfp and feedback_synth, so pods need no network). Its body imports
feedback_synth and calls the stage; the same definition runs through the KFP local runner
(``SubprocessRunner(use_venv=False)``) and on a cluster.

The image references come from ``images/images.yaml`` (``images.yaml`` here links to it and is
copied into wheels as package data): the GPU image for the GPU tasks (``feedback_synth_kfp.placement``,
the one place that decides which), the CPU image for the rest.
"""
from __future__ import annotations

from importlib import resources

import yaml


def image(kind: str) -> str:
    """Full reference (``registry/name:tag``) of our ``cpu`` or ``gpu`` image."""
    spec = yaml.safe_load((resources.files(__name__) / "images.yaml").read_text())
    if kind not in spec.get("images", {}):
        raise KeyError(f"images.yaml names no '{kind}' image (has: {', '.join(spec.get('images', {}))})")
    return f"{spec['registry']}/{spec['images'][kind]}:{spec['tag']}"


CPU_IMAGE = image("cpu")
GPU_IMAGE = image("gpu")


def image_for(stage: str) -> str:
    """The image of ``stage``'s task: the GPU image where ``placement`` puts it on a GPU pod."""
    from feedback_synth_kfp.placement import on_gpu

    return GPU_IMAGE if on_gpu(stage) else CPU_IMAGE
