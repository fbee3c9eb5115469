"""Generation settings (paper: Euler, guidance 7, 50 steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from medisyn.configtools import ConfigError


@dataclass(frozen=True)
class GenerateConfig:
    """Ray Data batch inference over a prompt set."""

    RANGES: ClassVar[dict[str, str]] = {
        "guidance_scale": ">=0",
        "steps": ">=1",
        "resolution": ">=8",
        "batch_size": ">=1",
        "min_actors": ">=1",
        "max_actors": ">=1",
        "cpus_per_actor": ">0",
        "max_per_prompt": ">=0",
        "gap_steps": ">=1",
    }

    sets: tuple[str, ...] = (
        "memorization",
        "utility",
    )  # prompt sets: names under jobs/configs/prompts/, "fid", or YAML/CSV paths
    checkpoint: str = ""  # exported pipeline dir; "" = the selected checkpoint of the run
    scheduler: Literal["euler"] = "euler"
    guidance_scale: float = 7.0
    steps: int = 50
    resolution: int = 512  # image side in pixels
    batch_size: int = 16  # prompts per actor call
    min_actors: int = 1  # autoscaling actor pool bounds
    max_actors: int = 8
    cpus_per_actor: float = 1.0  # CPU actors only (GPU actors take one GPU each)
    max_per_prompt: int = 0  # cap on images per prompt (0 = the set's counts; the demo sets a few)
    # SDXL size conditioning (height, width) for every image; () = the exported model's median
    # original size of each prompt's image type (model/medisyn.json), as in select's FID images
    original_size: tuple[int, ...] = ()
    # the guidance gap (infer.guidance; manifest `guidance_gap`) is averaged over the first this many
    # sampling steps, where Wen et al. find memorised prompts separate
    gap_steps: int = 5

    def __post_init__(self):
        if self.resolution % 8:
            raise ConfigError(
                f"generate.resolution: {self.resolution} must be a multiple of 8 (the VAE's latent factor)"
            )
        if self.min_actors > self.max_actors:
            raise ConfigError(
                f"generate.min_actors: {self.min_actors} is above generate.max_actors ({self.max_actors})"
            )
        if self.original_size and (len(self.original_size) != 2 or min(self.original_size) <= 0):
            raise ConfigError(f"generate.original_size: {list(self.original_size)} is not [height, width] > 0")
