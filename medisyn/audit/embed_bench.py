"""``medisyn bench embed``: images/s of the memorization audit's embedding, per stage.

The audit embeds in two Ray Data stages (``audit/embeddings.py``): CPU tasks decode and
preprocess the stored images (``preprocess_images``, one core each), and the ``Embedder``
actors run the image tower on the device. This times both on the same PNG images, in this
process: the preprocessing on one thread (as a one-CPU Ray task runs), then the embedder on
batches of the preprocessed pixels. Their ratio is how many CPU cores keep one embedder busy.

On a GPU the tower is open_clip's ViT-B/16 at 224² with random weights (BiomedCLIP's image
tower shape; no download) on 512² images; on CPU the ``tiny-embedder`` preset on 64² images.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch

from medisyn.audit.embeddings import Embedder, preprocess_images
from medisyn.presets import preset_names


def _png_images(n: int, resolution: int, distinct: int = 32) -> list[bytes]:
    """n PNG images (``distinct`` smooth random ones, repeated): decoding costs the same."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(min(n, distinct)):
        small = rng.integers(0, 255, (resolution // 16, resolution // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((resolution, resolution), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "PNG", compress_level=1)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def _embedder(name: str) -> Embedder:
    """The audit's ``Embedder``: a preset as the audit loads it, or an open_clip model name with
    random weights (no download), put where the audit puts it."""
    if name in preset_names("embedder") or name.startswith(("hf-hub:", "local-dir:")):
        return Embedder(name)
    import open_clip

    e = Embedder.__new__(Embedder)
    e.torch, e.device = torch, "cuda" if torch.cuda.is_available() else "cpu"
    model, _, e.preprocess = open_clip.create_model_and_transforms(name)
    e.model = model.eval().to(e.device)
    return e


def run(embedder: str = "", images: int = 0, batch: int = 0, steps: int = 0, resolution: int = 0) -> list[dict]:
    cuda = torch.cuda.is_available()
    embedder = embedder or ("ViT-B-16" if cuda else "tiny-embedder")
    images = images or (512 if cuda else 32)
    batch = batch or (256 if cuda else 16)
    steps = steps or (40 if cuda else 2)
    resolution = resolution or (512 if cuda else 64)
    e = _embedder(embedder)
    pngs = _png_images(images, resolution)
    print(
        f"bench embed: {embedder} on {e.device}, {images} PNG images at {resolution}², batches of {batch}, "
        f"{steps} timed batches"
    )

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a one-CPU Ray task
    try:
        preprocess_images({"id": ["w"], "image": pngs[:1]}, e.preprocess)  # warm-up
        start = time.perf_counter()
        pixels = preprocess_images({"id": [str(i) for i in range(images)], "image": pngs}, e.preprocess)["pixels"]
        pre_rate = images / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)

    reps = -(-batch // len(pixels))
    feed = {"id": [str(i) for i in range(batch)], "pixels": np.concatenate([pixels] * reps)[:batch]}
    e(feed)  # warm-up: kernels, allocator
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        out = e(feed)  # returns host arrays: each call waits for its device work
    emb_rate = steps * batch / (time.perf_counter() - start)
    dim = len(out["embedding"][0])

    results = [
        {"arm": "preprocess (1 CPU core)", "images_per_s": pre_rate, "ratio": 1.0},
        {"arm": f"embedder ({e.device})", "images_per_s": emb_rate, "ratio": emb_rate / pre_rate, "dim": dim},
    ]
    for r in results:
        print(f"  {r['arm']:28s} {r['images_per_s']:10.1f} images/s  {r['ratio']:7.2f}x baseline")
    print(f"  cores of preprocessing that keep one embedder busy: {emb_rate / pre_rate:.1f} ({dim}-d embeddings)")
    return results
