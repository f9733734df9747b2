"""Building a pipeline in a process that has imported torch, without KFP's stack walk.

Each ``PipelineTask`` setter (``set_cpu_limit``, ``set_accelerator_type``, ...) calls
``PipelineTask._ensure_container_spec_exists``, which in kfp 2.x calls ``inspect.stack()`` only to
name the calling setter in its error message. ``inspect.stack()`` reads the source of every frame
and, per frame, scans ``sys.modules``: with torch, timm, diffusers and MLflow imported (a kfp-local
launch, the pilot, a test process) that is about 0.1 s per setter, and the pipeline calls about 50
setters per build. Measured here: one build 25.7 s at a stack depth of 60, 0.014 s with the check
below. The check is the same (a task without a container spec is refused, naming the setter); it
names the caller from its frame instead.
"""
from __future__ import annotations

import sys

from kfp.dsl import pipeline_task

_MESSAGE = ("{} can only be used on single-step components, not pipelines used as components, or special "
            "components like importers.")  # kfp's own wording


def _ensure_container_spec_exists(self) -> None:
    """kfp's check (a setter needs a single-step component), naming the setter from its frame."""
    if self.container_spec is None:
        raise ValueError(_MESSAGE.format(sys._getframe(1).f_code.co_name))


def install() -> None:
    """Replace kfp's check where it exists (idempotent)."""
    task = pipeline_task.PipelineTask
    if hasattr(task, "_ensure_container_spec_exists"):
        task._ensure_container_spec_exists = _ensure_container_spec_exists
