"""Which pipeline tasks run on GPU pods, as the stage table says (``orchestration.stage_table``: its
``gpu`` column is the one place that decides it).

A GPU task gets the GPU image, an accelerator request, the GPU node selector and tolerations, and
retries for preemptible nodes (``pipelines.feedback_synth_pipeline``); it resolves the run's
``device`` on its own pod (``auto``: CUDA where the pod has it; ``cuda`` on a pod without one stops
the task with one line, before any work). Every other task runs on a CPU pod, on the CPU.
"""
from __future__ import annotations

from feedback_synth.orchestration.stage_table import STAGE_BY_NAME, STAGES

GPU_STAGES: frozenset[str] = frozenset(s.name for s in STAGES if s.gpu)


def on_gpu(stage: str) -> bool:
    """Does the task of ``stage`` (a stage table name) run on a GPU pod?"""
    if stage not in STAGE_BY_NAME:
        raise KeyError(f"no stage '{stage}' in the stage table (has: {', '.join(STAGE_BY_NAME)})")
    return STAGE_BY_NAME[stage].gpu
