"""``medisyn bench train``: U-Net training throughput (samples/s, model TFLOP/s) per recipe.

The real SDXL U-Net with random weights (``--preset sdxl-random``, 64x64 latents = 512² images)
on a GPU, or the tiny U-Net on CPU (so the benchmark itself is tested). Each recipe runs the
same step as the training loop — forward with SDXL's text-time conditioning, MSE, backward,
AdamW — after warm-up steps; the first recipe is the baseline every ratio is taken against.

``--ddp`` wraps the U-Net as the loop does (a one-process DDP group: gloo on CPU, nccl on CUDA, so
DDP's buckets exist; gradients as bucket views) and ``--accumulation N`` takes N micro-steps per
optimizer step under ``no_sync``; each recipe's peak ``torch.cuda.max_memory_allocated`` is printed
beside the memory plan's figure for the same settings (train/config.py; "n/a" on CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

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


def _ddp_group(device: str) -> None:
    """A one-process DDP group (rank 0 of 1), so DDP builds its buckets as under Ray Train."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)


def time_recipe(
    make_unet, recipe: dict, batch: int, latent: int, steps: int, warmup: int, device: str,
    ddp: bool = False, accumulation: int = 1,
) -> float:  # fmt: skip
    """Samples per second of full training steps under one recipe (``accumulation`` micro-steps each)."""
    from medisyn.train.loop import zero_grad_kwargs

    unet = make_unet().to(device)
    unet.train()
    if recipe.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    if recipe.get("channels_last"):
        unet = unet.to(memory_format=torch.channels_last)
    wrapped = None
    if ddp:  # as loop.prepare_ddp: zero gradients first, so they are bucket views from the first step
        _ddp_group(device)
        for p in unet.parameters():
            p.grad = torch.zeros_like(p)
        wrapped = torch.nn.parallel.DistributedDataParallel(unet, gradient_as_bucket_view=True)
    model = wrapped or unet
    model = torch.compile(model) if recipe.get("compile") else model
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, fused=device == "cuda")
    x, t, enc, added = _inputs(unet, batch, latent, device)
    noise = torch.randn_like(x)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=recipe.get("bf16", False))

    def step():
        for micro in range(accumulation):
            last = micro == accumulation - 1
            with wrapped.no_sync() if wrapped is not None and not last else contextlib.nullcontext():
                with autocast:
                    pred = model(x, t, enc, added_cond_kwargs=added).sample
                (F.mse_loss(pred.float(), noise) / accumulation).backward()
        opt.step()
        opt.zero_grad(**zero_grad_kwargs(wrapped))

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch * accumulation / (time.perf_counter() - start)


def planned_gb(preset: str, recipe: dict, batch: int, resolution: int, ddp: bool, accumulation: int) -> float | None:
    """The memory plan's figure for one recipe (without its reserve: ``max_memory_allocated`` has none)."""
    from medisyn.train.config import TrainConfig, memory_plan

    workers = 2 if ddp else 1  # the plan counts DDP's buckets for more than one worker; the bench has one
    t = replace(
        TrainConfig(),
        per_worker_batch=batch,
        num_workers=workers,
        effective_batch=batch * workers * accumulation,
        resolution=resolution,
        gradient_checkpointing=bool(recipe.get("gradient_checkpointing")),
        mixed_precision="bf16" if recipe.get("bf16") else "fp32",
        ema_decay=0.0,
    )
    plan = memory_plan(preset, t)
    return None if plan is None else sum(gb for what, gb in plan.lines if not what.startswith("reserve"))


def run(
    preset: str = "tiny", batch: int = 0, resolution: int = 0, steps: int = 0,
    ddp: bool = False, accumulation: int = 1, json_path: str = "",
) -> list[dict]:  # fmt: skip
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
        f"{', one-process DDP' if ddp else ''}, accumulation {accumulation}"
    )
    results, base = [], None
    for recipe in recipes:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            rate = time_recipe(
                make_unet, recipe, batch, latent, steps, warmup=3 if recipe.get("compile") else 1, device=device,
                ddp=ddp, accumulation=accumulation,
            )  # fmt: skip
        except Exception as exc:  # e.g. out of memory or no compiler: report, go on
            print(f"  {recipe['name']:32s} failed: {type(exc).__name__}: {str(exc)[:120]}")
            results.append({"recipe": recipe["name"], "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        base = base or rate
        tflops = rate * 3 * flops / 1e12  # forward + backward ≈ 3x forward
        peak = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
        plan = planned_gb(preset, recipe, batch, resolution, ddp, accumulation)
        results.append(
            {"recipe": recipe["name"], "samples_per_s": rate, "tflops": tflops, "ratio": rate / base,
             "max_memory_allocated_gb": peak, "planned_gb": plan}
        )  # fmt: skip
        memory = f"peak {peak:6.1f} GB" if peak is not None else "peak n/a"
        planned = f"plan {plan:6.1f} GB" if plan is not None else "plan n/a"
        print(
            f"  {recipe['name']:32s} {rate:9.2f} samples/s  {tflops:8.3f} TFLOP/s  {rate / base:5.2f}x baseline  "
            f"{memory}  {planned}"
        )
    if json_path:
        settings = {"preset": preset, "device": device, "batch": batch, "resolution": resolution, "steps": steps,
                    "ddp": ddp, "accumulation": accumulation}  # fmt: skip
        Path(json_path).write_text(json.dumps({**settings, "recipes": results}, indent=1))
    return results
