"""Connecting to Ray the same way everywhere: the job's cluster under `ray job submit`, else local."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(**kwargs) -> None:
    """``ray.init`` once: inside a Ray job (RAY_ADDRESS set) it joins that cluster; otherwise it
    starts a local one with all CPUs. Ray Data's progress bars are kept on."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(**({"configure_logging": False} | kwargs))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    log.info("ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))


def gpus_available(wanted: bool = True) -> bool:
    """Whether this run's GPU work gets GPUs: asked for (``train.use_gpu``) and the cluster has some.

    One answer for every stage: a CPU-only cluster runs the same actors on CPUs instead of
    queueing GPU requests it can never grant.
    """
    import ray

    return wanted and ray.cluster_resources().get("GPU", 0) > 0
