"""The per-worker training loop: one screen, top to bottom (nanoGPT style).

Per step: draw latents from the cached posterior moments and scale them; replace 10% of
captions by the cached encoding of "" (drawn at the step, so different images each epoch);
SDXL's time ids from the recorded original size and crop; noise and timesteps from the
scheduler; MSE on the predicted noise; AdamW at a constant learning rate; bf16 autocast over
fp32 master weights; gradient accumulation to the effective batch. At each epoch's end the
U-Net (diffusers layout), optimizer, step and RNG state are reported as a Ray Train checkpoint
``epoch-NNN``; a restarted worker resumes from the latest one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

CHECKPOINT_STATE = "training_state.pt"


@dataclass(frozen=True)
class TrainJob:
    """What each worker needs besides the RunConfig: where the cache and logs are, how long an epoch is."""

    text_cache: str  # cache/<identity>/text.parquet
    scaling_factor: float  # the VAE's latent scaling factor
    log_dir: str  # train_log/: one JSON per epoch and rank
    batches_per_epoch: int  # for the progress bar
    fail_at_step: int = -1  # tests: the last rank exits at this optimizer step, once (-1: never)


def add_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL micro-conditioning: (orig h, orig w, crop top, crop left, target h, target w) per sample."""
    target = torch.full_like(original_size, resolution)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()


def dropout_mask(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """True for the samples whose caption becomes "" at this step."""
    return torch.rand(n, generator=generator) < p


def sample_latents(
    mean: torch.Tensor, logvar: torch.Tensor, scaling: float, generator: torch.Generator
) -> torch.Tensor:
    """A fresh draw from the VAE posterior, scaled as the U-Net expects."""
    eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device)
    return (mean.float() + torch.exp(0.5 * logvar.float()) * eps) * scaling


def rank_state_file(rank: int) -> str:
    """Each rank's random state lives in its own file of the checkpoint (Ray Train merges every
    rank's reported files into one checkpoint directory)."""
    return f"rng-rank-{rank}.pt"


def rng_fingerprint(generator: torch.Generator) -> str:
    """A short digest of a generator's state: shows in the epoch log which random stream a rank is on."""
    import hashlib

    return hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()[:16]


def _save(unet, optimizer, epoch: int, step: int, ema, out: Path) -> None:
    """Rank 0's part of a checkpoint: U-Net (diffusers layout), EMA copy, optimizer and position."""
    unet.save_pretrained(out / "unet", safe_serialization=True)
    if ema is not None:
        ema.save_pretrained(out / "unet_ema")  # diffusers layout + optimization_step: exportable and resumable
    torch.save({"optimizer": optimizer.state_dict(), "epoch": epoch, "step": step}, out / CHECKPOINT_STATE)


def _load_ema(d: Path | None, unet, decay: float, device):
    """The EMA copy on the training device: restored from the checkpoint, or started from the weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    if d is not None and (d / "unet_ema").is_dir():
        ema = EMAModel.from_pretrained(d / "unet_ema", model_cls=UNet2DConditionModel)
    else:
        ema = EMAModel(unet.parameters(), decay=decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    ema.to(device)
    return ema


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry. ``config``: ``{"run": RunConfig, "job": TrainJob}``."""
    import ray.train
    import ray.train.torch
    from diffusers import UNet2DConditionModel

    from medisyn.models import load_noise_scheduler, load_unet
    from medisyn.train.cache import load_text

    cfg, job = config["run"], config["job"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    captions, embeds, pooled = load_text(Path(job.text_cache))
    index = {c: i for i, c in enumerate(captions)}
    embeds, pooled = (
        torch.from_numpy(embeds.astype(np.float32)).to(device),
        torch.from_numpy(pooled.astype(np.float32)).to(device),
    )
    scheduler = load_noise_scheduler(cfg.model)
    torch.manual_seed(cfg.seed)  # same initial weights on every worker
    unet = load_unet(cfg.model)
    start_epoch, step = 0, 0
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # this rank's noise, timesteps, dropout
    checkpoint = ray.train.get_checkpoint()
    state, ema = None, None
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as d:
        d = Path(d) if d else None
        if d is not None:
            unet = UNet2DConditionModel.from_pretrained(d / "unet")
            state = torch.load(d / CHECKPOINT_STATE, weights_only=False)
            start_epoch, step = state["epoch"] + 1, state["step"]
            if (d / rank_state_file(rank)).exists():  # absent when the world size grew: keep the seeded stream
                rng = torch.load(d / rank_state_file(rank), weights_only=False)
                generator.set_state(rng["generator"])
                torch.set_rng_state(rng["torch_rng"])
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        model = ray.train.torch.prepare_model(unet)  # DDP across workers; moves the U-Net to the device
        if t.ema_decay > 0:
            ema = _load_ema(d, unet, t.ema_decay, device)  # built after the move, so it lives on the device
    if t.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    if state:
        optimizer.load_state_dict(state["optimizer"])
    scaling = job.scaling_factor
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16")
    shard = ray.train.get_dataset_shard("train")
    log_dir = Path(job.log_dir)
    for epoch in range(start_epoch, t.epochs):
        started, seen, losses, dropped, first_ids = time.perf_counter(), 0, [], [], []
        micro, fingerprint = 0, rng_fingerprint(generator)
        bar = tqdm(total=job.batches_per_epoch, desc=f"epoch {epoch}", disable=rank != 0, mininterval=5)
        for batch in shard.iter_batches(
            batch_size=t.per_worker_batch,
            batch_format="numpy",
            local_shuffle_buffer_size=256,
            local_shuffle_seed=cfg.seed * 100 + epoch * 10 + rank,
            drop_last=False,
        ):
            if 0 <= job.fail_at_step == step and rank == world - 1 and not (log_dir / "fault-injected").exists():
                (log_dir / "fault-injected").touch()
                os._exit(1)  # fault injection for tests: the worker dies without a word
            n = len(batch["id"])
            if len(first_ids) < 4 * t.per_worker_batch:  # the epoch's first batches, for the order in the log
                first_ids += [str(i) for i in batch["id"]]
            mean, logvar = torch.from_numpy(np.asarray(batch["mean"])), torch.from_numpy(np.asarray(batch["logvar"]))
            latents = sample_latents(mean, logvar, scaling, generator).to(device)
            drop = dropout_mask(n, t.caption_dropout, generator)
            idx = torch.tensor(
                [0 if d else index[str(c)] for c, d in zip(batch["caption"], drop.tolist(), strict=True)], device=device
            )
            dropped += [str(i) for i, d in zip(batch["id"], drop.tolist(), strict=True) if d]
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            time_ids = add_time_ids(
                torch.from_numpy(np.stack(batch["original_size"])),
                torch.from_numpy(np.stack(batch["crop_top_left"])),
                t.resolution,
            ).to(device)
            with autocast:
                pred = model(
                    noisy, timesteps, embeds[idx], added_cond_kwargs={"text_embeds": pooled[idx], "time_ids": time_ids}
                ).sample
            loss = F.mse_loss(pred.float(), noise.float())
            (loss / t.accumulation).backward()
            micro += 1
            if micro % t.accumulation == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(unet.parameters())
                step += 1
            losses.append(loss.detach())  # no host sync per step; averaged at the epoch's end
            seen += n
            bar.update(1)
            if micro % 25 == 0:
                bar.set_postfix(loss=f"{losses[-1].item():.4f}", refresh=False)
        bar.close()
        if micro % t.accumulation:  # the epoch's last, partial accumulation
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(unet.parameters())
            step += 1
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch,
            "step": step,
            "loss": torch.stack(losses).mean().item() if losses else float("nan"),
            "samples_per_s": seen * world / seconds,
            "dropped_fraction": len(dropped) / max(seen, 1),
            "effective_batch": t.effective_batch,
        }
        log = {**metrics, "dropped_ids": dropped, "first_ids": first_ids, "rng_at_start": fingerprint}
        (log_dir / f"epoch-{epoch:03d}-rank-{rank}.json").write_text(json.dumps(log))
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                _save(unet, optimizer, epoch, step, ema, Path(tmp))
            rng = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
            torch.save(rng, Path(tmp) / rank_state_file(rank))
            ckpt = ray.train.Checkpoint.from_directory(tmp)  # every rank's files land in one directory
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:03d}")
