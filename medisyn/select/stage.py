"""The ``select`` stage: the epoch checkpoint with the lowest FID, exported as a full SDXL pipeline.

For N real train images (the paper: 10,000) and their captions, each checkpoint generates N
images from those captions with infer's sampler (the same function generate uses); FID
(torchmetrics, :mod:`medisyn.select.fid`) is computed between the two sets, overall and per
specialty. One Ray task per checkpoint (a GPU each where there are GPUs) does the generation
and the metric, so only numbers come back.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from medisyn.config import RunConfig
from medisyn.configtools import to_dict
from medisyn.records import atomic_write_text, read_images, sample_corpus
from medisyn.select.fid import extractor_label, fid_metric, to_uint8_nchw
from medisyn.train.trainer import checkpoints

log = logging.getLogger(__name__)


def unet_dir(checkpoint: Path, weights: str) -> Path:
    """The checkpoint's trained U-Net (``raw``) or its exponential moving average (``ema``)."""
    path = checkpoint / ("unet_ema" if weights == "ema" else "unet")
    if not path.is_dir():
        raise FileNotFoundError(
            f"select.weights={weights}: {checkpoint.name} has no {path.name}/ (was train.ema_decay 0?)"
        )
    return path


def _task_cpus() -> float:
    """CPUs Ray gave this task (torch would otherwise start a thread per core of the node)."""
    import ray

    try:
        return ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:
        return 1


def score_checkpoint(cfg: RunConfig, checkpoint: str, real: tuple[dict, ...], images: dict[str, bytes]) -> dict:
    """Generate from the real captions with this checkpoint's U-Net; FID overall and per specialty."""
    import torch
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from medisyn.infer.sampling import generate_images, sampling_device
    from medisyn.models import load_pipeline

    torch.set_num_threads(max(1, int(_task_cpus())))
    s = cfg.select
    res = s.resolution or cfg.train.resolution
    device, dtype = sampling_device()
    pipe = load_pipeline(cfg.model)
    pipe.unet = UNet2DConditionModel.from_pretrained(unet_dir(Path(checkpoint), s.weights))
    pipe = pipe.to(device, dtype)
    specialties = sorted({r["specialty"] for r in real})
    metrics = {k: fid_metric(s.feature_extractor, s.inception_weights) for k in ["all", *specialties]}
    for start in range(0, len(real), s.batch_size):
        rows = real[start : start + s.batch_size]
        seeds = [cfg.seed * 1_000_003 + start + i for i in range(len(rows))]
        fake = generate_images(
            pipe, [r["caption"] for r in rows], seeds, resolution=res, steps=s.steps, guidance_scale=s.guidance_scale
        )
        reals = [
            np.asarray(
                Image.open(io.BytesIO(images[r["id"]])).convert("RGB").resize((res, res), Image.Resampling.LANCZOS)
            )
            for r in rows
        ]
        for key in ["all", *specialties]:
            keep = [i for i, r in enumerate(rows) if key in ("all", r["specialty"])]
            if keep:
                metrics[key].update(to_uint8_nchw([reals[i] for i in keep]), real=True)
                metrics[key].update(to_uint8_nchw([fake[i] for i in keep]), real=False)
    out = {}
    for key, m in metrics.items():
        try:
            out[key] = float(m.compute())
        except (RuntimeError, ValueError):  # fewer than 2 samples of a specialty
            out[key] = float("nan")
    return {
        "checkpoint": Path(checkpoint).name,
        "fid": out["all"],
        "fid_by_specialty": {k: out[k] for k in specialties},
    }


def export_pipeline(cfg: RunConfig, checkpoint: Path, out: Path) -> Path:
    """Base text encoders, tokenizers, VAE and scheduler + the fine-tuned U-Net, diffusers layout."""
    import torch
    from diffusers import UNet2DConditionModel

    from medisyn.models import load_pipeline, save_pipeline

    pipe = load_pipeline(cfg.model)
    # bf16 as the checkpoint stores it (~5 GB at SDXL size); from_pretrained loads it in any dtype
    pipe.unet = UNet2DConditionModel.from_pretrained(
        unet_dir(checkpoint, cfg.select.weights), torch_dtype=torch.bfloat16
    )
    tmp = out.with_name(out.name + ".partial")
    save_pipeline(pipe, tmp)
    atomic_write_text(
        json.dumps(
            {
                "checkpoint": checkpoint.name,
                "weights": cfg.select.weights,
                "unconditional": "encoding of the empty caption",
            }
        ),
        tmp / "medisyn.json",
    )
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


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
    fingerprint = {
        "checkpoints": [c.name for c in ckpts],
        "select": to_dict(cfg.select),
        "seed": cfg.seed,
        "resolution": cfg.train.resolution,
        "model": to_dict(cfg.model),
    }
    done_file = cfg.run_path / "selection.json"
    if done_file.exists() and (cfg.run_path / "model" / "model_index.json").exists():
        done = json.loads(done_file.read_text())
        if done.get("fingerprint") == fingerprint:
            print(f"select: {done['best']} already selected for these checkpoints and settings ({done_file})")
            return done
    corpus = cfg.run_path / "corpus"
    real = tuple(sample_corpus(corpus, cfg.select.num_images, cfg.seed, columns=["id", "caption", "specialty"]))
    images = read_images(corpus, {r["id"] for r in real})
    label = extractor_label(cfg.select.feature_extractor)
    log.info("select: %d checkpoints x %d images; FID %s", len(ckpts), len(real), label)
    ensure_ray()
    task = ray.remote(num_gpus=1 if gpus_available(cfg.train.use_gpu) else 0, num_cpus=1)(score_checkpoint)
    cfg_ref, real_ref, images_ref = ray.put(cfg), ray.put(real), ray.put(images)
    scores = ray.get([task.remote(cfg_ref, str(c), real_ref, images_ref) for c in ckpts])
    best = min(scores, key=lambda s: (np.nan_to_num(s["fid"], nan=np.inf), s["checkpoint"]))
    model_dir = export_pipeline(cfg, cfg.run_path / "checkpoints" / best["checkpoint"], cfg.run_path / "model")
    selection = {
        "feature_extractor": label,
        "num_images": len(real),
        "steps": cfg.select.steps,
        "guidance_scale": cfg.select.guidance_scale,
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
