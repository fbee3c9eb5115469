"""The one way this project turns prompts into pixels: generate's actors and select's FID both call it.

Euler (the pipeline's scheduler), classifier-free guidance whose unconditional branch is the
encoding of "" (``negative_prompt=""``, DESIGN §4), one seeded generator per image so an
image depends only on its own seed and not on its batch-mates, uint8 HWC output.
"""

from __future__ import annotations

from contextlib import nullcontext
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


CROP_CONDITIONING = "centre crop of the conditioning size"  # recorded in each set's set.json


def crop_conditioning(original_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """SDXL's ``crops_coords_top_left`` for an image of ``original_size`` made at ``resolution``:
    the corner of the centre crop ingest cut from such an image, in output pixels.

    SDXL trained on random crops, so (0, 0) there means "uncropped". Ingest crops every image
    at its centre, so in training the corner is fixed by the source's aspect ratio: (0, 0) only
    for square sources. Conditioning a 192×256 OCT prompt on (0, 0) asked the demo model for a
    square-source image, and it drew chest CT (docs/PERFORMANCE.md); the cache scales the
    recorded corner to the training resolution the same way (``train.cache``).
    """
    from medisyn.ingest.transforms import crop_box

    return crop_box(int(original_size[0]), int(original_size[1]), resolution).crop_top_left


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """Pipeline float images in [0, 1] (NHWC) to uint8 arrays, rounded."""
    return [(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in images]


def batches_by_size(sizes: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices into ``sizes`` in batches of at most ``batch_size``, each of one conditioning size where
    the counts allow (stable: caller's order within a size). :func:`generate_images` makes one pipeline
    call per size in a batch, so a batch whose image types interleave runs as several small calls;
    sorted, a batch is one call except where one size's run ends and the next begins."""
    order = sorted(range(len(sizes)), key=lambda i: tuple(sizes[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def generate_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    resolution: int,
    steps: int,
    guidance_scale: float,
    original_sizes: list[tuple[int, int]] | None = None,
) -> list[np.ndarray]:
    """One uint8 H×W×3 image per (prompt, seed), sampled with the pipeline as loaded (:func:`sample`),
    no guidance gap recorded (checkpoint selection's FID samples need none)."""
    return sample(
        pipe,
        prompts,
        seeds,
        resolution=resolution,
        steps=steps,
        guidance_scale=guidance_scale,
        original_sizes=original_sizes,
        gap_steps=0,
    )[0]


def sample(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    resolution: int,
    steps: int,
    guidance_scale: float,
    original_sizes: list[tuple[int, int]] | None = None,
    gap_steps: int = 5,
    gaps_only: bool = False,
) -> tuple[list[np.ndarray | None], list[float | None]]:
    """(images, guidance gaps): one uint8 H×W×3 image and one gap per (prompt, seed).

    ``original_sizes`` (height, width) per image: SDXL's size conditioning, as training saw each
    image's true original size (None: the output size). The crop conditioning is the one
    training saw for an image of that size (:func:`crop_conditioning`), not SDXL's customary
    (0, 0). Prompts that share a size go in one pipeline call; every image has its own
    generator, so grouping changes no pixel.

    The gap (:mod:`medisyn.infer.guidance`) is read off the guided U-Net calls the sampler makes
    anyway, over the first ``gap_steps``; None where guidance is off. ``gaps_only``: stop each call
    after those steps and decode nothing (images None): a resumed set's gap for an image whose
    file exists but whose gap was never recorded, at ``gap_steps / steps`` of a generation.
    ``gap_steps=0``: no gap is recorded (every gap None) and no hook is put on the U-Net."""
    from medisyn.infer.guidance import record_guidance_gap

    if len(prompts) != len(seeds):
        raise ValueError(f"generate_images: {len(prompts)} prompts but {len(seeds)} seeds")
    sizes = [tuple(s) for s in original_sizes] if original_sizes else [(resolution, resolution)] * len(prompts)
    if len(sizes) != len(prompts):
        raise ValueError(f"generate_images: {len(prompts)} prompts but {len(sizes)} original sizes")
    device = pipe.device
    out: list[np.ndarray | None] = [None] * len(prompts)
    gaps: list[float | None] = [None] * len(prompts)

    def stop_after_gap(pipeline, i, t, kwargs):  # diffusers' interrupt: later steps skip the U-Net
        if i + 1 >= gap_steps:
            pipeline._interrupt = True
        return kwargs

    if gaps_only and not gap_steps:
        raise ValueError("sample: gaps_only needs gap_steps >= 1")
    recorder = record_guidance_gap(pipe, gap_steps) if gap_steps else nullcontext(None)
    with recorder as gap:
        for size in dict.fromkeys(sizes):
            idx = [i for i, s in enumerate(sizes) if s == size]
            result = pipe(
                [prompts[i] for i in idx],
                negative_prompt=[""] * len(idx),
                height=resolution,
                width=resolution,
                original_size=size,
                crops_coords_top_left=crop_conditioning(size, resolution),
                target_size=(resolution, resolution),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator(device).manual_seed(int(seeds[i])) for i in idx],
                output_type="latent" if gaps_only else "np",
                callback_on_step_end=stop_after_gap if gaps_only else None,
            )
            for i, g in zip(idx, gap() if gap else [None] * len(idx), strict=True):
                gaps[i] = g
            if not gaps_only:
                for i, image in zip(idx, to_uint8(result.images), strict=True):
                    out[i] = image
    return out, gaps
