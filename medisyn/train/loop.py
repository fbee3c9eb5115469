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


def _save(unet, optimizer, epoch: int, step: int, generator: torch.Generator, ema, out: Path) -> None:
    unet.save_pretrained(out / "unet", safe_serialization=True)
    if ema is not None:
        ema.save_pretrained(out / "unet_ema")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "generator": generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        },
        out / CHECKPOINT_STATE,
    )


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
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            unet = UNet2DConditionModel.from_pretrained(Path(d) / "unet")
            state = torch.load(Path(d) / CHECKPOINT_STATE, weights_only=False)
        start_epoch, step = state["epoch"] + 1, state["step"]
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = None
    if t.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unet.parameters(), decay=t.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    unet.train()
    model = ray.train.torch.prepare_model(unet)  # DDP across workers
    if t.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    if state:
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
    scaling = job.scaling_factor
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16")
    shard = ray.train.get_dataset_shard("train")
    log_dir = Path(job.log_dir)
    for epoch in range(start_epoch, t.epochs):
        started, seen, losses, dropped = time.perf_counter(), 0, [], []
        micro = 0
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
            losses.append(loss.item())
            seen += n
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        bar.close()
        if micro % t.accumulation:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        seconds = time.perf_counter() - started
        metrics = {
            "epoch": epoch,
            "step": step,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "samples_per_s": seen * world / seconds,
            "dropped_fraction": len(dropped) / max(seen, 1),
            "effective_batch": t.effective_batch,
        }
        (log_dir / f"epoch-{epoch:03d}-rank-{rank}.json").write_text(json.dumps({**metrics, "dropped_ids": dropped}))
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _save(unet, optimizer, epoch, step, generator, ema, Path(tmp))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:03d}")
