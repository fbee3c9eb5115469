"""The per-worker training loop: ``train_loop_per_worker`` reads top to bottom on one screen
(nanoGPT style); building or resuming the worker, a micro-step, an optimizer step and the epoch's
checkpoint are the named helpers above it.

Per step: draw latents from the cached posterior moments and scale them; replace 10% of
captions by the cached encoding of "" (drawn at the step, so different images each epoch);
SDXL's time ids from the recorded original size and crop; noise and timesteps from the
scheduler; MSE on the predicted noise (or velocity, ``model.prediction_type``), each sample
optionally Min-SNR weighted (``train.snr_gamma``); AdamW on ``train.lr_scheduler`` (diffusers'
``get_scheduler``: constant as in the paper, or warmup/linear/cosine, stepped per optimizer step and
resumed with the optimizer); bf16 autocast over fp32 master weights; gradient accumulation to the
effective batch, gradients all-reduced only on the micro-step that steps the optimizer (DDP
``no_sync`` on the others) and kept in DDP's buckets (``prepare_ddp``; train/config.py plans it).

At each epoch's end a Ray Train checkpoint ``epoch-NNN`` is reported (DESIGN §5.3):
``unet/`` (and ``unet_ema/``) in bf16, diffusers layout, for selection and export (~5 GB each
at SDXL size); ``rng-rank-R.pt`` per rank; and ``resume/`` (fp32 U-Net, fp32 EMA, AdamW state,
epoch and step: ~41 GB at SDXL size). Each rank writes its part to ``train.checkpoint_local_dir``
and Ray Train uploads it in the background while the next epoch trains. ``resume/`` is kept only
from the newest checkpoint the controller has registered on: rank 0 removes it from older ones
after each report, and the trainer from all but the last when the run ends. A restarted worker
resumes from the latest registered checkpoint's ``resume/``, loaded onto its own device.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
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


def load_to(path: Path, device) -> dict:
    """``torch.load`` onto ``device``. Without ``map_location`` tensors return to the device they were
    saved from: rank 0's GPU, which Ray Train's shared ``CUDA_VISIBLE_DEVICES`` makes the same GPU for
    every worker of a node (20.5 GB of AdamW moments each at SDXL size)."""
    return torch.load(path, map_location=device, weights_only=False)


def resume_from(d: Path | None, rank: int, device, generator: torch.Generator):
    """The fp32 U-Net and the training state of checkpoint folder ``d`` (None, None without one); this
    rank's random streams continue from its own file (absent when the world grew: the seeded stream)."""
    from diffusers import UNet2DConditionModel

    if d is None:
        return None, None
    if not (d / "resume" / CHECKPOINT_STATE).is_file():
        raise FileNotFoundError(f"train: checkpoint {d.name} has no resume/ state to continue from")
    unet = UNet2DConditionModel.from_pretrained(d / "resume/unet")
    state = load_to(d / "resume" / CHECKPOINT_STATE, device)
    if (d / rank_state_file(rank)).exists():
        rng = load_to(d / rank_state_file(rank), "cpu")
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch_rng"])
    return unet, state


def load_ema(d: Path | None, unet, decay: float, device):
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


def prepare_ddp(unet, world: int):
    """DDP across workers (Ray Train's ``prepare_model``; it also moves the U-Net to the device).

    ``gradient_as_bucket_view``: the gradients are views into DDP's all-reduce buckets instead of a
    second fp32 copy (10.3 GB at SDXL size). They stay views only while nothing frees them: the
    gradients are zeros before the wrap (DDP then makes them views at once, so the first
    accumulation holds no extra copy) and the optimizer zeroes them in place (``zero_grad_kwargs``);
    set to None, a ``no_sync`` micro-step would allocate fresh ones beside the buckets."""
    import ray.train.torch

    if world > 1:
        for p in unet.parameters():
            p.grad = torch.zeros_like(p)
    return ray.train.torch.prepare_model(unet, parallel_strategy_kwargs={"gradient_as_bucket_view": True})


def zero_grad_kwargs(ddp) -> dict:
    """In place under DDP (the gradients are its bucket views), freed otherwise (the single-GPU bench)."""
    return {"set_to_none": ddp is None}


@dataclass
class Worker:
    """One worker's training state: what a micro-step reads and what an optimizer step changes."""

    unet: torch.nn.Module  # the module the optimizer and EMA see
    model: torch.nn.Module  # what the forward calls: DDP-wrapped and/or compiled
    ddp: torch.nn.parallel.DistributedDataParallel | None
    optimizer: torch.optim.Optimizer
    schedule: object  # the lr schedule
    ema: object | None
    noise: object  # the noise scheduler
    generator: torch.Generator  # this rank's noise, timesteps and caption dropout
    captions: tuple  # (caption -> row, embeddings, pooled embeddings) of the text cache, on the device
    device: torch.device
    start_epoch: int = 0
    step: int = 0  # optimizer steps so far
    comm: dict = field(default_factory=lambda: {"micro": 0, "synced": set()})


def start_worker(cfg, job: TrainJob, rank: int, world: int, device) -> Worker:
    """Build (or resume) everything the loop steps: U-Net, DDP, AdamW and its schedule, EMA, captions."""
    import ray.train

    from medisyn.models import load_noise_scheduler, load_unet
    from medisyn.train.cache import load_text

    t = cfg.train
    Path(t.checkpoint_local_dir or tempfile.gettempdir()).mkdir(parents=True, exist_ok=True)  # fail now, not in an hour
    captions, embeds, pooled = load_text(storage.path(job.text_cache))
    table = torch.bfloat16 if t.mixed_precision == "bf16" else torch.float32  # the caption table's dtype
    text = ({c: i for i, c in enumerate(captions)}, torch.from_numpy(embeds).to(device, table),
            torch.from_numpy(pooled).to(device, table))  # fmt: skip
    torch.manual_seed(cfg.seed)  # same initial weights on every worker
    unet = load_unet(cfg.model)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as d:
        d = Path(d) if d else None
        resumed, state = resume_from(d, rank, device, generator)
        unet = resumed if resumed is not None else unet
        if t.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        model = prepare_ddp(unet, world)
        ema = load_ema(d, unet, t.ema_decay, device) if t.ema_decay > 0 else None
    ddp = model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
    w = Worker(unet, model, ddp, None, None, ema, load_noise_scheduler(cfg.model), generator, text, device)
    if ddp is not None:
        ddp.register_comm_hook(w.comm, _counting_allreduce)
    if t.compile:
        w.model = torch.compile(model)
    w.optimizer = torch.optim.AdamW(  # fused: no full-size temporaries in the step (as the bench measured)
        unet.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay, fused=device.type == "cuda"
    )
    total = t.epochs * -(-job.batches_per_epoch // t.accumulation)
    w.schedule = lr_schedule(w.optimizer, t.lr_scheduler, t.lr_warmup_steps, total, state)
    if state:
        w.start_epoch, w.step = state["epoch"] + 1, state["step"]
    del state  # the optimizer holds the moments now; nothing else keeps the loaded copy
    return w


def epoch_batches(shard, cfg, epoch: int, rank: int):
    """This rank's batches of one epoch: train.repeats copies of the data (the trainer's union),
    mixed in a local buffer seeded by (epoch, rank)."""
    return shard.iter_batches(
        batch_size=cfg.train.per_worker_batch,
        batch_format="numpy",
        local_shuffle_buffer_size=256,
        local_shuffle_seed=cfg.seed * 100 + epoch * 10 + rank,
        drop_last=False,
    )


def micro_step(w: Worker, t, batch: dict, sync: bool, scaling: float) -> tuple[torch.Tensor, list[str]]:
    """Forward and backward of one batch; gradients are all-reduced only when ``sync``.

    Returns the loss (on the device) and the ids whose caption was dropped."""
    n = len(batch["id"])
    index, embeds, pooled = w.captions
    mean, logvar = torch.from_numpy(np.asarray(batch["mean"])), torch.from_numpy(np.asarray(batch["logvar"]))
    latents = sample_latents(mean, logvar, scaling, w.generator).to(w.device)
    drop = dropout_mask(n, t.caption_dropout, w.generator).tolist()
    idx = torch.tensor(
        [0 if d else index[str(c)] for c, d in zip(batch["caption"], drop, strict=True)], device=w.device
    )
    noise = torch.randn(latents.shape, generator=w.generator).to(w.device)
    timesteps = torch.randint(0, w.noise.config.num_train_timesteps, (n,), generator=w.generator).to(w.device)
    noisy = w.noise.add_noise(latents, noise, timesteps)
    target = training_target(w.noise, latents, noise, timesteps).float()
    weights = loss_weights(w.noise, timesteps, t.snr_gamma)
    time_ids = add_time_ids(
        torch.from_numpy(np.stack(batch["original_size"])),
        torch.from_numpy(np.stack(batch["crop_top_left"])),
        t.resolution,
    ).to(w.device)
    no_sync = w.ddp.no_sync() if w.ddp is not None and not sync else contextlib.nullcontext()
    autocast = torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16")
    with no_sync:  # forward and backward: DDP decides on the forward whether the backward reduces
        with autocast:
            added = {"text_embeds": pooled[idx], "time_ids": time_ids}
            pred = w.model(noisy, timesteps, embeds[idx], added_cond_kwargs=added).sample.float()
        if weights is None:
            loss = F.mse_loss(pred, target)
        else:
            loss = (F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3)) * weights).mean()
        (loss / t.accumulation).backward()
    return loss.detach(), [str(i) for i, d in zip(batch["id"], drop, strict=True) if d]


def optimizer_step(w: Worker) -> None:
    """AdamW and the lr schedule step; the EMA follows every optimizer step."""
    w.optimizer.step()
    w.schedule.step()
    w.optimizer.zero_grad(**zero_grad_kwargs(w.ddp))
    if w.ema is not None:
        w.ema.step(w.unet.parameters())
    w.step += 1


def checkpoint_dir(local_root: str, epoch: int, rank: int) -> Path:
    """A new folder for this rank's part of epoch ``epoch`` under ``train.checkpoint_local_dir`` (or
    the system temp dir). Not a TemporaryDirectory: Ray Train deletes it once the background upload
    is done, while the loop trains on."""
    root = Path(local_root or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"medisyn-epoch-{epoch:03d}-rank-{rank}-", dir=root))


def report_epoch(w: Worker, t, epoch: int, rank: int, metrics: dict) -> None:
    """Write this rank's part of the epoch checkpoint locally and report it; Ray Train uploads it in
    the background (``CheckpointUploadMode.ASYNC``), so the GPUs do not wait on the copy to storage."""
    import ray.train

    out = checkpoint_dir(t.checkpoint_local_dir, epoch, rank)
    if rank == 0:
        _save(w.unet, w.optimizer, w.schedule, epoch, w.step, w.ema, out)
    torch.save({"generator": w.generator.get_state(), "torch_rng": torch.get_rng_state()}, out / rank_state_file(rank))
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(out),  # every rank's files land in one directory
        checkpoint_dir_name=f"epoch-{epoch:03d}",
        checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
    )
    if rank == 0:
        storage_ctx = ray.train.get_context().get_storage()
        prune_unregistered_behind(storage_ctx.storage_filesystem, storage_ctx.experiment_fs_path)


def registered(fs, checkpoints_path: str) -> list[str]:
    """The checkpoints Ray Train's controller has registered (``checkpoint_manager_snapshot.json``):
    a restart resumes from the newest of them, never from one still uploading."""
    import pyarrow.fs as pafs

    snapshot = f"{checkpoints_path}/checkpoint_manager_snapshot.json"
    if fs.get_file_info(snapshot).type != pafs.FileType.File:
        return []
    with fs.open_input_stream(snapshot) as f:
        results = json.loads(f.read()).get("checkpoint_results", [])
    return sorted(r["checkpoint_dir_name"] for r in results if r.get("checkpoint_dir_name"))


def prune_unregistered_behind(fs, checkpoints_path: str) -> list[str]:
    """Delete ``resume/`` from every checkpoint older than the newest registered one: a restart
    resumes from that one or a newer one, whatever is still uploading in the background."""
    done = registered(fs, checkpoints_path)
    if not done:
        return []
    keep = {f"epoch-{e:03d}" for e in range(int(done[-1].split("-")[1]), 10_000)}
    return prune_resume_state(fs, checkpoints_path, keep)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry. ``config``: ``{"run": RunConfig, "job": TrainJob}``."""
    import ray.train
    import ray.train.torch

    cfg, job = config["run"], config["job"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    w = start_worker(cfg, job, rank, world, ray.train.torch.get_device())
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(w.start_epoch, t.epochs):
        started, micro, seen, losses, dropped, first_ids = time.perf_counter(), 0, 0, [], [], []
        fingerprint = rng_fingerprint(w.generator)
        w.comm["synced"].clear()
        bar = tqdm(total=job.batches_per_epoch, desc=f"epoch {epoch}", disable=rank != 0, mininterval=5)
        for batch, last in with_last(epoch_batches(shard, cfg, epoch, rank)):
            w.comm["micro"] = micro
            sync = (micro + 1) % t.accumulation == 0 or last  # all-reduce on the micro-step that steps
            loss, drop = micro_step(w, t, batch, sync, job.scaling_factor)
            if len(first_ids) < 4 * t.per_worker_batch:  # the epoch's first batches, for the order in the log
                first_ids += [str(i) for i in batch["id"]]
            micro, seen, dropped = micro + 1, seen + len(batch["id"]), dropped + drop
            if micro % t.accumulation == 0:
                optimizer_step(w)
            losses.append(loss)  # no host sync per step; averaged at the epoch's end
            bar.update(1)
            if micro % 25 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.close()
        if micro % t.accumulation:  # the epoch's last, partial accumulation
            optimizer_step(w)
        metrics = {
            "epoch": epoch,
            "step": w.step,
            "loss": torch.stack(losses).mean().item() if losses else float("nan"),
            "samples_per_s": seen * world / (time.perf_counter() - started),
            "dropped_fraction": len(dropped) / max(seen, 1),
            "effective_batch": t.effective_batch,
            "lr": w.schedule.get_last_lr()[0],  # the next step's: the schedule after this epoch
        }
        log = {
            **metrics,
            "pid": os.getpid(),  # shows a restarted worker (and lets the fault test kill one from outside)
            "micro_steps": micro,
            "grad_syncs": len(w.comm["synced"]) if w.ddp is not None else None,
            "max_memory_gb": torch.cuda.max_memory_allocated(w.device) / 1e9 if w.device.type == "cuda" else None,
            "dropped_ids": dropped,
            "first_ids": first_ids,
            "rng_at_start": fingerprint,
        }
        storage.write_bytes(json.dumps(log).encode(), storage.path(job.log_dir) / f"epoch-{epoch:03d}-rank-{rank}.json")
        report_epoch(w, t, epoch, rank, metrics)
