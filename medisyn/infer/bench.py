"""``medisyn bench generate``: images/s of the SDXL pipeline as ``generate`` runs it.

``--preset sdxl-random`` (GPU): SDXL's real U-Net, VAE and text-encoder sizes with random
weights, 512², Euler, guidance 7, 50 steps, bf16, at 8 and 16 prompts per batch.
``--preset tiny`` (CPU, so the benchmark is tested): the tiny pipeline at 128². The first
row is the baseline of the ratios.
"""

from __future__ import annotations

import time

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from medisyn.models import SDXL_SCHEDULER, build_tiny_pipeline, build_tiny_tokenizer, sdxl_random_unet

SDXL_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                       block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=0.13025,
                       force_upcast=False)


def sdxl_random_pipeline(dtype=torch.bfloat16) -> StableDiffusionXLPipeline:
    """SDXL-sized networks with random weights: the real compute, no download."""
    tok = build_tiny_tokenizer()

    def text(hidden, layers, heads, inter, cls):
        cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             intermediate_size=inter, projection_dim=1280, max_position_embeddings=77,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return cls(cfg)

    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**SDXL_VAE_CONFIG), text_encoder=text(768, 12, 12, 3072, CLIPTextModel),
        text_encoder_2=text(1280, 32, 20, 5120, CLIPTextModelWithProjection), tokenizer=tok, tokenizer_2=build_tiny_tokenizer(),
        unet=sdxl_random_unet(), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def run(preset: str = "tiny", batch: int = 0, resolution: int = 0, steps: int = 0) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if preset == "sdxl-random":
        pipe, resolution, steps = sdxl_random_pipeline().to(device), resolution or 512, steps or 50
        batches = [batch] if batch else [8, 16]
    else:
        pipe, resolution, steps = build_tiny_pipeline().to(device), resolution or 128, steps or 20
        batches = [batch] if batch else [4, 8]
    print(f"bench generate: {preset} pipeline on {device}, {resolution}², Euler {steps} steps, guidance 7, "
          f"negative prompt \"\"")
    results, base = [], None
    for b in batches:
        prompts = ["Dermoscopy image showing melanoma."] * b
        kw = dict(negative_prompt=[""] * b, height=resolution, width=resolution, num_inference_steps=steps,
                  guidance_scale=7.0, output_type="np")
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
