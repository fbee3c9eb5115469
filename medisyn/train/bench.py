"""``medisyn bench train``: U-Net training throughput (samples/s, model TFLOP/s) per recipe.

The real SDXL U-Net with random weights (``--preset sdxl-random``, 64x64 latents = 512² images)
on a GPU, or the tiny U-Net on CPU (so the benchmark itself is tested). Each recipe runs the
same step as the training loop — forward with SDXL's text-time conditioning, MSE, backward,
AdamW — after warm-up steps; the first recipe is the baseline every ratio is taken against.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from medisyn.models import build_unet


def _inputs(unet, batch: int, latent: int, device: str):
    cross = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(batch, 4, latent, latent, generator=g).to(device),
        torch.randint(0, 1000, (batch,), generator=g).to(device),
        torch.randn(batch, 77, cross, generator=g).to(device),
        {
            "text_embeds": torch.randn(batch, pooled, generator=g).to(device),
            "time_ids": torch.tensor([[512.0, 512, 0, 0, 512, 512]] * batch).to(device),
        },
    )


def forward_flops(unet, batch: int, latent: int, device: str) -> float:
    """FLOPs of one forward pass, counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    x, t, enc, added = _inputs(unet, batch, latent, device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, enc, added_cond_kwargs=added)
    return float(counter.get_total_flops())


def time_recipe(make_unet, recipe: dict, batch: int, latent: int, steps: int, warmup: int, device: str) -> float:
    """Samples per second of full training steps under one recipe."""
    unet = make_unet().to(device)
    unet.train()
    if recipe.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    if recipe.get("channels_last"):
        unet = unet.to(memory_format=torch.channels_last)
    model = torch.compile(unet) if recipe.get("compile") else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device == "cuda")
    x, t, enc, added = _inputs(unet, batch, latent, device)
    noise = torch.randn_like(x)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=recipe.get("bf16", False))

    def step():
        with autocast:
            pred = model(x, t, enc, added_cond_kwargs=added).sample
        F.mse_loss(pred.float(), noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def run(preset: str = "tiny", batch: int = 0, resolution: int = 0, steps: int = 0) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    make_unet = lambda: build_unet(preset)  # noqa: E731 - each recipe times a fresh U-Net
    if device == "cuda":  # the GPU recipes, at the paper's 512² (64x64 latents)
        batch, resolution = batch or 16, resolution or 512
        recipes = [
            {"name": "eager bf16", "bf16": True},
            {"name": "bf16 + channels_last", "bf16": True, "channels_last": True},
            {"name": "bf16 + gradient checkpointing", "bf16": True, "gradient_checkpointing": True},
            {"name": "bf16 + torch.compile", "bf16": True, "compile": True},
        ]
    else:  # CPU: small images, fp32 (no bf16 units on CI-class CPUs)
        batch, resolution = batch or 8, resolution or 128
        recipes = [
            {"name": "eager fp32"},
            {"name": "bf16 autocast", "bf16": True},
            {"name": "fp32 + gradient checkpointing", "gradient_checkpointing": True},
        ]
    steps = steps or (20 if device == "cuda" else 5)
    latent = resolution // 8
    flops = forward_flops(make_unet().to(device), 1, latent, device)
    print(
        f"bench train: {preset} U-Net on {device}, batch {batch}, {resolution}² images ({latent}x{latent} latents), "
        f"{flops / 1e12:.4f} TFLOP forward per sample, {steps} timed steps"
    )
    results, base = [], None
    for recipe in recipes:
        try:
            rate = time_recipe(
                make_unet, recipe, batch, latent, steps, warmup=3 if recipe.get("compile") else 1, device=device
            )
        except Exception as exc:  # e.g. out of memory or no compiler: report, go on
            print(f"  {recipe['name']:32s} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        base = base or rate
        tflops = rate * 3 * flops / 1e12  # forward + backward ≈ 3x forward
        results.append({"recipe": recipe["name"], "samples_per_s": rate, "tflops": tflops, "ratio": rate / base})
        print(f"  {recipe['name']:32s} {rate:9.2f} samples/s  {tflops:8.3f} TFLOP/s  {rate / base:5.2f}x baseline")
        if device == "cuda":
            torch.cuda.empty_cache()
    return results
