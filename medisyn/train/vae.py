"""The ``vae`` stage: fit the build preset's ``AutoencoderKL`` to the corpus, for runs that bring no VAE.

Real runs keep SDXL's pretrained (fp16-fix) VAE and skip this stage (``vae_fit.enabled: false``).
The ``tiny`` preset's VAE is random, so without this a demo model can only learn to make noise.
With ``vae_fit.enabled`` the stage trains the preset's VAE on the images the U-Net will train on
(the train split, or ``train.subset_per_caption``'s few per caption: demo-memorize's model
memorises them VAE included, or its reconstructions alone stay too far from them for the audit's
patch distance to see a copy) at the training resolution (or random ``vae_fit.crop_size``² crops
of it: a step's cost falls with the pixels), ``vae_fit.repeats`` passes per epoch
(Ray Train; ``TorchTrainer`` workers, AdamW on ``vae_fit.lr_scheduler``, a checkpoint per
epoch under ``<run_dir>/vae_fit/``, so a killed worker or a re-submitted job resumes), keeps the
epoch with the lowest val MSE (a constant rate can end the fit on a spike) and writes it in the
diffusers layout to ``model.vae``, which every later stage then loads (cache, train, select's
export, generate through the export).

Loss: MSE of the reconstruction of a posterior sample + ``kl_weight`` × KL (SD's recipe without
the perceptual and adversarial terms, which need pretrained networks). The latent scaling factor
is set from the data (1 / std of the train latents) and stored in the VAE's config, as SD's
0.18215 and SDXL's 0.13025 were. ``fit.json`` records the val split's reconstruction error next
to a trivial baseline (each image replaced by its mean colour); cache and train refuse a VAE
that does not beat it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medisyn import storage
from medisyn.config import RunConfig
from medisyn.configtools import to_dict
from medisyn.images import decode_batch
from medisyn.models import reconstruct, to_model_input, to_uint8
from medisyn.records import finished_with, read_corpus, run_inputs_differ, shard_files

log = logging.getLogger(__name__)

FIT_RECORD = "fit.json"


def random_crops(x, size: int, generator):
    """A ``size``² crop of each image of an NCHW batch at its own random place (``vae_fit.crop_size``),
    channels-last as :func:`to_model_input` leaves the whole images; ``x`` itself when it is no larger."""
    import torch

    n, _, h, w = x.shape
    if size <= 0 or (size >= h and size >= w):
        return x
    tops = torch.randint(0, h - size + 1, (n,), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (n,), generator=generator).tolist()
    places = enumerate(zip(tops, lefts, strict=True))
    crops = torch.stack([x[i, :, t : t + size, left : left + size] for i, (t, left) in places])
    return crops.contiguous(memory_format=torch.channels_last)


def vae_objective(vae, kl_weight: float):
    """The VAE with its loss as its forward, so DDP (which syncs gradients of what goes through
    ``forward``) can wrap it: (total, reconstruction MSE of a posterior sample, KL per pixel)."""
    import torch
    import torch.nn.functional as F

    class Objective(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, x, generator=None):
            posterior = self.vae.encode(x).latent_dist
            recon = self.vae.decode(posterior.sample(generator=generator)).sample
            mse = F.mse_loss(recon, x)
            kl = posterior.kl().mean() / x[0].numel()  # per pixel: kl_weight does not depend on resolution
            return mse + kl_weight * kl, mse, kl

    return Objective()


def fit_loop_per_worker(config: dict) -> None:
    """Ray Train worker: AdamW on the VAE (DDP across workers), a checkpoint per epoch."""
    import ray.train
    import ray.train.torch
    import torch
    from diffusers import AutoencoderKL

    from medisyn.models import build_pipeline
    from medisyn.train.loop import lr_schedule

    cfg: RunConfig = config["run"]
    f = cfg.vae_fit
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(f.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    vae = build_pipeline(cfg.model.preset, cfg.model.seed).vae
    start_epoch, step, state = 0, 0, None
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            vae = AutoencoderKL.from_pretrained(Path(d) / "vae")
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
            start_epoch, step = state["epoch"] + 1, state.get("step", 0)
            rng = Path(d) / f"rng-rank-{rank}.pt"
            if rng.exists():
                generator.set_state(torch.load(rng, map_location="cpu", weights_only=False))
    vae.to(memory_format=torch.channels_last).train()  # see to_model_input; saved weights load contiguous
    model = ray.train.torch.prepare_model(vae_objective(vae, f.kl_weight))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=f.learning_rate, weight_decay=0.0)
    schedule = lr_schedule(optimizer, f.lr_scheduler, f.lr_warmup_steps, f.epochs * config["steps_per_epoch"], state)
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, f.epochs):
        started, losses, mses = time.perf_counter(), [], []
        batches = shard.iter_batches(
            batch_size=f.batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=256,
            local_shuffle_seed=cfg.seed * 100 + epoch * 10 + rank,
        )
        for batch in tqdm(batches, desc=f"vae epoch {epoch}", disable=rank != 0, mininterval=10):
            x = random_crops(to_model_input(batch["pixels"], "cpu"), f.crop_size, generator)
            x = x.to(ray.train.torch.get_device())
            loss, mse, _ = model(x, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            losses.append(loss.detach())
            mses.append(mse.detach())
        metrics = {
            "epoch": epoch,
            "step": step,
            "loss": float(torch.stack(losses).mean()) if losses else float("nan"),
            "train_mse": float(torch.stack(mses).mean()) if mses else float("nan"),
            # rank 0 scores the epoch on the val images (Ray Train keeps rank 0's metrics): the stage
            # keeps the epoch that reconstructs them best, not whichever came last
            "val_mse": _val_mse(vae, ray.get(config["val"])) if rank == 0 else float("nan"),
            "seconds": time.perf_counter() - started,
            "lr": schedule.get_last_lr()[0],
            "input_side": int(x.shape[-1]) if losses else 0,  # what the steps saw: vae_fit.crop_size or whole
        }
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                vae.save_pretrained(Path(tmp) / "vae")
                saved = {"optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict()}
                torch.save({**saved, "epoch": epoch, "step": step}, Path(tmp) / "state.pt")
            torch.save(generator.get_state(), Path(tmp) / f"rng-rank-{rank}.pt")
            ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:03d}")


def kept_epoch(by_epoch: list[tuple]) -> tuple:
    """(epoch, checkpoint) of the lowest val MSE among (epoch, val MSE, checkpoint) triples; the
    last epoch when no epoch has a score (a corpus without val images scores NaN)."""
    import math

    epoch, _, checkpoint = min(by_epoch, key=lambda e: (e[1] if math.isfinite(e[1]) else math.inf, -e[0]))
    return epoch, checkpoint


def _val_mse(vae, pixels: np.ndarray) -> float:
    """The reconstruction MSE of the val images, in eval mode (then back to training)."""
    vae.eval()
    error = reconstruction_errors(vae, pixels)[0] if len(pixels) else float("nan")
    vae.train()
    return error


def reconstruction_errors(vae, pixels: np.ndarray, batch_size: int = 32) -> tuple[float, float]:
    """(VAE MSE, mean-colour baseline MSE) over uint8 NCHW images, in the [-1, 1] range.

    The VAE's reconstruction is :func:`reconstruct`'s; the baseline replaces each image by its
    own per-channel mean, the best a model that ignores all structure can do."""
    import torch

    errors, baseline = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            x = to_model_input(pixels[start : start + batch_size], vae.device)
            recon = reconstruct(vae, x)
            errors.append(((recon - x) ** 2).mean(dim=(1, 2, 3)))
            baseline.append(((x - x.mean(dim=(2, 3), keepdim=True)) ** 2).mean(dim=(1, 2, 3)))
    return float(torch.cat(errors).mean()), float(torch.cat(baseline).mean())


def latent_scaling_factor(vae, pixels: np.ndarray, batch_size: int = 32) -> float:
    """1 / std of posterior samples of the given images: latents of unit variance for the U-Net."""
    import torch

    g = torch.Generator().manual_seed(0)
    samples = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            x = to_model_input(pixels[start : start + batch_size], vae.device)
            samples.append(vae.encode(x).latent_dist.sample(generator=g).flatten())
    return float(1.0 / torch.cat(samples).std())


def vae_fingerprint(vae_dir: str | Path) -> str:
    """A digest of a VAE directory's weights and config: the cache is keyed by it, so a refit VAE
    never reads latents of the previous one."""
    h = hashlib.sha256()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        path = storage.path(vae_dir) / name
        if path.exists():
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def check_fitted_vae(cfg: RunConfig) -> None:
    """Stop before encoding or training on a fitted VAE that is missing or no better than the baseline."""
    if not cfg.vae_fit.enabled:
        return
    record = storage.path(cfg.model.vae) / FIT_RECORD
    if not record.exists():
        raise FileNotFoundError(f"model.vae: no fitted VAE at {cfg.model.vae} ({FIT_RECORD}); run `medisyn vae` first")
    fit = json.loads(record.read_text())
    if not fit["beats_baseline"]:
        raise ValueError(
            f"model.vae: the fitted VAE's val reconstruction error {fit['val_mse']:.4f} does not beat the "
            f"mean-colour baseline {fit['baseline_mse']:.4f}; fit longer (vae_fit.epochs) before training on it"
        )


def _pixels(cfg: RunConfig, split: str, limit: int, ids: list[str] | None = None) -> np.ndarray:
    """Up to ``limit`` images of a split (of ``ids`` only, when given) as uint8 NCHW at the fit
    resolution (driver-side, small): the ids are read first, so the driver holds ``limit`` images,
    not the split's (the same images, in shard order)."""
    corpus = cfg.run_path / "corpus"
    chosen = read_corpus(corpus, columns=["id"], split=split, ids=ids).column("id").to_pylist()[:limit]
    data = read_corpus(corpus, columns=["image"], split=split, ids=chosen).column("image").to_pylist() if chosen else []
    if not data:
        return np.zeros((0, 3, cfg.train.resolution, cfg.train.resolution), dtype=np.uint8)
    return decode_batch({"image": data}, cfg.train.resolution)["pixels"]


def run(cfg: RunConfig) -> dict:
    import ray
    import ray.train
    import torch
    from diffusers import AutoencoderKL
    from ray.train.torch import TorchTrainer

    from medisyn.raytools import ensure_ray, keep_ids
    from medisyn.train.loop import batches_per_worker

    f = cfg.vae_fit
    if not f.enabled:
        print("vae: vae_fit.enabled is false; the model's own VAE is used")
        return {"fitted": False}
    from medisyn.train.trainer import quiet_progress, training_ids

    out = storage.path(cfg.model.vae)
    corpus = cfg.run_path / "corpus"
    split_ids = sorted(read_corpus(corpus, columns=["id"], split="train").column("id").to_pylist())
    train_ids = training_ids(cfg, split_ids)  # what the U-Net will train on
    subset = len(train_ids) < len(split_ids)
    fingerprint = {
        "vae_fit": to_dict(f),
        "preset": cfg.model.preset,
        "seed": cfg.seed,
        "resolution": cfg.train.resolution,
        "train_ids": hashlib.sha256("\n".join(train_ids).encode()).hexdigest()[:16],
    }
    fit = finished_with(out / FIT_RECORD, fingerprint, key="fingerprint")
    if fit is not None:
        print(f"vae: {out} already fitted for this corpus and settings (val MSE {fit['val_mse']:.4f})")
        return fit
    fit_root = cfg.run_path / "vae_fit"
    stale = run_inputs_differ(fit_root, fingerprint)
    if stale:  # a fit of another corpus or other settings: this demo artifact is refitted, not resumed
        log.info("vae: %s holds a fit of other inputs (%s); starting a new one", fit_root, ", ".join(stale))
        storage.remove_tree(fit_root)
        run_inputs_differ(fit_root, fingerprint)
    ensure_ray()
    res = cfg.train.resolution
    data = ray.data.read_parquet([storage.uri(p) for p in shard_files(corpus)], columns=["id", "image", "split"])
    data = data.filter(expr=ray.data.expressions.col("split") == "train")
    if subset:
        data = keep_ids(data, train_ids)
    data = data.map_batches(decode_batch, fn_kwargs={"resolution": res}, batch_size=64).materialize()  # decode once
    val_px = _pixels(cfg, "val", f.val_images)  # scores each epoch, then the epoch kept (fit.json)
    steps_per_epoch = batches_per_worker(data.count() * f.repeats, f.num_workers, f.batch_size)  # the lr schedule's
    if f.repeats > 1:  # held once in the object store, read f.repeats times per epoch (train.repeats' way)
        data = data.union(*([data] * (f.repeats - 1)))
    data = quiet_progress(data)  # no Ray Data bars redrawn per epoch (trainer.quiet_progress)
    trainer = TorchTrainer(
        fit_loop_per_worker,
        # the val images rank 0 scores each epoch on: decoded once, shared through the object store
        train_loop_config={"run": cfg, "steps_per_epoch": steps_per_epoch, "val": ray.put(val_px)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=f.num_workers, use_gpu=False, resources_per_worker={"CPU": f.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name="vae_fit",
            storage_path=storage.uri(cfg.run_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        ),
        datasets={"train": data},
    )
    result = trainer.fit()
    by_epoch = sorted((m["epoch"], m["val_mse"], c) for c, m in result.best_checkpoints)
    best_epoch, best = kept_epoch(by_epoch)
    with best.as_directory() as d:
        vae = AutoencoderKL.from_pretrained(Path(d) / "vae").eval()
    torch.manual_seed(0)
    train_px = _pixels(cfg, "train", 256, train_ids if subset else None)
    scaling = latent_scaling_factor(vae, train_px)
    vae.register_to_config(scaling_factor=scaling)
    val_mse, baseline = reconstruction_errors(vae, val_px)
    fit = {
        "val_mse": val_mse,
        "baseline_mse": baseline,
        "beats_baseline": bool(val_mse < baseline),
        "val_images": int(len(val_px)),
        "scaling_factor": scaling,
        "epochs": f.epochs,
        "epoch": best_epoch,  # the one kept: lowest val MSE on these val images
        "val_mse_by_epoch": [v for _, v, _ in by_epoch],
        "train_images": len(train_ids),
        "steps": result.metrics.get("step"),
        "train_mse_last_epoch": result.metrics.get("train_mse"),
        "input_side": result.metrics.get("input_side"),  # crops of vae_fit.crop_size, or the whole image
        "fingerprint": fingerprint,
    }
    with tempfile.TemporaryDirectory() as tmp:  # saved locally, then put in place with the record last
        vae.save_pretrained(tmp)
        (Path(tmp) / FIT_RECORD).write_text(json.dumps(fit, indent=2))
        _reconstruction_sheet(vae, val_px[:8], Path(tmp) / "reconstructions.png")
        storage.upload_dir(tmp, out, last=FIT_RECORD)
    verdict = "beats" if fit["beats_baseline"] else "does NOT beat"
    print(
        f"vae: fitted in {out}; val MSE {val_mse:.4f} {verdict} the mean-colour baseline {baseline:.4f}; "
        f"latent scaling factor {scaling:.4f}"
    )
    return fit


def _reconstruction_sheet(vae, pixels: np.ndarray, path: Path) -> None:
    """Val images (top) over their reconstructions (bottom): the picture the report shows."""
    import torch
    from PIL import Image

    from medisyn.figures import contact_sheet
    from medisyn.images import encode_image

    if not len(pixels):
        return
    with torch.no_grad():
        recon = to_uint8(reconstruct(vae, to_model_input(pixels, vae.device)))
    tiles = [
        (encode_image(Image.fromarray(np.ascontiguousarray(img)), "png", 1), label)
        for label, images in (("val image", pixels.transpose(0, 2, 3, 1)), ("reconstruction", recon))
        for img in images
    ]
    contact_sheet(tiles, per_row=len(pixels)).save(path)
