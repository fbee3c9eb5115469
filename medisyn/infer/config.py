"""Generation settings (paper: Euler, guidance 7, 50 steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GenerateConfig:
    """Ray Data batch inference over a prompt set."""

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
