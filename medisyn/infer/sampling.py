"""The one way this project turns prompts into pixels: generate's actors and select's FID both call it.

Euler (the pipeline's scheduler), classifier-free guidance whose unconditional branch is the
encoding of "" (``negative_prompt=""``, DESIGN §4), one seeded generator per image so an
image depends only on its own seed and not on its batch-mates, uint8 HWC output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def sampling_device() -> tuple[str, torch.dtype]:
    """(device, dtype) a sampler runs in: bf16 on a GPU, fp32 on CPU."""
    if torch.cuda.is_available():
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


def load_sampler(model_dir: str | Path):
    """An exported diffusers pipeline with SDXL's Euler sampler, on this machine's device."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    device, dtype = sampling_device()
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, dtype=dtype)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """Pipeline float images in [0, 1] (NHWC) to uint8 arrays, rounded."""
    return [(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in images]


def generate_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    resolution: int,
    steps: int,
    guidance_scale: float,
) -> list[np.ndarray]:
    """One uint8 H×W×3 image per (prompt, seed), sampled with the pipeline as loaded."""
    if len(prompts) != len(seeds):
        raise ValueError(f"generate_images: {len(prompts)} prompts but {len(seeds)} seeds")
    device = pipe.device
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    images = pipe(
        list(prompts),
        negative_prompt=[""] * len(prompts),
        height=resolution,
        width=resolution,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type="np",
    ).images
    return to_uint8(images)
