"""Image bytes in and out, shared by every stage: the corpus's lossless encoding (ingest writes it;
the VAE's and fidelity's sheets reuse it) and its decoding at a model's resolution (cache, the VAE
fit, the fidelity check). Below the stages, so none of them reaches into another's room for it."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_image(img: Image.Image, fmt: str = "png", png_level: int = 1) -> bytes:
    """Lossless bytes that ``PIL.Image.open`` reads back exactly.

    ``auto``: PNG for grey (fast: one channel) and lossless WebP (method 0) for colour,
    which encodes ~4x faster than PNG at level 1 for a smaller file; WebP has no grey mode.
    """
    buf = io.BytesIO()
    if fmt == "webp" or (fmt == "auto" and img.mode == "RGB"):
        img.save(buf, format="WEBP", lossless=True, method=0, quality=0)
    else:
        img.save(buf, format="PNG", compress_level=png_level)
    return buf.getvalue()


def load_pixels(data: bytes, resolution: int) -> np.ndarray:
    """Corpus bytes → uint8 H×W×3 at ``resolution``² (Lanczos, antialiased)."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.uint8)


def decode_batch(batch: dict, resolution: int) -> dict:
    """Ray Data or a plain batch: ``image`` (corpus bytes) → ``pixels``, uint8 N×3×r×r."""
    return {"pixels": np.stack([load_pixels(b, resolution).transpose(2, 0, 1) for b in batch["image"]])}
