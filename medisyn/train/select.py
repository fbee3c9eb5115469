"""The ``select`` stage: the epoch checkpoint with the lowest FID, exported as a full SDXL pipeline.

For N real train images (the paper: 10,000) and their captions, each checkpoint generates N
images from those captions; FID (torchmetrics, InceptionV3 pool features) is computed
between the two sets, overall and per specialty. One Ray task per checkpoint (a GPU each
where there are GPUs) does the generation and the metric, so only numbers come back.

Offline runs use ``select.feature_extractor=offline``: the same torchmetrics code path with an
InceptionV3 of fixed random weights instead of the published FID weights. Its numbers rank
checkpoints of one run but are not comparable with published FIDs, and every output says so.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medisyn.config import RunConfig

log = logging.getLogger(__name__)
OFFLINE_LABEL = "offline: InceptionV3 with fixed random weights, 149px, unit-length features (not comparable with published FID)"
STANDARD_LABEL = "standard: torchmetrics FID, InceptionV3 pool3 (2048) features"


def sample_real(cfg: RunConfig, n: int) -> list[dict]:
    """``n`` train images (id, caption, specialty), drawn by a seeded RNG, read shard by shard."""
    corpus = sorted((cfg.run_path / "corpus").glob("*.parquet"))
    meta = pa.concat_tables(pq.read_table(f, columns=["id", "caption", "specialty", "split"]) for f in corpus)
    train = [r for r in meta.to_pylist() if r["split"] == "train"]
    rng = np.random.default_rng(cfg.seed)
    picked = [train[i] for i in sorted(rng.choice(len(train), size=min(n, len(train)), replace=False))]
    return picked


def offline_inception():
    """torchvision's InceptionV3 with seeded random weights, pool features: needs no download."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    net.fc = torch.nn.Identity()
    net.eval()

    class Features(torch.nn.Module):
        num_features = 2048

        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):  # uint8 NCHW, as torchmetrics passes it
            x = torch.nn.functional.interpolate(x.float() / 255.0, size=(149, 149), mode="bilinear", antialias=True)
            # random weights make activations grow with depth: unit-length features keep FID finite
            return torch.nn.functional.normalize(self.net((x - 0.5) / 0.5).double(), dim=1).float()

    return Features()


def _fid_metric(kind: str, weights: str):
    from torchmetrics.image.fid import FrechetInceptionDistance

    if kind == "offline":
        return FrechetInceptionDistance(feature=offline_inception(), reset_real_features=False)
    return FrechetInceptionDistance(feature=2048, reset_real_features=False,
                                    feature_extractor_weights_path=weights or None)


def _to_uint8_nchw(images: list[np.ndarray]):
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def score_checkpoint(cfg_dict: dict, checkpoint: str, real: list[dict], images: dict[str, bytes]) -> dict:
    """Generate from the real captions with this checkpoint's U-Net; FID overall and per specialty."""
    import torch
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from medisyn.config import RunConfig
    from medisyn.configtools import build
    from medisyn.models import load_pipeline

    cfg = build(RunConfig, cfg_dict)
    torch.set_num_threads(max(1, int(ray_cpus())))
    s = cfg.select
    res = s.resolution or cfg.train.resolution
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(cfg.model)
    pipe.unet = UNet2DConditionModel.from_pretrained(Path(checkpoint) / "unet")
    pipe = pipe.to(device, torch.bfloat16 if device == "cuda" else torch.float32)
    specialties = sorted({r["specialty"] for r in real})
    metrics = {k: _fid_metric(s.feature_extractor, s.inception_weights) for k in ["all", *specialties]}
    for start in range(0, len(real), s.batch_size):
        rows = real[start:start + s.batch_size]
        gens = [torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + start + i) for i in range(len(rows))]
        fake = pipe([r["caption"] for r in rows], negative_prompt=[""] * len(rows), height=res, width=res,
                    num_inference_steps=s.steps, guidance_scale=s.guidance_scale, generator=gens,
                    output_type="np").images
        fake = [(np.clip(f, 0, 1) * 255).round().astype(np.uint8) for f in fake]
        reals = [np.asarray(Image.open(io.BytesIO(images[r["id"]])).convert("RGB").resize((res, res), Image.Resampling.LANCZOS))
                 for r in rows]
        for key in ["all", *specialties]:
            keep = [i for i, r in enumerate(rows) if key in ("all", r["specialty"])]
            if keep:
                metrics[key].update(_to_uint8_nchw([reals[i] for i in keep]), real=True)
                metrics[key].update(_to_uint8_nchw([fake[i] for i in keep]), real=False)
    out = {}
    for key, m in metrics.items():
        try:
            out[key] = float(m.compute())
        except (RuntimeError, ValueError):  # fewer than 2 samples of a specialty
            out[key] = float("nan")
    return {"checkpoint": Path(checkpoint).name, "fid": out["all"], "fid_by_specialty": {k: out[k] for k in specialties}}


def ray_cpus() -> float:
    """CPUs Ray gave this task (torch would otherwise start a thread per core of the node)."""
    import ray

    try:
        return ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    except Exception:
        return 1


def _real_images(cfg: RunConfig, ids: set[str]) -> dict[str, bytes]:
    found = {}
    for f in sorted((cfg.run_path / "corpus").glob("*.parquet")):
        t = pq.read_table(f, columns=["id"])
        rows = [i for i, x in enumerate(t.column("id").to_pylist()) if x in ids]
        if rows:
            sub = pq.read_table(f, columns=["id", "image"]).take(rows)
            found.update(zip(sub.column("id").to_pylist(), sub.column("image").to_pylist()))
    return found


def export_pipeline(cfg: RunConfig, checkpoint: Path, out: Path) -> Path:
    """Base text encoders, tokenizers, VAE and scheduler + the fine-tuned U-Net, diffusers layout."""
    from diffusers import UNet2DConditionModel

    from medisyn.ingest.worker import atomic_write_text
    from medisyn.models import load_pipeline, save_pipeline

    pipe = load_pipeline(cfg.model)
    pipe.unet = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    tmp = out.with_name(out.name + ".partial")
    save_pipeline(pipe, tmp)
    atomic_write_text(json.dumps({"checkpoint": checkpoint.name, "unconditional": "encoding of the empty caption"}),
                      tmp / "medisyn.json")
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def run(cfg: RunConfig) -> dict:
    import ray

    from medisyn.configtools import to_dict
    from medisyn.raytools import ensure_ray
    from medisyn.train.trainer import checkpoints

    ckpts = checkpoints(cfg)
    if not ckpts:
        raise FileNotFoundError(f"select: no epoch checkpoints in {cfg.run_path / 'checkpoints'}; run `medisyn train` first")
    fingerprint = {"checkpoints": [c.name for c in ckpts], "select": to_dict(cfg.select), "seed": cfg.seed,
                   "resolution": cfg.train.resolution, "model": to_dict(cfg.model)}
    done_file = cfg.run_path / "selection.json"
    if done_file.exists() and (cfg.run_path / "model" / "model_index.json").exists():
        done = json.loads(done_file.read_text())
        if done.get("fingerprint") == fingerprint:
            print(f"select: {done['best']} already selected for these checkpoints and settings ({done_file})")
            return done
    real = sample_real(cfg, cfg.select.num_images)
    images = _real_images(cfg, {r["id"] for r in real})
    label = OFFLINE_LABEL if cfg.select.feature_extractor == "offline" else STANDARD_LABEL
    log.info("select: %d checkpoints x %d images; FID %s", len(ckpts), len(real), label)
    ensure_ray()
    use_gpu = cfg.train.use_gpu and ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(num_gpus=1 if use_gpu else 0, num_cpus=1)(score_checkpoint)
    cfg_dict = {k: v for k, v in to_dict(cfg).items() if k != "config_path"}
    real_ref, images_ref = ray.put(real), ray.put(images)
    scores = ray.get([task.remote(cfg_dict, str(c), real_ref, images_ref) for c in ckpts])
    best = min(scores, key=lambda s: (np.nan_to_num(s["fid"], nan=np.inf), s["checkpoint"]))
    model_dir = export_pipeline(cfg, cfg.run_path / "checkpoints" / best["checkpoint"], cfg.run_path / "model")
    selection = {"feature_extractor": label, "num_images": len(real), "steps": cfg.select.steps,
                 "guidance_scale": cfg.select.guidance_scale, "checkpoints": scores, "best": best["checkpoint"],
                 "exported": str(model_dir), "fingerprint": fingerprint}
    done_file.write_text(json.dumps(selection, indent=2))
    for s in scores:
        print(f"select: {s['checkpoint']}: FID {s['fid']:.4g} [{cfg.select.feature_extractor}]"
              + ("  <- best" if s is best else ""))
    print(f"select: exported {best['checkpoint']} to {model_dir} (loads with StableDiffusionXLPipeline.from_pretrained)")
    return selection
