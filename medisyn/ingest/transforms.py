"""Pixel transforms of the paper's pre-processing (§4.1), as small pure functions on arrays.

Intensity: CT Hounsfield units windowed (width 700, level 100); MRI and mammograms clipped
at the 0.5th/99.5th percentiles; both rescaled to uint8 [0, 255]. Geometry: shorter side
resized to 512 with antialiasing, then a centre crop to 512×512, recording what SDXL's size
conditioning needs (the original size and the crop's top-left corner).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


def _to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] to [0, 255], clipped and rounded; a flat range gives zeros."""
    x = np.asarray(x, dtype=np.float32)  # float32: exact for 16-bit values, twice as fast as float64
    if not hi > lo:
        return np.zeros(x.shape, dtype=np.uint8)
    y = (np.clip(x, np.float32(lo), np.float32(hi)) - np.float32(lo)) * np.float32(255.0) / np.float32(hi - lo)
    return np.rint(y).astype(np.uint8)


def window_ct(hu: np.ndarray, width: float = 700, level: float = 100) -> np.ndarray:
    """Hounsfield units inside [level - width/2, level + width/2] mapped linearly to uint8."""
    return _to_uint8(hu, level - width / 2.0, level + width / 2.0)


def percentile_clip(x: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    """Clip at the lo-th and hi-th percentiles (over all pixels), rescale to uint8."""
    p_lo, p_hi = np.percentile(np.asarray(x, dtype=np.float64), [lo, hi])
    return _to_uint8(x, float(p_lo), float(p_hi))


def minmax_uint8(x: np.ndarray) -> np.ndarray:
    """Full-range rescale, for >8-bit photographs and scans without a clinical window."""
    x = np.asarray(x)
    return _to_uint8(x, float(x.min()), float(x.max()))


@dataclass(frozen=True)
class CropInfo:
    """Where the square came from: SDXL conditions on the source size and the crop corner."""

    original_size: tuple[int, int]  # (height, width) of the source image
    resized_size: tuple[int, int]  # (height, width) after the shorter side became `size`
    crop_top_left: tuple[int, int]  # (top, left) of the crop in resized coordinates


def crop_box(height: int, width: int, size: int = 512) -> CropInfo:
    """Shorter side to ``size`` (aspect kept, rounded), then a centred ``size``² crop."""
    scale = size / min(height, width)
    rh, rw = max(size, round(height * scale)), max(size, round(width * scale))
    return CropInfo((height, width), (rh, rw), ((rh - size) // 2, (rw - size) // 2))


def resize_center_crop_info(img: np.ndarray, size: int = 512) -> tuple[np.ndarray, CropInfo]:
    """uint8 HxW or HxWx3 to size×size, antialiased, plus the crop record."""
    if img.dtype != np.uint8:
        raise ValueError(f"resize_center_crop expects uint8 pixels, got {img.dtype}; window or rescale first")
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"resize_center_crop expects HxW or HxWx3 pixels, got shape {img.shape}")
    img = img[..., 0] if img.ndim == 3 and img.shape[2] == 1 else img
    info = crop_box(img.shape[0], img.shape[1], size)
    rh, rw = info.resized_size
    pil = Image.fromarray(img)
    if (rh, rw) != (img.shape[0], img.shape[1]):
        # Lanczos when shrinking (its support widens with the factor: antialiased); bicubic
        # when enlarging, where there is nothing to alias and it costs half as much
        shrink = rh < img.shape[0]
        pil = pil.resize((rw, rh), Image.Resampling.LANCZOS if shrink else Image.Resampling.BICUBIC)
    top, left = info.crop_top_left
    return np.asarray(pil.crop((left, top, left + size, top + size))), info


def resize_center_crop(img: np.ndarray, size: int = 512) -> np.ndarray:
    """The DESIGN §5 interface: the square image only."""
    return resize_center_crop_info(img, size)[0]
