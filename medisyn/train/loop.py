"""The per-worker training loop: one screen, top to bottom (nanoGPT style).

Per step: draw latents from the cached posterior moments and scale them; replace 10% of
captions by the cached encoding of "" (drawn at the step, so different images each epoch);
SDXL's time ids from the recorded original size and crop; noise and timesteps from the
scheduler; MSE on the predicted noise (or velocity, ``model.prediction_type``), each sample
optionally Min-SNR weighted (``train.snr_gamma``); AdamW on ``train.lr_scheduler`` (diffusers'
``get_scheduler``: constant as in the paper, or warmup/linear/cosine, stepped per optimizer step and
resumed with the optimizer); bf16 autocast over
fp32 master weights; gradient accumulation to the effective batch, gradients all-reduced only
on the micro-step that steps the optimizer (DDP ``no_sync`` on the others).

At each epoch's end a Ray Train checkpoint ``epoch-NNN`` is reported (DESIGN §5.3):
``unet/`` (and ``unet_ema/``) in bf16, diffusers layout, for selection and export (~5 GB each
at SDXL size); ``rng-rank-R.pt`` per rank; and ``resume/`` (fp32 U-Net, fp32 EMA, AdamW state,
epoch and step: ~41 GB at SDXL size), which is kept only for the newest epochs: rank 0 removes
the one two epochs back, and the trainer removes all but the last when the run ends. A
restarted worker resumes from the latest checkpoint's ``resume/``.
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

from medisyn import storage

CHECKPOINT_STATE = "training_state.pt"


@dataclass(frozen=True)
class TrainJob:
    """What each worker needs besides the RunConfig: where the cache and logs are, how long an epoch is."""

    text_cache: str  # cache/<identity>/text.parquet
    scaling_factor: float  # the VAE's latent scaling factor
    log_dir: str  # train_log/: one JSON per epoch and rank
    batches_per_epoch: int  # for the progress bar


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


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to predict: the noise, or the velocity for a v-prediction scheduler."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"model.prediction_type: training supports epsilon and v_prediction, not {kind!r}")


def loss_weights(scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor | None:
    """Min-SNR-gamma weight per sample (diffusers' ``compute_snr``); None at gamma 0 (plain MSE).

    Caps the weight of the low-noise steps, which are easy and otherwise dominate the loss."""
    if snr_gamma <= 0:
        return None
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    capped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    return capped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else capped / snr


def batches_per_worker(rows: int, workers: int, batch: int) -> int:
    """Batches each worker reads per epoch: Ray Train splits a dataset equally
    (``streaming_split(equal=True)``), so each worker gets ``rows // workers`` rows."""
    return -(-(rows // workers) // batch)


def lr_schedule(optimizer, name: str, warmup_steps: int, total_steps: int, state: dict | None = None):
    """diffusers' ``get_scheduler`` over ``total_steps`` optimizer steps, resumed from ``state``.

    The order matters on resume: the schedule is built first (which sets the lr of step 0), then
    the optimizer's and the schedule's states are loaded, so the next step runs at the saved lr."""
    from diffusers.optimization import get_scheduler

    schedule = get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max(total_steps, warmup_steps + 1)
    )
    if state:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["lr_scheduler"])
    return schedule


def rank_state_file(rank: int) -> str:
    """Each rank's random state lives in its own file of the checkpoint (Ray Train merges every
    rank's reported files into one checkpoint directory)."""
    return f"rng-rank-{rank}.pt"


def rng_fingerprint(generator: torch.Generator) -> str:
    """A short digest of a generator's state: shows in the epoch log which random stream a rank is on."""
    import hashlib

    return hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()[:16]


def save_weights(unet, out: Path, dtype=torch.bfloat16) -> None:
    """The U-Net in diffusers layout with its tensors in ``dtype``: what select scores and exports.

    ``from_pretrained`` loads it as any diffusers U-Net (in fp32 unless told otherwise)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    unet.save_config(out)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in unet.state_dict().items()}
    save_file(tensors, out / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})


def _save(unet, optimizer, schedule, epoch: int, step: int, ema, out: Path) -> None:
    """Rank 0's part of a checkpoint: bf16 weights for selection, fp32 state for resuming."""
    from diffusers import UNet2DConditionModel

    save_weights(unet, out / "unet")
    resume = out / "resume"
    unet.save_pretrained(resume / "unet", safe_serialization=True)  # fp32 master weights
    if ema is not None:
        ema.save_pretrained(resume / "unet_ema")  # fp32 + optimization_step: the average continues on resume
        averaged = UNet2DConditionModel.from_config(unet.config)
        ema.copy_to(averaged.parameters())
        save_weights(averaged, out / "unet_ema")
        del averaged
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict(), "epoch": epoch, "step": step}
    torch.save(state, resume / CHECKPOINT_STATE)


def prune_resume_state(fs, checkpoints_path: str, keep: set[str]) -> list[str]:
    """Delete ``resume/`` from every epoch checkpoint not in ``keep`` (pyarrow filesystem paths)."""
    import pyarrow.fs as pafs

    removed = []
    for info in fs.get_file_info(pafs.FileSelector(checkpoints_path, allow_not_found=True)):
        name = info.path.rstrip("/").rsplit("/", 1)[-1]
        if info.type != pafs.FileType.Directory or not name.startswith("epoch-") or name in keep:
            continue
        resume = f"{info.path}/resume"
        if fs.get_file_info(resume).type == pafs.FileType.Directory:
            fs.delete_dir(resume)
            removed.append(name)
    return removed


def _load_ema(d: Path | None, unet, decay: float, device):
    """The EMA copy on the training device: restored from the checkpoint, or started from the weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    if d is not None and (d / "resume/unet_ema").is_dir():
        ema = EMAModel.from_pretrained(d / "resume/unet_ema", model_cls=UNet2DConditionModel)
    else:
        ema = EMAModel(unet.parameters(), decay=decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    ema.to(device)
    return ema


_END = object()


def with_last(batches):
    """(batch, is_last) pairs: the epoch's last micro-step must sync gradients even mid-accumulation."""
    it = iter(batches)
    current = next(it, _END)
    while current is not _END:
        following = next(it, _END)
        yield current, following is _END
        current = following


def _counting_allreduce(state: dict, bucket):
    """DDP's default all-reduce, noting which micro-step it ran on (the epoch log's ``grad_syncs``)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state["synced"].add(state["micro"])
    return default_hooks.allreduce_hook(None, bucket)


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
    captions, embeds, pooled = load_text(storage.path(job.text_cache))
    index = {c: i for i, c in enumerate(captions)}
    table_dtype = torch.bfloat16 if t.mixed_precision == "bf16" else torch.float32  # the caption table
    embeds, pooled = (
        torch.from_numpy(embeds).to(device, table_dtype),
        torch.from_numpy(pooled).to(device, table_dtype),
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
            if not (d / "resume" / CHECKPOINT_STATE).is_file():
                raise FileNotFoundError(f"train: checkpoint {checkpoint.path} has no resume/ state to continue from")
            unet = UNet2DConditionModel.from_pretrained(d / "resume/unet")
            state = torch.load(d / "resume" / CHECKPOINT_STATE, weights_only=False)
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
    ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
    comm = {"micro": 0, "synced": set()}
    if ddp is not None:
        ddp.register_comm_hook(comm, _counting_allreduce)
    if t.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    steps_per_epoch = -(-job.batches_per_epoch // t.accumulation)
    schedule = lr_schedule(optimizer, t.lr_scheduler, t.lr_warmup_steps, t.epochs * steps_per_epoch, state)
    scaling = job.scaling_factor
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16")
    shard = ray.train.get_dataset_shard("train")
    log_dir = storage.path(job.log_dir)
    train_storage = ctx.get_storage()
    for epoch in range(start_epoch, t.epochs):
        started, seen, losses, dropped, first_ids = time.perf_counter(), 0, [], [], []
        micro, fingerprint = 0, rng_fingerprint(generator)
        bar = tqdm(total=job.batches_per_epoch, desc=f"epoch {epoch}", disable=rank != 0, mininterval=5)
        comm["synced"].clear()
        batches = shard.iter_batches(  # train.repeats copies of the data per epoch: the trainer's union
            batch_size=t.per_worker_batch,
            batch_format="numpy",
            local_shuffle_buffer_size=256,
            local_shuffle_seed=cfg.seed * 100 + epoch * 10 + rank,
            drop_last=False,
        )
        for batch, last in with_last(batches):
            n = len(batch["id"])
            comm["micro"] = micro
            sync = (micro + 1) % t.accumulation == 0 or last
            no_sync = ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()
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
            target = training_target(scheduler, latents, noise, timesteps)
            weights = loss_weights(scheduler, timesteps, t.snr_gamma)
            time_ids = add_time_ids(
                torch.from_numpy(np.stack(batch["original_size"])),
                torch.from_numpy(np.stack(batch["crop_top_left"])),
                t.resolution,
            ).to(device)
            with no_sync:  # forward and backward: DDP decides on the forward whether the backward reduces
                with autocast:
                    pred = model(
                        noisy,
                        timesteps,
                        embeds[idx],
                        added_cond_kwargs={"text_embeds": pooled[idx], "time_ids": time_ids},
                    ).sample
                if weights is None:
                    loss = F.mse_loss(pred.float(), target.float())
                else:
                    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                    loss = (per_sample * weights).mean()
                (loss / t.accumulation).backward()
            micro += 1
            if micro % t.accumulation == 0:
                optimizer.step()
                schedule.step()
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
            schedule.step()
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
            "lr": schedule.get_last_lr()[0],  # the next step's: the schedule after this epoch
        }
        log = {
            **metrics,
            "pid": os.getpid(),  # shows a restarted worker (and lets the fault test kill one from outside)
            "micro_steps": micro,
            "grad_syncs": len(comm["synced"]) if ddp is not None else None,
            "dropped_ids": dropped,
            "first_ids": first_ids,
            "rng_at_start": fingerprint,
        }
        storage.write_bytes(json.dumps(log).encode(), log_dir / f"epoch-{epoch:03d}-rank-{rank}.json")
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                _save(unet, optimizer, schedule, epoch, step, ema, Path(tmp))
            rng = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
            torch.save(rng, Path(tmp) / rank_state_file(rank))
            ckpt = ray.train.Checkpoint.from_directory(tmp)  # every rank's files land in one directory
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{epoch:03d}")
        if rank == 0 and epoch >= 2:
            # every rank has reported epoch-1 (report is a barrier), so two back is never the resume point
            keep = {f"epoch-{e:03d}" for e in range(epoch - 1, t.epochs)}
            prune_resume_state(train_storage.storage_filesystem, train_storage.experiment_fs_path, keep)
