"""Pathology phantoms: pyramidal tiled TIFF whole-slide images of lymph nodes.

Written as "generic tiled TIFF" (full-resolution tiled IFD, then reduced
tiled IFDs with SubFileType=1, zlib compression, 256x256 tiles), which
OpenSlide opens natively with one level per IFD. Tissue covers about half of
the slide on a near-white (~240) background so a thumbnail threshold finds
it; metastasis slides carry dense dark-purple clusters of large nuclei.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from . import draw as D
from .common import GenContext, GenResult, class_schedule

LEVEL0_HW = (1536, 2048)
N_LEVELS = 3
TILE = 256
MPP = 0.25  # micrometres per pixel at level 0 (40x)

# optical densities per unit stain (Beer-Lambert): eosin pink, haematoxylin purple
EOSIN = np.array([0.05, 0.40, 0.17], np.float32)
HAEMATOXYLIN = np.array([0.65, 0.95, 0.30], np.float32)
GLASS = np.array([243, 241, 244], np.float32)


def low_res(rng: np.random.Generator, h: int, w: int, fn, f: int = 8) -> np.ndarray:
    """Evaluate a mask function at 1/f resolution and upsample (cheap, smooth)."""
    return np.clip(D.resize(fn(h // f, w // f), h, w), 0, 1)


def slide_rgb(rng: np.random.Generator, tumour: bool) -> np.ndarray:
    """Level-0 RGB uint8 slide (H, W, 3) from eosin/haematoxylin density maps."""
    h, w = LEVEL0_HW
    cy, cx = h / 2 + rng.uniform(-80, 80), w / 2 + rng.uniform(-120, 120)
    tissue = low_res(
        rng,
        h,
        w,
        lambda a, b: D.blob(
            a, b, cy / 8, cx / 8, min(a, b) * 0.44, rng, 0.18, aspect=0.78, angle=rng.uniform(-0.4, 0.4), soft=1.0
        ),
    )
    stain = D.resize(D.smooth_noise(rng, h // 4, w // 4, 20), h, w)
    eos = tissue * (1.0 + 0.25 * stain)
    # lymphoid tissue: follicles of densely packed small dark nuclei, paler sinuses
    follicles = low_res(rng, h, w, lambda a, b: np.clip(D.smooth_noise(rng, a, b, 14) + 0.3, 0, 1))
    dens = tissue * (0.25 + 0.75 * follicles)
    n_lymph = int(tissue.sum() / 260)
    hem = D.dots(rng, h, w, n_lymph, 3.8, weight=dens[::4, ::4]) * 1.6
    hem += 0.06 * tissue
    if tumour:  # metastatic deposits: cohesive clusters of large pleomorphic nuclei
        k = int(rng.integers(2, 5))
        clusters = np.zeros((h // 8, w // 8), np.float32)
        for _ in range(k):
            r = rng.uniform(12, 26)
            ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
            ty = cy / 8 + rad * h / 8 * 0.35 * np.sin(ang)
            tx = cx / 8 + rad * w / 8 * 0.35 * np.cos(ang)
            clusters = np.maximum(clusters, D.blob(h // 8, w // 8, ty, tx, r, rng, 0.3, soft=1.0))
        clusters = np.clip(D.resize(clusters, h, w), 0, 1) * tissue
        n_t = int(clusters.sum() / 240)
        big = D.dots(rng, h, w, n_t, 8.5, weight=clusters[::4, ::4], jitter=0.5)
        chrom = 0.8 + 0.2 * D.smooth_noise(rng, h, w, 3)
        hem += clusters * (0.45 + 1.1 * big * chrom)  # purple cytoplasm + hyperchromatic nuclei
        eos -= 0.3 * clusters
    out = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        od = eos * EOSIN[c]
        od += hem * HAEMATOXYLIN[c]
        np.exp(-od, out=od)
        od *= GLASS[c]
        od += 1.5 * stain  # faint uneven illumination
        out[..., c] = np.clip(od, 0, 255)
    return out


def pyramid(level0: np.ndarray, n_levels: int = N_LEVELS) -> list[np.ndarray]:
    """2x box-filter pyramid (Pillow's reduce: fast and deterministic)."""
    levels, im = [level0], Image.fromarray(level0)
    for _ in range(n_levels - 1):
        im = im.reduce(2)
        levels.append(np.asarray(im))
    return levels


def write_slide(levels: list[np.ndarray], path: Path) -> None:
    """Generic tiled pyramidal TIFF (OpenSlide 'generic-tiff' vendor)."""
    res = 1e4 / MPP  # pixels per centimetre
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        for k, lv in enumerate(levels):
            tw.write(
                lv,
                tile=(TILE, TILE),
                compression="zlib",
                compressionargs={"level": 1},
                photometric="rgb",
                subfiletype=1 if k else 0,
                metadata=None,
                resolution=(res / 2**k, res / 2**k),
                resolutionunit="CENTIMETER",
                description="MediSyn phantom lymph node H&E; 40x; 0.25 um/px" if k == 0 else None,
                software="medisyn.phantoms",
            )


def lymph_node_wsi(ctx: GenContext, repo, n_per_class: int) -> GenResult:
    rows, col = [], repo.label_columns[0]
    for p, cls, i in class_schedule(ctx, list(repo.classes), n_per_class, 1, 1):
        rel = f"slides/{ctx.patient_id(p)}_node{i:03d}.tiff"
        write_slide(pyramid(slide_rgb(ctx.rng(i), cls == "tumor")), ctx.path(rel))
        rows.append({repo.path_column: rel, repo.patient_column: ctx.patient_id(p), col: cls})
    n = len(rows)
    tiles = (LEVEL0_HW[0] // TILE) * (LEVEL0_HW[1] // TILE)
    return GenResult(rows, files=n, frames=n * tiles, slides=n)


def lesion_slide_rgb(rng: np.random.Generator, tissue: np.ndarray, tumour: np.ndarray) -> np.ndarray:
    """Level-0 RGB slide drawn as :func:`slide_rgb` draws it (same stains, lymphocytes, tumour nuclei,
    same pixel scale) on a given ``tissue`` map (H, W in [0, 1]), with metastasis only where ``tumour``
    (H, W in [0, 1], e.g. lesion outlines less their holes) is set: a writer that ships outlines (ASAP
    XML) needs every tumour nucleus inside them, which slide_rgb's free-standing clusters do not promise."""
    from scipy import ndimage

    h, w = tissue.shape
    tissue = tissue.astype(np.float32)
    stain = D.resize(D.smooth_noise(rng, h // 4, w // 4, 20), h, w)
    eos = tissue * (1.0 + 0.25 * stain)
    follicles = low_res(rng, h, w, lambda a, b: np.clip(D.smooth_noise(rng, a, b, 14) + 0.3, 0, 1))
    dens = tissue * (0.25 + 0.75 * follicles)
    hem = D.dots(rng, h, w, int(tissue.sum() / 260), 3.8, weight=dens[::4, ::4]) * 1.6
    hem += 0.06 * tissue
    inside = np.asarray(tumour, np.float32) * tissue
    if inside.any():
        # a soft rim that fades inwards (blurred at 1/4 scale, cut to the mask: nothing leaks past an outline)
        rim = ndimage.gaussian_filter(np.ascontiguousarray(inside[::4, ::4]), 1.0)
        clusters = np.clip(D.resize(rim, h, w) * 2.0, 0, 1) * inside
        big = D.dots(rng, h, w, int(clusters.sum() / 240), 8.5, weight=clusters[::4, ::4], jitter=0.5)
        chrom = 0.8 + 0.2 * D.smooth_noise(rng, h, w, 3)
        hem += clusters * (0.45 + 1.1 * big * chrom)
        eos -= 0.3 * clusters
    out = np.empty((h, w, 3), np.uint8)
    for c in range(3):
        od = eos * EOSIN[c]
        od += hem * HAEMATOXYLIN[c]
        np.exp(-od, out=od)
        od *= GLASS[c]
        od += 1.5 * stain
        out[..., c] = np.clip(od, 0, 255)
    return out
