"""``medisyn bench generate``: images/s of the SDXL pipeline as ``generate`` runs it.

Any build preset (``medisyn/presets``): ``--preset sdxl-random`` is SDXL's real U-Net, VAE and
text-encoder sizes with random weights. On a GPU: 512², Euler, guidance 7, 50 steps, bf16, at
8 and 16 prompts per batch; on CPU (so the benchmark is tested): 128², 20 steps, 4 and 8
prompts. The first row is the baseline of the ratios.
"""

from __future__ import annotations

import time

import torch

from medisyn.models import build_pipeline


def run(preset: str = "tiny", batch: int = 0, resolution: int = 0, steps: int = 0) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # bf16 at the paper's 512², 50 steps
        pipe, resolution, steps = build_pipeline(preset).to(device, torch.bfloat16), resolution or 512, steps or 50
        batches = [batch] if batch else [8, 16]
    else:
        pipe, resolution, steps = build_pipeline(preset).to(device), resolution or 128, steps or 20
        batches = [batch] if batch else [4, 8]
    print(
        f"bench generate: {preset} pipeline on {device}, {resolution}², Euler {steps} steps, guidance 7, "
        f'negative prompt ""'
    )
    results, base = [], None
    for b in batches:
        prompts = ["Dermoscopy image showing melanoma."] * b
        kw = dict(
            negative_prompt=[""] * b,
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            guidance_scale=7.0,
            output_type="np",
        )
        pipe(prompts, **{**kw, "num_inference_steps": 2})  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(prompts, generator=[torch.Generator(device).manual_seed(i) for i in range(b)], **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        rate = b / (time.perf_counter() - start)
        base = base or rate
        results.append({"batch": b, "images_per_s": rate, "ratio": rate / base})
        print(f"  {b:3d} prompts/batch  {rate:8.3f} images/s  {rate / base:5.2f}x baseline")
    return results
