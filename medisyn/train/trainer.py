"""The ``train`` stage: a Ray Train ``TorchTrainer`` over the cached latents.

Checkpoints land in ``<run_dir>/checkpoints/epoch-NNN/`` (Ray Train's storage), one per epoch.
A worker that dies restarts from the latest one (``FailureConfig(max_failures)``); a re-run
of a finished or interrupted job finds the run's state there and continues where it stopped.
Every epoch keeps its bf16 weights for selection; only the last keeps ``resume/`` (optimizer
and fp32 state) once the run ends. GPU runs print their memory plan first (train/config.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from medisyn.config import ConfigError, RunConfig, to_dict
from medisyn.records import run_inputs_differ
from medisyn.storage import uri
from medisyn.train.cache import cache_dir, read_train_ids
from medisyn.train.config import memory_plan

log = logging.getLogger(__name__)


def checkpoints(cfg: RunConfig) -> list[Path]:
    """Epoch checkpoints of the run, oldest first."""
    return sorted(p for p in (cfg.run_path / "checkpoints").glob("epoch-*") if (p / "unet").is_dir())


# train settings that change where and how fast a run goes, not what it computes (nor epochs: more continue)
HARDWARE_ONLY = ("epochs", "max_failures", "cpus_per_worker", "use_gpu", "compile", "gradient_checkpointing",
                 "gpu_memory_gb", "checkpoint_local_dir")  # fmt: skip


def finished(root: Path, last: str) -> bool:
    """Ray Train has registered checkpoint ``last`` (its controller lists a checkpoint in its snapshot
    only once every file is in storage; a folder alone may be a half-copied one)."""
    snapshot = root / "checkpoint_manager_snapshot.json"
    if not ((root / last / "unet").is_dir() and snapshot.is_file()):
        return False
    registered = json.loads(snapshot.read_text()).get("checkpoint_results", [])
    return any(r.get("checkpoint_dir_name") == last for r in registered)


def _prune(cfg: RunConfig) -> None:
    """A finished run keeps optimizer and fp32 state only where it would resume: the last epoch."""
    import pyarrow.fs

    from medisyn.train.loop import prune_resume_state

    fs, path = pyarrow.fs.FileSystem.from_uri(uri(cfg.run_path / "checkpoints"))
    done = checkpoints(cfg)
    if done:
        prune_resume_state(fs, path, keep={done[-1].name})


def training_ids(cfg: RunConfig, cached: list[str]) -> list[str]:
    """The cached train ids, or with ``train.subset_per_caption`` N a seeded draw of N per caption:
    a few dozen images trained far past convergence, which the demo-memorize run uses to make a
    model that really memorises, so the memorization audit can be shown to catch it."""
    n = cfg.train.subset_per_caption
    if not n:
        return cached
    import numpy as np

    from medisyn.records import read_corpus

    rows = read_corpus(cfg.run_path / "corpus", columns=["id", "caption"], split="train", ids=cached).to_pylist()
    by_caption: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r["id"]):
        by_caption.setdefault(r["caption"], []).append(r["id"])
    rng = np.random.default_rng(cfg.seed)
    chosen = sorted(i for ids in by_caption.values() for i in rng.permutation(ids)[:n].tolist())
    log.info("train: train.subset_per_caption=%d: %d of %d train images", n, len(chosen), len(cached))
    return chosen


def caption_repeats(counts: dict[str, int], balance: float) -> dict[str, int]:
    """How many copies per pass of each caption's images: round((n_max / n) ** balance), at least 1.

    Rare captions (the demo's OCT classes: 4-5 train images against chest CT's 36-43) are
    otherwise seen too seldom to learn and are drawn as the common look they share words with."""
    if balance <= 0 or not counts:
        return dict.fromkeys(counts, 1)
    most = max(counts.values())
    return {c: max(1, round((most / n) ** balance)) for c, n in counts.items()}


def repeat_rows(batch, factors: dict[str, int], column: str = "caption"):
    """Ray Data: each row ``factors[caption]`` times (pyarrow batch; captions not listed: once)."""
    import numpy as np

    times = [factors.get(c, 1) for c in batch.column(column).to_pylist()]
    return batch.take(np.repeat(np.arange(batch.num_rows), times))


def caption_counts(cfg: RunConfig, ids: list[str]) -> dict[str, int]:
    """Train images per caption among ``ids``: the driver reads the split's id and caption columns
    (no images; ~100 MB at a million rows, as ``training_ids`` already does) and groups them in pyarrow."""
    from medisyn.records import read_corpus

    table = read_corpus(cfg.run_path / "corpus", columns=["id", "caption"], split="train", ids=ids)
    grouped = table.group_by("caption").aggregate([("id", "count")])
    return dict(zip(grouped.column("caption").to_pylist(), grouped.column("id_count").to_pylist(), strict=True))


def training_data(cfg: RunConfig, cache, train_ids: list[str]):
    """The dataset the workers read each epoch, and its rows per epoch.

    Shuffled globally each epoch without an all-to-all (a new file order per execution, then
    each worker's local buffer); ``train.caption_balance`` repeats rare captions' rows in flight;
    ``train.repeats`` unions materialized copies."""
    import ray

    from medisyn.raytools import keep_ids

    t = cfg.train
    shuffle = ray.data.FileShuffleConfig(seed=cfg.seed, reseed_after_execution=True)
    data = ray.data.read_parquet(uri(cache / "latents"), shuffle=shuffle)
    # only images of the current corpus's train split (the cache may hold ids a re-ingest dropped):
    # a broadcast semi-join, not a literal list of a million ids
    data = keep_ids(data, train_ids)
    rows = len(train_ids)
    if t.caption_balance > 0:
        counts = caption_counts(cfg, train_ids)
        factors = caption_repeats(counts, t.caption_balance)
        rows = sum(n * factors[c] for c, n in counts.items())
        log.info("train: caption_balance %.2f: %d rows per pass (was %d)", t.caption_balance, rows, len(train_ids))
        more = {c: f for c, f in factors.items() if f > 1}  # only these travel with each task
        data = data.map_batches(repeat_rows, fn_kwargs={"factors": more}, batch_format="pyarrow")
    if t.repeats > 1:
        # kohya's repeats are for small corpora: the filtered latents are held once in the object
        # store and repeated as one dataset, so an epoch is one execution, not one per pass (a
        # pass over a few dozen images would cost more to start than to train); the workers'
        # epoch-seeded local buffers mix the copies
        data = data.materialize()
        data = data.union(*([data] * (t.repeats - 1)))
    return data, rows * t.repeats


def quiet_progress(data):
    """The dataset the Train workers read each epoch without Ray Data's own progress bars: one
    execution per epoch redrew a bar per operator (most of `make demo`'s 2,167 lines); the loop's
    epoch bar and Ray Data's one "execution finished" line per epoch remain."""
    data.context.enable_progress_bars = False  # the dataset's own DataContext, which its split coordinator runs
    return data


def run(cfg: RunConfig):
    import ray.train
    from ray.train.torch import TorchTrainer

    from medisyn.raytools import ensure_ray
    from medisyn.train.loop import TrainJob, batches_per_worker, train_loop_per_worker
    from medisyn.train.vae import check_fitted_vae

    check_fitted_vae(cfg)
    cache = cache_dir(cfg)
    info_file = cache / "cache.json"
    if not info_file.exists():
        raise FileNotFoundError(
            f"train: no cache at {cache}; run `medisyn cache` with the same model and train.resolution"
        )
    info = json.loads(info_file.read_text())
    t = cfg.train
    log.info(
        "train: %d workers x %d per worker x %d accumulation = effective batch %d; %d epochs",
        t.num_workers,
        t.per_worker_batch,
        t.accumulation,
        t.effective_batch,
        t.epochs,
    )
    plan = memory_plan(cfg.model.preset, t)
    if t.use_gpu and plan is not None:  # the config check refused a plan over train.gpu_memory_gb
        print(plan.text())
    run_root = cfg.run_path
    train_ids = training_ids(cfg, read_train_ids(cache))
    inputs = {  # what the checkpoints depend on; epochs is not among them: a longer run continues
        "cache": cache.name,
        "train_ids": hashlib.sha256("\n".join(sorted(train_ids)).encode()).hexdigest()[:16],
        "seed": cfg.seed,
        "model": [cfg.model.preset, cfg.model.base, cfg.model.seed, cfg.model.prediction_type],
        "train": {k: v for k, v in to_dict(t).items() if k not in HARDWARE_ONLY},
    }
    stale = run_inputs_differ(run_root / "checkpoints", inputs)
    if stale:
        raise ConfigError(
            f"train: {run_root / 'checkpoints'} holds a run of other inputs or settings (differs: {', '.join(stale)}); "
            "Ray Train would resume it. Use another run_dir, or delete that folder to train from scratch"
        )
    last = f"epoch-{t.epochs - 1:03d}"
    if finished(run_root / "checkpoints", last):  # a resubmitted pipeline: nothing to start Ray Train for
        _prune(cfg)
        print(f"train: already done, {len(checkpoints(cfg))} epoch checkpoints in {run_root / 'checkpoints'}")
        return None
    ensure_ray()
    (run_root / "train_log").mkdir(parents=True, exist_ok=True)
    data, rows = training_data(cfg, cache, train_ids)
    data = quiet_progress(data)
    job = TrainJob(
        text_cache=uri(cache / "text.parquet"),
        scaling_factor=float(info["scaling_factor"]),
        log_dir=uri(run_root / "train_log"),
        batches_per_epoch=batches_per_worker(rows, t.num_workers, t.per_worker_batch),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg, "job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker={"CPU": t.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name="checkpoints",
            storage_path=uri(run_root),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
        ),
        datasets={"train": data},
    )
    result = trainer.fit()
    _prune(cfg)
    print(
        f"train: {len(checkpoints(cfg))} epoch checkpoints in {run_root / 'checkpoints'}; last metrics {result.metrics}"
    )
    return result
