"""Cache and training settings (paper §4.2 numbers are the defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from medisyn.configtools import ConfigError
from medisyn.presets import get_preset

LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine"]


def check_lr_schedule(section: str, name: str, warmup_steps: int) -> None:
    """A warmup on the plain "constant" schedule would be silently ignored by diffusers: refuse it."""
    if name == "constant" and warmup_steps > 0:
        raise ConfigError(
            f"{section}.lr_warmup_steps: {warmup_steps} needs a schedule with a warmup "
            f"({section}.lr_scheduler: constant_with_warmup, linear or cosine), not constant"
        )


@dataclass(frozen=True)
class CacheConfig:
    """Frozen-encoder outputs computed once: VAE posterior moments and caption encodings."""

    RANGES: ClassVar[dict[str, str]] = {
        "batch_size": ">=1",
        "min_actors": ">=1",
        "max_actors": ">=0",
        "rows_per_file": ">=1",
    }

    batch_size: int = 32  # images per VAE batch
    # encoder actor pool bounds, one GPU each on GPU clusters (raytools.actor_pool_bounds); max 0 = every GPU
    # the cluster has or its autoscaler can add (1 actor on a CPU cluster). CPU tasks decode the images.
    min_actors: int = 1
    max_actors: int = 0
    rows_per_file: int = (
        1024  # latent rows per parquet file (~64 MB at 512²): the unit the per-epoch file shuffle moves
    )

    def __post_init__(self):
        if self.max_actors and self.min_actors > self.max_actors:
            raise ConfigError(f"cache.min_actors: {self.min_actors} is above cache.max_actors ({self.max_actors})")


@dataclass(frozen=True)
class TrainConfig:
    """The U-Net fine-tune: only the U-Net trains; VAE and text encoders stay frozen."""

    RANGES: ClassVar[dict[str, str]] = {
        "epochs": ">=1",
        "repeats": ">=1",
        "subset_per_caption": ">=0",
        "learning_rate": ">0",
        "weight_decay": ">=0",
        "effective_batch": ">=1",
        "per_worker_batch": ">=1",
        "num_workers": ">=1",
        "cpus_per_worker": ">0",
        "resolution": ">=8",
        "ema_decay": "0..1",
        "max_failures": ">=0",
        "gpu_memory_gb": ">0",
        "snr_gamma": ">=0",
        "lr_warmup_steps": ">=0",
        "caption_balance": "0..1",
    }

    epochs: int = 15  # checkpoints: one per epoch
    repeats: int = 1  # passes over the train split per epoch (kohya's repeats; small corpora)
    subset_per_caption: int = 0  # train on N images per caption only (0 = all; demo-memorize: 1)
    # Repeat each caption's images round((n_max / n) ** caption_balance) times per pass: 0 = the
    # corpus as it is (the paper), 1 = every caption about equally often, 0.5 = square-root balance
    caption_balance: float = 0.0
    learning_rate: float = 1e-5  # AdamW; the peak of lr_scheduler
    # diffusers' get_scheduler (the training scripts' --lr_scheduler), per optimizer step over all
    # epochs: constant (the paper), constant_with_warmup, linear or cosine (decay to 0 at the end)
    lr_scheduler: LrScheduler = "constant"
    lr_warmup_steps: int = 0  # optimizer steps of linear warmup (not with "constant")
    weight_decay: float = 1e-2  # AdamW
    effective_batch: int = 128  # = per_worker_batch x num_workers x accumulation
    per_worker_batch: int = 16  # samples per worker per micro-step (16 x 4 workers x 2 accumulation = 128)
    num_workers: int = 4  # Ray Train workers (one GPU each when use_gpu)
    use_gpu: bool = True
    cpus_per_worker: float = 1.0  # CPUs each worker reserves (below 1 leaves CPUs for Ray Data on small machines)
    resolution: int = 512  # training image side in pixels (the demo trains smaller)
    caption_dropout: float = 0.1  # fraction of captions replaced by "" at each step
    mixed_precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype; master weights stay fp32
    # on by default: eager at per_worker_batch 16 plans 87 GB per GPU under DDP (train/config.py)
    gradient_checkpointing: bool = True
    compile: bool = False  # torch.compile the U-Net
    ema_decay: float = 0.0  # 0 = no EMA (as in the paper)
    # Min-SNR loss weighting (Hang et al. 2023; diffusers' --snr_gamma): each sample's loss times
    # min(SNR, gamma)/SNR (epsilon) or /(SNR+1) (v_prediction). 0 = plain MSE (the paper); 5 is usual.
    snr_gamma: float = 0.0
    max_failures: int = 3  # Ray Train restarts from the last checkpoint
    # Memory of one worker's GPU in GB (10^9 bytes): a GPU config whose memory plan (train/config.py:
    # weights, AdamW, DDP buckets, EMA, activations from the preset's measured figure) is larger is
    # refused when it loads. An H100 or A100 "80 GB" holds 85 GB in these units: 80 keeps a margin.
    gpu_memory_gb: float = 80.0
    # Where each worker writes its epoch checkpoint before Ray Train uploads it in the background
    # (and deletes it): "" = the system temp dir. A cluster gives a local NVMe path (paper.yaml).
    checkpoint_local_dir: str = ""

    def __post_init__(self):
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"train.caption_dropout: {self.caption_dropout} is outside [0, 1)")
        per_step = self.per_worker_batch * self.num_workers
        if self.effective_batch % per_step:
            raise ConfigError(
                f"train.effective_batch: {self.effective_batch} is not a multiple of "
                f"per_worker_batch x num_workers = {per_step}"
            )
        if self.subset_per_caption < 0:
            raise ConfigError(f"train.subset_per_caption: {self.subset_per_caption} must be >= 0")
        if self.repeats < 1:
            raise ConfigError(f"train.repeats: {self.repeats} must be at least 1")
        if self.resolution % 8:
            raise ConfigError(f"train.resolution: {self.resolution} must be a multiple of 8")
        check_lr_schedule("train", self.lr_scheduler, self.lr_warmup_steps)

    @property
    def accumulation(self) -> int:
        """Micro-steps per optimizer step."""
        return self.effective_batch // (self.per_worker_batch * self.num_workers)


@dataclass(frozen=True)
class VaeFitConfig:
    """Fit the build preset's VAE to the corpus (the demo's tiny VAE); real runs keep SDXL's VAE."""

    RANGES: ClassVar[dict[str, str]] = {
        "epochs": ">=1",
        "repeats": ">=1",
        "batch_size": ">=1",
        "learning_rate": ">0",
        "kl_weight": ">=0",
        "num_workers": ">=1",
        "cpus_per_worker": ">0",
        "lr_warmup_steps": ">=0",
        "val_images": ">=1",
        "crop_size": ">=0",
    }

    enabled: bool = False  # fit into model.vae before cache; needs a build preset and model.vae set
    epochs: int = 20  # checkpoints: one per epoch, at train.resolution
    repeats: int = 1  # passes over the fitted images per epoch (as train.repeats; demo-memorize's few dozen)
    batch_size: int = 16
    learning_rate: float = 2e-3  # AdamW; the peak of lr_scheduler
    lr_scheduler: LrScheduler = "constant"  # as train.lr_scheduler
    lr_warmup_steps: int = 0
    val_images: int = 256  # val images each epoch is scored on; the stage keeps the best epoch (a spike-proof end)
    kl_weight: float = 1e-6  # × KL per pixel, added to the reconstruction MSE (SD's weight)
    num_workers: int = 1  # Ray Train workers (DDP on CPU)
    cpus_per_worker: float = 1.0  # also the torch threads of each worker
    # 0: whole images; else a random crop_size² crop of each image each step (a multiple of 8, at most
    # train.resolution): the VAE is convolutional, so it learns from crops at (resolution / crop_size)² less
    # compute a step, as SD's VAE learnt from 256² crops; it is scored and used on whole images
    crop_size: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.num_workers < 1:
            raise ConfigError("vae_fit: epochs, batch_size and num_workers must be at least 1")
        if self.crop_size < 0 or self.crop_size % 8:
            raise ConfigError(f"vae_fit.crop_size: {self.crop_size} must be 0 (whole images) or a multiple of 8")
        if self.learning_rate <= 0 or self.kl_weight < 0:
            raise ConfigError("vae_fit: learning_rate must be > 0 and kl_weight >= 0")
        check_lr_schedule("vae_fit", self.lr_scheduler, self.lr_warmup_steps)


# The memory plan of one training worker's GPU: what the loop holds at its peak, line by line.
#
# The peak is the start of a micro-step's backward, when every activation is saved. Besides the
# activations it holds the fp32 weights, AdamW's two fp32 moments, autocast's bf16 copies of the
# weights (saved for the backward), and whatever gradient memory outlives a step: DDP's buckets (the
# loop passes ``gradient_as_bucket_view=True``, so the gradients are views into them and this is the
# only gradient memory; without it the buckets are a second copy), the previous micro-step's
# gradients under accumulation, and an EMA copy. The single-GPU figure ``medisyn bench train`` times
# frees its gradients every step, so it has none of these: at ``per_worker_batch`` 16 the paper's
# old settings planned 89 GB on an 80 GB card (the bench measured 67 GB), and the config check let
# them through.
#
# Activations per sample come from the model preset (``memory`` in ``presets/*.json``, with where
# each figure was measured) at its reference resolution and scale with the latent area. A tenth of
# the GPU is kept for what ``max_memory_allocated`` does not count (the CUDA context, the caching
# allocator's fragmentation, cuBLAS/cuDNN workspaces). Pure arithmetic: the config check runs it
# without torch.

GB = 1e9  # every figure here and in the presets is in decimal GB (10^9 bytes)
RESERVE = 0.10  # of the GPU: CUDA context, allocator fragmentation, library workspaces


@dataclass(frozen=True)
class MemoryPlan:
    """Each line's GB on one worker's GPU, and the GPU it has to fit."""

    preset: str
    lines: tuple[tuple[str, float], ...]
    gpu_gb: float

    @property
    def total_gb(self) -> float:
        return sum(gb for _, gb in self.lines)

    @property
    def fits(self) -> bool:
        return self.total_gb <= self.gpu_gb

    def text(self) -> str:
        rows = [f"  {what:66s} {gb:7.2f} GB" for what, gb in self.lines]
        verdict = "fits" if self.fits else "does NOT fit"
        return "\n".join(
            [f"memory plan per GPU, preset {self.preset!r}:", *rows,
             f"  {'total':66s} {self.total_gb:7.2f} GB of {self.gpu_gb:g} GB (train.gpu_memory_gb): {verdict}"]
        )  # fmt: skip


def memory_plan(preset: str, t, bucket_view: bool = True) -> MemoryPlan | None:
    """The plan for train settings ``t`` (a ``TrainConfig``); None for a preset without figures.

    ``bucket_view=False`` plans DDP as it was before the loop passed ``gradient_as_bucket_view``."""
    spec = get_preset(preset, "diffusion").get("memory")
    if not spec:
        return None
    params = spec["unet_parameters"]
    fp32 = 4 * params / GB
    ddp = t.num_workers > 1  # Ray Train's prepare_model wraps in DDP only for more than one worker
    bf16 = t.mixed_precision == "bf16"
    mode = "gradient_checkpointing" if t.gradient_checkpointing else "eager"
    per_sample = spec["activation_gb_per_sample"][mode] * (t.resolution / spec["reference_resolution"]) ** 2
    if not bf16:
        per_sample *= 2  # fp32 activations: twice the bytes of the measured bf16 ones (an estimate)
    lines = [
        (f"U-Net weights, fp32 ({params:,} parameters)", fp32),
        ("AdamW moments, fp32 (two per weight)", 2 * fp32),
    ]
    if bf16:
        lines.append(("autocast's bf16 weight copies (saved for the backward)", fp32 / 2))
    if ddp and bucket_view:
        lines.append(("DDP buckets, fp32 (the gradients are views into them)", fp32))
    elif ddp:
        lines.append(("DDP buckets, fp32 (a copy of the gradients)", fp32))
    if t.accumulation > 1 and not (ddp and bucket_view):
        lines.append((f"gradients, fp32, held across {t.accumulation} micro-steps", fp32))
    if t.ema_decay > 0:
        lines.append(("EMA copy, fp32", fp32))
    lines.append(
        (f"activations: {t.per_worker_batch} x {per_sample:.4g} GB ({mode.replace('_', ' ')}, {t.resolution}²)",
         t.per_worker_batch * per_sample)
    )  # fmt: skip
    lines.append((f"reserve: {RESERVE:.0%} of the GPU (CUDA context, fragmentation, workspaces)",
                  RESERVE * t.gpu_memory_gb))  # fmt: skip
    return MemoryPlan(preset, tuple(lines), t.gpu_memory_gb)


def check_memory_plan(preset: str, t) -> MemoryPlan | None:
    """Refuse GPU settings whose plan is over ``train.gpu_memory_gb``, the plan's lines in the message."""
    plan = memory_plan(preset, t)
    if t.use_gpu and plan is not None and not plan.fits:
        raise ConfigError(
            f"train: the settings need {plan.total_gb:.1f} GB per GPU, more than train.gpu_memory_gb "
            f"{t.gpu_memory_gb:g}.\n{plan.text()}\nLower train.per_worker_batch (reach the effective batch by "
            "accumulation or more workers), set train.gradient_checkpointing=true, or raise train.gpu_memory_gb "
            "for a larger GPU"
        )
    return plan
