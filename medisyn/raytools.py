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


def _member_rows(batch, ids_ref, key: str, drop: bool):
    import numpy as np
    import pyarrow as pa
    import ray

    keep = ray.get(ids_ref)  # zero-copy from the node's object store: one copy per node, not per task
    values = batch.column(key).to_numpy(zero_copy_only=False).astype(keep.dtype if len(keep) else "S1")
    if not len(keep):
        found = np.zeros(len(values), dtype=bool)
    else:
        pos = np.searchsorted(keep, values).clip(0, len(keep) - 1)
        found = keep[pos] == values
    return batch.filter(pa.array(~found if drop else found))


def keep_ids(ds, ids, key: str = "id", drop: bool = False):
    """The rows of Ray Dataset ``ds`` whose ``key`` is in ``ids`` (or, with ``drop``, is not): a
    broadcast semi-join. The ids go to the object store once, as a sorted fixed-width byte
    array (32 MB per million 32-character ids); each task checks membership by binary search.
    Not a literal list in the plan (an ``is_in`` over a million ids is shipped with every task
    and shown in the dashboard), and not a shuffle join (which would move the image column)."""
    import numpy as np
    import ray

    arr = np.sort(np.asarray(sorted(ids), dtype="S")) if ids else np.zeros(0, dtype="S1")
    return ds.map_batches(
        _member_rows,
        fn_kwargs={"ids_ref": ray.put(arr), "key": key, "drop": drop},
        batch_format="pyarrow",
        zero_copy_batch=True,
    )


def check_run_dir(run_dir: str, nodes: list[str] | None = None, sees=None) -> None:
    """Stop before any work when a multi-node cluster cannot share ``run_dir``.

    A URI (``s3://``) is shared by construction. A local path must be absolute (a relative one
    names a folder under each process's working directory) and visible from every node: a probe
    file written here must be readable by a task pinned to each other node. ``nodes`` and
    ``sees(node_id, path) -> bool`` default to the live cluster's other nodes and such a task."""
    import uuid

    from medisyn.configtools import ConfigError
    from medisyn.storage import is_remote

    if is_remote(run_dir):
        return
    if nodes is None:
        import ray

        here = ray.get_runtime_context().get_node_id()
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not nodes:
        return
    if not os.path.isabs(run_dir):
        raise ConfigError(
            f"run_dir: {run_dir!r} is relative, and this cluster has {len(nodes) + 1} nodes: each would read and "
            "write its own folder. Give an object-store URI (s3://bucket/run) or an absolute path on a shared "
            "file system"
        )
    os.makedirs(run_dir, exist_ok=True)
    probe = os.path.join(run_dir, f".probe-{uuid.uuid4().hex}")
    with open(probe, "w") as f:
        f.write("medisyn")
    try:
        blind = [n for n in nodes if not (sees or _node_sees)(n, probe)]
    finally:
        os.unlink(probe)
    if blind:
        raise ConfigError(
            f"run_dir: {run_dir} is not shared: {len(blind)} of {len(nodes) + 1} nodes cannot see a file written "
            f"there (node {blind[0][:12]}…). Every stage writes where every node must read: give an object-store URI "
            "(s3://bucket/run) or a path on a file system mounted on every node"
        )


def _node_sees(node_id: str, path: str) -> bool:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(os.path.exists).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    return bool(ray.get(probe.remote(path)))
