"""The ``select`` stage: the epoch checkpoint with the lowest FID, exported as a full SDXL pipeline.

For N real train images (the paper: 10,000) and their captions, each checkpoint generates N
images from those captions with infer's sampler (the same function generate uses), each
conditioned on its image type's median original size (as training conditioned on each image's
own); FID (torchmetrics, :mod:`medisyn.select.fid`) is computed between the two sets, overall
and per specialty.

The real side is the same for every checkpoint, so it is extracted once: one Ray task reads the
real images from the corpus itself and writes their running feature sums to
``select/real-<digest>.npz`` in the run directory (reused by later runs with the same sample and
extractor). Then one Ray task per checkpoint (a GPU each where there are GPUs, all the CPUs it
was given otherwise) loads those sums, generates and extracts only the synthetic side. The best
checkpoint is exported by one more Ray task (a GPU node's where there are GPUs). Only paths and
numbers pass through the driver.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
from upath import UPath

from medisyn import storage
from medisyn.config import RunConfig
from medisyn.configtools import to_dict
from medisyn.records import (
    atomic_write_bytes,
    atomic_write_text,
    conditioning_size,
    finished_with,
    median_original_sizes,
    read_images,
    sample_corpus,
)
from medisyn.select import fid
from medisyn.train.trainer import checkpoints

log = logging.getLogger(__name__)

REAL_COLUMNS = ["id", "caption", "specialty", "image_type"]


EXPORT_RECORD = "medisyn.json"  # written last into an exported model folder


def unet_dir(checkpoint: UPath, weights: str) -> UPath:
    """The checkpoint's trained U-Net (``raw``) or its exponential moving average (``ema``)."""
    path = checkpoint / ("unet_ema" if weights == "ema" else "unet")
    if not path.is_dir():
        raise FileNotFoundError(
            f"select.weights={weights}: {checkpoint.name} has no {path.name}/ (was train.ema_decay 0?)"
        )
    return path


def _use_task_cpus() -> None:
    """torch gets the CPUs Ray gave this task: without this it starts a thread per core of the
    node (oversubscribed when tasks share it); with it a 16-CPU task uses all 16."""
    import ray
    import torch

    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:
        cpus = 1
    torch.set_num_threads(max(1, int(cpus)))


def keys_of(rows) -> list[str]:
    """The FID keys of a sample: "all" and each specialty present."""
    return ["all", *sorted({r["specialty"] for r in rows})]


def real_statistics(rows, images: dict[str, bytes], *, kind: str, weights: str, resolution: int, batch_size: int):
    """Feature sums of the real images (resized as the synthetic ones are made), per FID key."""
    from PIL import Image

    from medisyn.infer.sampling import sampling_device

    device = sampling_device()[0]
    extract, metrics = fid.extraction(kind, weights, keys_of(rows), device)
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        pixels = [
            np.asarray(
                Image.open(io.BytesIO(images[r["id"]]))
                .convert("RGB")
                .resize((resolution, resolution), Image.Resampling.LANCZOS)
            )
            for r in batch
        ]
        fid.update(metrics, extract, [r["specialty"] for r in batch], pixels, real=True)
    return fid.real_state(metrics)


def pipeline_fid(
    pipe,
    rows,
    real: dict[str, np.ndarray],
    *,
    kind: str,
    weights: str,
    resolution: int,
    steps: int,
    guidance_scale: float,
    batch_size: int,
    seed: int,
    sizes: dict[str, list[int]],
) -> dict[str, float]:
    """FID per key of ``pipe``'s images for the rows' captions against the cached real statistics.

    Row i's image has seed ``seed * 1_000_003 + i`` and its image type's size, whatever batch it
    falls in; rows are batched by conditioning size (``sampling.batches_by_size``), so a batch is
    one pipeline call instead of one per image type in it."""
    from medisyn.infer.sampling import batches_by_size, generate_images

    device = pipe.device.type
    extract, metrics = fid.extraction(kind, weights, keys_of(rows), device)
    fid.load_real_state(metrics, real)
    size_of = [conditioning_size(sizes, r["image_type"], resolution) for r in rows]
    for idx in batches_by_size(size_of, batch_size):
        fake = generate_images(
            pipe,
            [rows[i]["caption"] for i in idx],
            [seed * 1_000_003 + i for i in idx],
            resolution=resolution,
            steps=steps,
            guidance_scale=guidance_scale,
            original_sizes=[size_of[i] for i in idx],
        )
        fid.update(metrics, extract, [rows[i]["specialty"] for i in idx], fake, real=False)
    return fid.compute(metrics)


def _resolution(cfg: RunConfig) -> int:
    return cfg.select.resolution or cfg.train.resolution


def features_file(cfg: RunConfig, rows) -> UPath:
    """Where this sample's real statistics are cached: named by what determines them."""
    s = cfg.select
    # the extractor's label, not only its name: a redefined extractor (the offline one's layer) gets new files
    extractor = fid.extractor_label(s.feature_extractor)
    key = json.dumps([[r["id"] for r in rows], extractor, s.inception_weights, _resolution(cfg)])
    return cfg.run_path / "select" / f"real-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def extract_real(cfg: RunConfig, rows: tuple[dict, ...], out: str) -> str:
    """Ray task: read this sample's images from the corpus, write their feature sums to ``out``."""
    _use_task_cpus()
    s = cfg.select
    images = read_images(cfg.run_path / "corpus", {r["id"] for r in rows})
    state = real_statistics(
        rows,
        images,
        kind=s.feature_extractor,
        weights=s.inception_weights,
        resolution=_resolution(cfg),
        batch_size=s.batch_size,
    )
    buf = io.BytesIO()
    np.savez(buf, **state)
    atomic_write_bytes(buf.getvalue(), out)
    return out


def score_checkpoint(cfg: RunConfig, checkpoint: str, rows, real_file: str, sizes: dict) -> dict:
    """Ray task: this checkpoint's images for the real captions; FID overall and per specialty."""
    from diffusers import UNet2DConditionModel

    from medisyn.infer.sampling import sampling_device
    from medisyn.models import load_pipeline

    _use_task_cpus()
    s = cfg.select
    device, dtype = sampling_device()
    pipe = load_pipeline(cfg.model)
    with storage.local_dir(unet_dir(storage.path(checkpoint), s.weights)) as d:
        pipe.unet = UNet2DConditionModel.from_pretrained(d)
    pipe = pipe.to(device, dtype)
    with np.load(io.BytesIO(storage.path(real_file).read_bytes())) as z:
        real = {k: z[k] for k in z.files}
    out = pipeline_fid(
        pipe,
        rows,
        real,
        kind=s.feature_extractor,
        weights=s.inception_weights,
        resolution=_resolution(cfg),
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        batch_size=s.batch_size,
        seed=cfg.seed,
        sizes=sizes,
    )
    return {
        "checkpoint": storage.path(checkpoint).name,
        "fid": out["all"],
        "fid_by_specialty": {k: v for k, v in out.items() if k != "all"},
    }


def export_pipeline(cfg: RunConfig, checkpoint: str, out: str, sizes: dict[str, list[int]]) -> str:
    """Base text encoders, tokenizers, VAE and scheduler + the fine-tuned U-Net, diffusers layout.

    Saved on this node, then put in place with ``medisyn.json`` last: a folder holding it is whole.
    Runs as a Ray task (:func:`export`): the pipeline loads in fp32 (≈ 19 GB of RAM at SDXL size)."""
    import torch
    from diffusers import UNet2DConditionModel

    from medisyn.models import load_pipeline, save_pipeline

    checkpoint, out = storage.path(checkpoint), storage.path(out)
    pipe = load_pipeline(cfg.model)
    # bf16 as the checkpoint stores it (~5 GB at SDXL size); from_pretrained loads it in any dtype
    with storage.local_dir(unet_dir(checkpoint, cfg.select.weights)) as d:
        pipe.unet = UNet2DConditionModel.from_pretrained(d, torch_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        save_pipeline(pipe, Path(tmp))
        (Path(tmp) / EXPORT_RECORD).write_text(
            json.dumps(
                {
                    "checkpoint": checkpoint.name,
                    "weights": cfg.select.weights,
                    "unconditional": "encoding of the empty caption",
                    # SDXL original_size to condition each image type on (train split medians)
                    "original_sizes": sizes,
                }
            )
        )
        storage.upload_dir(tmp, out, last=EXPORT_RECORD)
    return storage.uri(out)


def export(cfg: RunConfig, checkpoint: UPath, sizes: dict[str, list[int]]) -> UPath:
    """Export ``checkpoint`` to ``<run_dir>/model`` in one Ray task (a GPU node's where the cluster has
    GPUs), never in the driver; only the folder's path comes back."""
    import ray

    from medisyn.raytools import ensure_ray, gpus_available

    ensure_ray()
    task = ray.remote(num_gpus=1 if gpus_available(cfg.train.use_gpu) else 0, num_cpus=1)(export_pipeline)
    out = storage.uri(cfg.run_path / "model")
    return storage.path(ray.get(task.remote(cfg, storage.uri(checkpoint), out, sizes)))


def run(cfg: RunConfig) -> dict:
    import ray

    from medisyn.raytools import ensure_ray, gpus_available

    ckpts = checkpoints(cfg)
    if not ckpts:
        raise FileNotFoundError(
            f"select: no epoch checkpoints in {cfg.run_path / 'checkpoints'}; run `medisyn train` first"
        )
    for c in ckpts:  # a missing EMA copy is a message before any work, not a failed task
        unet_dir(c, cfg.select.weights)
    corpus = cfg.run_path / "corpus"
    sizes = median_original_sizes(corpus)
    fingerprint = {
        "checkpoints": [c.name for c in ckpts],
        "select": to_dict(cfg.select),
        "seed": cfg.seed,
        "resolution": cfg.train.resolution,
        "model": to_dict(cfg.model),
        "original_sizes": sizes,
    }
    done_file = cfg.run_path / "selection.json"
    done = finished_with(done_file, fingerprint, key="fingerprint")
    if done is not None and (cfg.run_path / "model" / EXPORT_RECORD).exists():
        print(f"select: {done['best']} already selected for these checkpoints and settings ({done_file})")
        return done
    if cfg.select.criterion == "last":
        return _export_last(cfg, ckpts, sizes, fingerprint, done_file)
    rows = tuple(sample_corpus(corpus, cfg.select.num_images, cfg.seed, columns=REAL_COLUMNS))
    label = fid.extractor_label(cfg.select.feature_extractor)
    log.info("select: %d checkpoints x %d images; FID %s", len(ckpts), len(rows), label)
    ensure_ray()
    gpus = 1 if gpus_available(cfg.train.use_gpu) else 0
    real_file = features_file(cfg, rows)
    real_file.parent.mkdir(parents=True, exist_ok=True)
    cfg_ref, rows_ref = ray.put(cfg), ray.put(rows)
    if not real_file.exists():  # the real side, once for every checkpoint (and every later re-run)
        ray.get(ray.remote(num_gpus=gpus, num_cpus=1)(extract_real).remote(cfg_ref, rows_ref, storage.uri(real_file)))
    task = ray.remote(num_gpus=gpus, num_cpus=1)(score_checkpoint)
    scores = ray.get([task.remote(cfg_ref, storage.uri(c), rows_ref, storage.uri(real_file), sizes) for c in ckpts])
    best = min(scores, key=lambda s: (np.nan_to_num(s["fid"], nan=np.inf), s["checkpoint"]))
    model_dir = export(cfg, cfg.run_path / "checkpoints" / best["checkpoint"], sizes)
    selection = {
        "criterion": "fid",
        "feature_extractor": label,
        "num_images": len(rows),
        "steps": cfg.select.steps,
        "guidance_scale": cfg.select.guidance_scale,
        "original_sizes": sizes,
        "real_features": real_file.name,
        "checkpoints": scores,
        "best": best["checkpoint"],
        "exported": str(model_dir),
        "fingerprint": fingerprint,
    }
    atomic_write_text(json.dumps(selection, indent=2), done_file)
    for s in scores:
        print(
            f"select: {s['checkpoint']}: FID {s['fid']:.4g} [{cfg.select.feature_extractor}]"
            + ("  <- best" if s is best else "")
        )
    print(
        f"select: exported {best['checkpoint']} to {model_dir} (loads with StableDiffusionXLPipeline.from_pretrained)"
    )
    return selection


def _export_last(cfg: RunConfig, ckpts: list, sizes: dict, fingerprint: dict, done_file: UPath) -> dict:
    """``select.criterion: last``: export the last epoch without generating or scoring anything."""
    last = ckpts[-1]
    model_dir = export(cfg, last, sizes)
    selection = {
        "criterion": "last",
        "feature_extractor": "none (select.criterion=last: the last epoch is exported, no FID is computed)",
        "num_images": 0,
        "steps": 0,
        "guidance_scale": cfg.select.guidance_scale,
        "original_sizes": sizes,
        "real_features": None,
        "checkpoints": [{"checkpoint": c.name, "fid": float("nan"), "fid_by_specialty": {}} for c in ckpts],
        "best": last.name,
        "exported": str(model_dir),
        "fingerprint": fingerprint,
    }
    atomic_write_text(json.dumps(selection, indent=2), done_file)
    print(f"select: select.criterion=last: exported {last.name} to {model_dir} (no FID computed)")
    return selection
