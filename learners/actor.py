"""The Learner as a Ray actor (the cluster layer owns placement; this only fixes the resources and threads)."""

from __future__ import annotations

from typing import Any

from learners.learner import Learner


def remote_learner(num_cpus: float = 1, num_gpus: float = 0, **options: Any):
    """`ray.remote(Learner)` with resources; use `.remote(model_path, ..., threads=N)`.

    Ray sets OMP_NUM_THREADS to the actor's num_cpus (1 when unset), so pass `threads=` to the Learner to use
    more cores for torch. With num_gpus=1 Ray sets CUDA_VISIBLE_DEVICES and DeepSpeed picks the GPU and nccl.
    """
    import ray

    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, **options)(Learner)
