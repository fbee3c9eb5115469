"""Checkpoint-selection settings (paper: lowest FID over 10,000 synthetic vs 10,000 real images)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from medisyn.configtools import ConfigError


@dataclass(frozen=True)
class SelectConfig:
    """Checkpoint choice by FID between synthetic images and the real images whose captions made them."""

    RANGES: ClassVar[dict[str, str]] = {
        "num_images": ">=1",
        "resolution": ">=0",
        "batch_size": ">=1",
        "steps": ">=1",
        "guidance_scale": ">=0",
    }

    num_images: int = 10_000  # real train images (and as many synthetic)
    feature_extractor: Literal["inception", "offline"] = (
        "inception"  # "offline": no-download stand-in, labelled in outputs
    )
    inception_weights: str = ""  # local FID Inception weights file (pt_inception-2015-12-05); "" = download
    resolution: int = 0  # side of generated images; 0 = train.resolution
    # prompts per pipeline call, grouped by image type (one conditioning size a call); 16 fits an 80 GB GPU
    # (SDXL 512², bf16, 50 steps: 2.15 images/s on one H100 against 1.12 at 8; docs/PERFORMANCE.md)
    batch_size: int = 16
    steps: int = 50  # sampler steps for the synthetic images
    guidance_scale: float = 7.0
    weights: Literal["raw", "ema"] = "raw"  # score and export the trained weights or their EMA (train.ema_decay > 0)
    # "fid": the lowest-FID epoch (the paper). "last": the last epoch, nothing generated or scored — for the
    # offline demo, whose stand-in FID (random Inception weights) measures nothing about the prompts
    criterion: Literal["fid", "last"] = "fid"

    def __post_init__(self):
        if self.resolution % 8:
            raise ConfigError(f"select.resolution: {self.resolution} must be a multiple of 8 (0 = train.resolution)")
