"""Cache and training settings (paper §4.2 numbers are the defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from medisyn.configtools import ConfigError

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
        "num_actors": ">=1",
        "rows_per_file": ">=1",
    }

    batch_size: int = 32  # images per VAE batch
    num_actors: int = 1  # encoder actors (one GPU each on GPU clusters)
    rows_per_file: int = (
        1024  # latent rows per parquet file (~64 MB at 512²): the unit the per-epoch file shuffle moves
    )


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
        "gpu_batch_limit": ">=0",
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
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the U-Net
    ema_decay: float = 0.0  # 0 = no EMA (as in the paper)
    # Min-SNR loss weighting (Hang et al. 2023; diffusers' --snr_gamma): each sample's loss times
    # min(SNR, gamma)/SNR (epsilon) or /(SNR+1) (v_prediction). 0 = plain MSE (the paper); 5 is usual.
    snr_gamma: float = 0.0
    max_failures: int = 3  # Ray Train restarts from the last checkpoint
    # Largest per-worker batch on a GPU; 0 = the model preset's measured limit (SDXL U-Net, bf16,
    # 80 GB: 16 eager, 32 with gradient checkpointing). Raise it explicitly for a larger GPU.
    gpu_batch_limit: int = 0

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
