"""Generation settings (paper: Euler, guidance 7, 50 steps)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GenerateConfig:
    """Ray Data batch inference over a prompt set."""

    sets: tuple[str, ...] = ("memorization", "utility")  # prompt sets under jobs/configs/prompts/ (or paths)
    checkpoint: str = ""                          # exported pipeline dir; "" = the selected checkpoint of the run
    scheduler: Literal["euler"] = "euler"
    guidance_scale: float = 7.0
    steps: int = 50
    resolution: int = 512                         # image side in pixels
    batch_size: int = 16                          # prompts per actor call
    min_actors: int = 1                           # autoscaling actor pool bounds
    max_actors: int = 8
