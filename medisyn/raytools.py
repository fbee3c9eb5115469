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
    """Whether this run's GPU work gets GPUs: asked for (``train.use_gpu``) and the cluster has some,
    up now or reachable by autoscaling (``autoscaling_groups``: a GPU node type with workers to add).

    One answer for every stage: a CPU-only cluster runs the same actors on CPUs instead of
    queueing GPU requests it can never grant.
    """
    import ray

    if not wanted:
        return False
    return ray.cluster_resources().get("GPU", 0) > 0 or any(
        shape.get("GPU", 0) > 0 and count != 0 for shape, count in autoscaling_groups()
    )


def _same_shape(node: dict[str, float], shape: dict[str, float]) -> bool:
    return all(abs(node.get(k, 0.0) - v) < 1e-9 for k, v in shape.items() if k in ("CPU", "GPU"))


def gpu_capacity(nodes: list[dict[str, float]], groups: list[tuple[dict[str, float], int]] = ()) -> float | None:
    """GPUs of the ``nodes`` up now plus those the autoscaler may still add (``groups``: node shape,
    most workers of that shape, -1 unbounded; nodes up of a group's shape count against its most).
    None: unbounded. A pure function, as :func:`resource_shortfall`."""
    total = sum(float(n.get("GPU", 0.0)) for n in nodes)
    unmatched = [dict(n) for n in nodes]
    for shape, most in groups:
        up = [n for n in unmatched if _same_shape(n, shape)]
        for n in up:
            unmatched.remove(n)
        if float(shape.get("GPU", 0.0)) <= 0:
            continue
        if most < 0:
            return None
        total += float(shape["GPU"]) * max(most - len(up), 0)
    return total


def actor_pool_bounds(min_actors: int, max_actors: int, use_gpu: bool, gpus: float | None) -> tuple[int, int | None]:
    """(min, max) actors of a one-GPU-per-actor pool on a cluster of ``gpus`` GPUs now or reachable
    (None: unbounded; max None: Ray Data's unbounded pool). ``max_actors`` 0 means every such GPU;
    a set maximum is cut to them, so no actor waits for a GPU that can never come. On a CPU cluster
    (``use_gpu`` false) the pool stays small: ``max_actors``, or 1 when 0. A pure function."""
    if not use_gpu:
        most: int | None = max_actors or 1
    elif gpus is None:
        most = max_actors or None
    else:
        reachable = max(1, int(gpus))
        most = min(max_actors, reachable) if max_actors else reachable
    least = min(min_actors, most) if most else min_actors
    return least, most


def actor_pool(min_actors: int, max_actors: int, use_gpu: bool):
    """Ray Data's ``ActorPoolStrategy`` for :func:`actor_pool_bounds` on the live cluster."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    least, most = actor_pool_bounds(min_actors, max_actors, use_gpu, gpu_capacity(nodes, autoscaling_groups()))
    log.info("actor pool: %d to %s actors (%s)", least, most or "unbounded", "one GPU each" if use_gpu else "CPU")
    return ray.data.ActorPoolStrategy(min_size=least, max_size=most)


# Where `publish_autoscaling_groups` leaves the cluster launcher's worker types in the GCS key-value store.
KV_NAMESPACE, KV_GROUPS = "medisyn", "autoscaling_groups"


def groups_from_launcher_config(doc: dict) -> list[dict]:
    """The worker node types of a cluster-launcher config (``cluster.yaml`` or the head's
    ``~/ray_bootstrap_config.yaml``): ``[{"name", "resources", "max_workers"}]``, the head type left out
    (it is a node that is up). A type without ``max_workers`` may grow to the global ``max_workers``."""
    head = doc.get("head_node_type")
    return [
        {
            "name": name,
            "resources": {k: float(v) for k, v in (t.get("resources") or {}).items()},
            "max_workers": int(t.get("max_workers", doc.get("max_workers", 0))),
        }
        for name, t in (doc.get("available_node_types") or {}).items()
        if name != head
    ]


def publish_autoscaling_groups(doc: dict) -> list[dict]:
    """Record the launcher config's worker types in the running cluster (run on the head after
    ``ray start``, see cluster.yaml), so that every driver's resource pre-flight and
    ``gpus_available`` count the nodes the autoscaler may still add."""
    import json

    from ray.experimental.internal_kv import _internal_kv_put

    groups = groups_from_launcher_config(doc)
    _internal_kv_put(KV_GROUPS, json.dumps(groups), overwrite=True, namespace=KV_NAMESPACE)
    return groups


def autoscaling_groups() -> list[tuple[dict[str, float], int]]:
    """(node shape, most workers of that shape) for each node type the autoscaler may add: what
    ``publish_autoscaling_groups`` recorded, else the cluster config Ray itself keeps in the GCS
    (reported by some deployments; Ray Train reads it), else none (a fixed cluster). -1: unbounded."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return []
    raw = _internal_kv_get(KV_GROUPS, namespace=KV_NAMESPACE)
    if raw:
        return [(g["resources"], int(g["max_workers"])) for g in json.loads(raw)]
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: no config rather than no run
        config = None
    if not config:
        return []
    return [({k: float(v) for k, v in g.resources.items()}, int(g.max_count)) for g in config.node_group_configs]


def _fits(ask: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in ask.items() if v > 0)


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v) + "}"


def resource_shortfall(
    asks: list[dict[str, float]],
    nodes: list[dict[str, float]],
    groups: list[tuple[dict[str, float], int]] = (),
) -> str | None:
    """Why ``asks`` (bundles that must all be placed at once: one per worker, actor or task, each on a
    single node) cannot fit a cluster of ``nodes`` (total resources of the nodes up now) plus what
    the autoscaler may add (``groups``: node shape, most workers of that shape; -1 unbounded); None
    when they fit. Nodes up that have a group's shape count against that group's maximum. A pure
    function: the caller reads the live cluster (``check_stage_resources``)."""
    asks = [{k: float(v) for k, v in a.items() if v} for a in asks]
    asks = [a for a in asks if a]
    if not asks:
        return None
    shapes = [{k: float(v) for k, v in n.items()} for n in nodes]
    unmatched = list(shapes)
    reachable: list[dict[str, float]] = []
    for shape, most in groups:
        shape = {k: float(v) for k, v in shape.items()}
        up = [
            n for n in unmatched if all(abs(n.get(k, 0.0) - v) < 1e-9 for k, v in shape.items() if k in ("CPU", "GPU"))
        ]
        for n in up:
            unmatched.remove(n)
        extra = len(asks) if most < 0 else max(most - len(up), 0)
        reachable += up + [dict(shape) for _ in range(extra)]
    reachable += unmatched
    keys = sorted({k for a in asks for k in a})
    wanted = {k: sum(a.get(k, 0.0) for a in asks) for k in keys}
    now = {k: sum(n.get(k, 0.0) for n in shapes) for k in keys}
    most = {k: sum(n.get(k, 0.0) for n in reachable) for k in keys}
    short = {k: wanted[k] - most[k] for k in keys if wanted[k] > most[k] + 1e-9}
    what = f"{len(asks)} x {_fmt(asks[0])}" if all(a == asks[0] for a in asks) else ", ".join(map(_fmt, asks))
    if short:
        return (
            f"asks for {what} = {_fmt(wanted)} in all; the cluster has {_fmt(now) if any(now.values()) else 'none'} "
            f"now and at most {_fmt(most) if any(most.values()) else 'none'} with autoscaling: short of {_fmt(short)}"
        )
    biggest = max(reachable, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
    for ask in asks:
        if not any(_fits(ask, n) for n in reachable):
            return f"one of {what} fits on no node: the largest offers {_fmt({k: biggest.get(k, 0.0) for k in keys})}"
    free = [dict(n) for n in reachable]
    for ask in sorted(asks, key=lambda a: tuple(-a.get(k, 0.0) for k in ("GPU", "CPU", *keys)), reverse=False):
        node = next((n for n in free if _fits(ask, n)), None)
        if node is None:
            return f"{what} do not pack onto the nodes the cluster can have ({', '.join(map(_fmt, reachable))})"
        for k, v in ask.items():
            node[k] = node.get(k, 0.0) - v
    return None


def stage_requests(stage: str, cfg, gpus: bool) -> list[dict[str, float]]:
    """The bundles stage ``stage`` needs placed at once to make progress, as its code asks for them
    (``gpus``: ``gpus_available`` for this run): a Ray Train worker group whole, an actor pool at its
    minimum size, one Tune trial, one task. The job's driver is not counted."""
    t = cfg.train
    if stage == "ingest":
        return [{"CPU": 1}]
    if stage == "vae":  # disabled (real runs keep SDXL's VAE): the stage only says so
        return [{"CPU": cfg.vae_fit.cpus_per_worker}] * cfg.vae_fit.num_workers if cfg.vae_fit.enabled else []
    if stage == "cache":  # the encoder pool at its minimum (raytools.actor_pool_bounds)
        least = actor_pool_bounds(cfg.cache.min_actors, cfg.cache.max_actors, gpus, None)[0]
        return [{"GPU": 1} if gpus else {"CPU": 1}] * least
    if stage == "train":  # ScalingConfig(use_gpu=train.use_gpu): no fallback to CPUs
        return [{"CPU": t.cpus_per_worker, "GPU": 1 if t.use_gpu else 0}] * t.num_workers
    if stage == "select":
        return [{"CPU": 1, "GPU": 1 if gpus else 0}]
    if stage == "generate":
        g = cfg.generate
        return [{"GPU": 1} if gpus else {"CPU": g.cpus_per_actor}] * g.min_actors
    if stage == "audit-fidelity":
        return [{"CPU": 1, "GPU": 1 if gpus and cfg.audit_fidelity.features == "embedder" else 0}]
    if stage == "audit-memorization":  # the embedder pool at its minimum
        m = cfg.audit_memorization
        return [{"GPU": 1} if gpus else {"CPU": 1}] * actor_pool_bounds(m.min_actors, m.max_actors, gpus, None)[0]
    if stage == "audit-utility":  # its GPU use follows the cluster, not train.use_gpu
        u = cfg.audit_utility
        return [{"CPU": u.cpus_per_trial, "GPU": u.gpus_per_trial if gpus else 0}]
    return []  # phantoms, report: the driver alone


def check_stage_resources(stage: str, cfg) -> None:
    """Stop before any work, naming the shortfall, when what ``stage`` asks for cannot fit the cluster
    even at its autoscaling maximum (a request that never fits stays PENDING for ever)."""
    import ray

    from medisyn.configtools import ConfigError

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    groups = autoscaling_groups()
    asks = stage_requests(stage, cfg, gpus_available(True if stage == "audit-utility" else cfg.train.use_gpu))
    problem = resource_shortfall(asks, nodes, groups)
    if problem:
        raise ConfigError(
            f"stage {stage} {problem}. Lower the stage's workers or actors, or raise the cluster's maximum"
        )


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
        nodes = _other_nodes()
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


def _other_nodes() -> list[str]:
    """The live cluster's alive nodes other than the driver's."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]


def _node_sees(node_id: str, path: str) -> bool:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(os.path.exists).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
    )
    return bool(ray.get(probe.remote(path)))


def check_sources(sources: dict[str, tuple[str, str]], nodes: list[str] | None = None, sees=None) -> None:
    """Stop before any ingest work when a node cannot read a source repository.

    ``sources``: ``{repository name: (root, label CSV)}``, local paths or URIs. The driver lists the
    repositories itself; every other node must see each root as a folder and read its label CSV, or
    its tasks would fail on every file they are given (a node without the mount, a node without the
    bucket's credentials). ``nodes`` and ``sees(nodes, sources) -> for each node, the names it can read``
    default to the live cluster's other nodes and one task pinned to each (:func:`visible_sources`)."""
    from medisyn.configtools import ConfigError

    if not sources:
        return
    if nodes is None:
        nodes = _other_nodes()
    if not nodes:
        return
    seen = dict(zip(nodes, (sees or _node_sources)(nodes, sources), strict=True))
    for node in nodes:
        blind = [name for name in sources if name not in seen[node]]
        if blind:
            nodes_blind = sum(1 for n in nodes if blind[0] not in seen[n])
            raise ConfigError(
                f"ingest: node {node[:12]}… cannot read repository {blind[0]!r} ({sources[blind[0]][0]}: its root "
                f"folder or label CSV){f' nor {len(blind) - 1} other(s)' if len(blind) > 1 else ''}; "
                f"{nodes_blind} of {len(nodes) + 1} nodes cannot. Every node reads sources: mount the repository on "
                "every node at the same path, or give an object-store URI (s3://bucket/repo) every node can read"
            )


def visible_sources(sources: dict[str, tuple[str, str]]) -> list[str]:
    """The names of ``sources`` whose root is a folder and whose label CSV reads, from this process."""
    from medisyn import storage

    names = []
    for name, (root, csv) in sources.items():
        try:
            if storage.path(root).is_dir():
                with storage.path(csv).open("rb") as f:
                    f.read(1)
                names.append(name)
        except Exception:  # missing, unmounted, no permission, no credentials: not visible
            pass
    return names


def _node_sources(nodes: list[str], sources: dict[str, tuple[str, str]]) -> list[list[str]]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(visible_sources)
    return ray.get(
        [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(sources)
            for n in nodes
        ]
    )
