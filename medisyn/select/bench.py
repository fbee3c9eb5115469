"""``medisyn bench select``: checkpoints scored per hour, real features cached vs recomputed.

Each checkpoint's FID needs the synthetic images (generation + features) and the real images'
features. The real side is the same for every checkpoint, so ``select`` extracts it once per
run; the baseline arm recomputes it for every checkpoint as select did before. Both arms score
the same ``--checkpoints`` checkpoints (the same random-weight pipeline: speed does not depend on
the weights) with the offline extractor (no download), timed end to end in this process.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from medisyn.models import build_pipeline
from medisyn.select.stage import pipeline_fid, real_statistics


def _real_sample(n: int, resolution: int) -> tuple[list[dict], dict[str, bytes]]:
    """n stand-in real images (PNG bytes) over two specialties, so per-specialty FID is computed too."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows, images = [], {}
    for i in range(n):
        specialty, image_type = [("dermatology", "dermoscopy"), ("radiology", "X-ray")][i % 2]
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(buf, "PNG")
        rows.append({"id": f"r{i}", "caption": f"{image_type} image {i % 4}", "specialty": specialty,
                     "image_type": image_type})  # fmt: skip
        images[f"r{i}"] = buf.getvalue()
    return rows, images


def run(preset: str = "tiny", images: int = 0, checkpoints: int = 3, steps: int = 0, resolution: int = 0) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    images = images or (256 if device == "cuda" else 32)
    steps = steps or (50 if device == "cuda" else 4)
    resolution = resolution or (512 if device == "cuda" else 64)
    pipe = build_pipeline(preset).to(device, dtype)
    rows, real_images = _real_sample(images, resolution)
    common = {"kind": "offline", "weights": "", "resolution": resolution, "batch_size": 16 if device == "cuda" else 8}
    score = {"steps": steps, "guidance_scale": 7.0, "seed": 0, "sizes": {}}
    print(
        f"bench select: {preset} pipeline on {device} ({torch.get_num_threads()} torch threads), {images} images "
        f"per checkpoint at {resolution}², Euler {steps} steps, {checkpoints} checkpoints, offline FID extractor"
    )
    real_statistics(rows[:2], real_images, **common)  # warm-up: extractor weights, kernels
    results, base = [], None
    for arm in ("real features per checkpoint", "real features cached"):
        start = time.perf_counter()
        real = None
        for _ in range(checkpoints):
            if real is None or arm == "real features per checkpoint":
                real = real_statistics(rows, real_images, **common)
            fids = pipeline_fid(pipe, rows, real, **common, **score)
        if device == "cuda":
            torch.cuda.synchronize()
        per_hour = checkpoints * 3600 / (time.perf_counter() - start)
        base = base or per_hour
        results.append({"arm": arm, "checkpoints_per_hour": per_hour, "ratio": per_hour / base, "fid": fids["all"]})
        print(f"  {arm:30s} {per_hour:10.1f} checkpoints/hour  {per_hour / base:5.2f}x baseline")
    return results
