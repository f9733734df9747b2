"""Which pipeline tasks run on GPU pods: the one place that decides it.

A task named here gets the GPU image, an accelerator request, the GPU node selector and
tolerations, and retries for preemptible nodes (``pipelines.feedback_synth_pipeline``); it resolves
the run's ``device`` on its own pod (``auto``: CUDA where the pod has it; ``cuda`` on a pod without
one stops the task with one line, before any work). Every other task runs on a CPU pod, on the CPU.
"""
from __future__ import annotations

GPU_STAGES: frozenset[str] = frozenset({"train_baseline", "adapt_generator", "generate_shard", "retrain"})


def on_gpu(stage: str) -> bool:
    """Does the task of ``stage`` run on a GPU pod?"""
    return stage in GPU_STAGES
