"""Shared vectorised numpy drawing primitives for the phantom generators.

Everything works on float32 arrays in [0, 1] (masks) or arbitrary units
(intensity maps); no per-pixel Python loops. Line-like structures (vessels,
instruments, sutures) are rasterised with PIL.ImageDraw, which is fast C code.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

F32 = np.float32


@lru_cache(maxsize=32)
def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinate arrays (float32, read-only, cached), shape (h, w)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(F32)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _bbox(h: int, w: int, cy: float, cx: float, rad: float):
    """Clipped bounding box (slices + local coordinate offsets) of a disc."""
    y0, y1 = max(0, int(np.floor(cy - rad))), min(h, int(np.ceil(cy + rad)) + 1)
    x0, x1 = max(0, int(np.floor(cx - rad))), min(w, int(np.ceil(cx + rad)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    dy = (np.arange(y0, y1, dtype=F32) - F32(cy))[:, None]
    dx = (np.arange(x0, x1, dtype=F32) - F32(cx))[None, :]
    return (slice(y0, y1), slice(x0, x1)), dy, dx


def ellipse(
    h: int, w: int, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0, soft: float = 1.0
) -> np.ndarray:
    """Soft-edged filled ellipse mask in [0, 1]; `soft` is the edge width in pixels.

    Only the bounding box is evaluated, so small shapes on big canvases are cheap.
    """
    out = np.zeros((h, w), F32)
    bb = _bbox(h, w, cy, cx, max(rx, ry) + soft + 1)
    if bb is None:
        return out
    sl, dy, dx = bb
    c, s = np.cos(angle), np.sin(angle)
    u = (dx * c + dy * s) / max(rx, 1e-3)
    v = (-dx * s + dy * c) / max(ry, 1e-3)
    d = (np.sqrt(u * u + v * v) - 1.0) * min(rx, ry)  # ~signed distance in px
    out[sl] = np.clip(0.5 - d / max(soft, 1e-3), 0.0, 1.0)
    return out


def blob(
    h: int,
    w: int,
    cy: float,
    cx: float,
    r: float,
    rng: np.random.Generator,
    irregularity: float = 0.15,
    harmonics: int = 5,
    spikes: int = 0,
    spike_len: float = 0.0,
    aspect: float = 1.0,
    angle: float = 0.0,
    soft: float = 1.5,
) -> np.ndarray:
    """Soft mask of a star-shaped blob whose radius varies with angle.

    Low harmonics give lobulated/irregular outlines; `spikes` adds narrow
    radial spicules (malignant masses) of relative length `spike_len`.
    """
    amps = [irregularity * rng.uniform(0.3, 1.0) / (k - 1) ** 0.7 for k in range(2, 2 + harmonics)]
    phases = [rng.uniform(0, 2 * np.pi) for _ in amps]
    if spikes:
        s_ang = rng.uniform(-np.pi, np.pi, spikes)
        s_wid = rng.uniform(0.04, 0.09, spikes)
        s_len = spike_len * rng.uniform(0.5, 1.0, spikes)
    out = np.zeros((h, w), F32)
    rmax = r * (1 + sum(amps) + (spike_len if spikes else 0)) / min(aspect, 1.0) + soft + 1
    bb = _bbox(h, w, cy, cx, rmax)
    if bb is None:
        return out
    sl, dy, dx = bb
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, (-dx * s + dy * c) * aspect
    theta = np.arctan2(v, u)
    rho = np.sqrt(u * u + v * v)
    rad = np.ones_like(theta)
    for k, (amp, ph) in enumerate(zip(amps, phases, strict=True), start=2):
        rad += amp * np.cos(k * theta + ph)
    if spikes:
        d = np.angle(np.exp(1j * (theta[..., None] - s_ang)))  # wrapped difference
        rad += (s_len * np.clip(1 - np.abs(d) / s_wid, 0, 1)).max(axis=-1)
    rr = r * np.maximum(rad, 0.2)
    out[sl] = np.clip(0.5 - (rho - rr) / soft, 0.0, 1.0)
    return out


def smooth_noise(rng: np.random.Generator, h: int, w: int, scale: float, octaves: int = 1) -> np.ndarray:
    """Zero-mean, unit-std smooth noise with feature size ~`scale` pixels.

    Built by upsampling coarse white noise (bicubic), which is far cheaper than
    Gaussian filtering large images. Extra octaves add finer detail.
    """
    out = np.zeros((h, w), F32)
    amp, sc = 1.0, float(scale)
    for _ in range(octaves):
        gh, gw = max(2, int(np.ceil(h / sc)) + 2), max(2, int(np.ceil(w / sc)) + 2)
        coarse = rng.standard_normal((gh, gw)).astype(F32)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        out += amp * np.asarray(img, F32)
        amp, sc = amp * 0.5, max(sc / 2.0, 1.0)
    out -= out.mean()
    return out / (out.std() + 1e-6)


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two spatial axes (channels untouched)."""
    sig = (sigma, sigma) + (0,) * (a.ndim - 2)
    return ndimage.gaussian_filter(a.astype(F32), sig)


def dots(
    rng: np.random.Generator,
    h: int,
    w: int,
    n: int,
    radius: float,
    weight: np.ndarray | None = None,
    jitter: float = 0.3,
) -> np.ndarray:
    """Mask of `n` small round dots (nuclei, spots, pustules) in [0, 1].

    Dot centres are sampled with probability proportional to `weight` (a
    density map, full or reduced resolution: a cell is drawn, then a uniform
    position inside it), splatted as impulses, blurred and softly thresholded.
    """
    if n <= 0:
        return np.zeros((h, w), F32)
    if weight is None:
        ys, xs = rng.uniform(0, h, n), rng.uniform(0, w, n)
    else:
        gh, gw = weight.shape
        p = np.clip(weight, 0, None).ravel().astype(np.float64)
        if p.sum() <= 0:
            return np.zeros((h, w), F32)
        cell = rng.choice(gh * gw, size=n, p=p / p.sum())
        ys = (cell // gw + rng.uniform(0, 1, n)) * (h / gh)
        xs = (cell % gw + rng.uniform(0, 1, n)) * (w / gw)
    idx = np.clip(ys.astype(np.int64), 0, h - 1) * w + np.clip(xs.astype(np.int64), 0, w - 1)
    imp = np.zeros(h * w, F32)
    np.add.at(imp, idx, rng.uniform(1 - jitter, 1 + jitter, n).astype(F32))
    sig = radius / 1.6
    g = ndimage.gaussian_filter(imp.reshape(h, w), sig, truncate=2.5)
    g *= F32(2 * np.pi * sig * sig / 0.45)
    return np.clip(g, 0, 1, out=g)


def polyline_mask(h: int, w: int, paths: list[np.ndarray], widths: list[float], supersample: int = 2) -> np.ndarray:
    """Anti-aliased mask of polylines (each path an (N, 2) array of x, y)."""
    ss = supersample
    img = Image.new("L", (w * ss, h * ss), 0)
    d = ImageDraw.Draw(img)
    for p, wd in zip(paths, widths, strict=True):
        pts = [(float(x) * ss, float(y) * ss) for x, y in p]
        d.line(pts, fill=255, width=max(1, int(round(wd * ss))), joint="curve")
    img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, F32) / 255.0


def polygon_mask(h: int, w: int, polys: list[np.ndarray], supersample: int = 2) -> np.ndarray:
    """Anti-aliased mask of filled polygons (each an (N, 2) array of x, y)."""
    ss = supersample
    img = Image.new("L", (w * ss, h * ss), 0)
    d = ImageDraw.Draw(img)
    for p in polys:
        d.polygon([(float(x) * ss, float(y) * ss) for x, y in p], fill=255)
    img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, F32) / 255.0


def random_walk(
    rng: np.random.Generator, x0: float, y0: float, angle: float, n: int, step: float, wiggle: float
) -> np.ndarray:
    """Smoothly curving path (vessels, cracks, hairs) as an (n+1, 2) array."""
    turns = np.cumsum(rng.normal(0, wiggle, n))
    ang = angle + turns
    xs = x0 + np.concatenate([[0], np.cumsum(step * np.cos(ang))])
    ys = y0 + np.concatenate([[0], np.cumsum(step * np.sin(ang))])
    return np.stack([xs, ys], axis=1)


def branching(
    rng: np.random.Generator,
    x0: float,
    y0: float,
    angle: float,
    length: float,
    width: float,
    depth: int,
    wiggle: float = 0.15,
) -> tuple[list[np.ndarray], list[float]]:
    """A small random tree of paths (vessels); returns (paths, widths)."""
    paths, widths = [], []
    stack = [(x0, y0, angle, length, width, depth)]
    while stack:
        x, y, a, ln, wd, dp = stack.pop()
        n = max(3, int(ln / 6))
        p = random_walk(rng, x, y, a, n, ln / n, wiggle)
        paths.append(p)
        widths.append(wd)
        if dp > 0:
            for frac in rng.uniform(0.35, 0.8, 2):
                j = int(frac * n)
                da = rng.choice([-1, 1]) * rng.uniform(0.4, 0.9)
                stack.append((p[j, 0], p[j, 1], a + da, ln * 0.6, wd * 0.65, dp - 1))
    return paths, widths


def vignette(h: int, w: int, strength: float = 0.6, radius: float = 0.75) -> np.ndarray:
    """Multiplicative radial fall-off (1 at centre) for endoscopes/cameras."""
    yy, xx = grid(h, w)
    r = np.sqrt(((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2)
    return (1 - strength * np.clip((r - radius * 0.5) / (1.45 - radius * 0.5), 0, 1) ** 2).astype(F32)


def compose(base: np.ndarray, mask: np.ndarray, color) -> np.ndarray:
    """Alpha-blend a colour (scalar, RGB or image) onto `base` through `mask`."""
    m = mask[..., None] if base.ndim == 3 and mask.ndim == 2 else mask
    d = np.subtract(base, np.asarray(color, F32), dtype=F32)
    d *= m
    return np.subtract(base, d, dtype=F32)


def to_u8(a: np.ndarray) -> np.ndarray:
    """Clip to [0, 255] and round to uint8."""
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of a 2-D float image."""
    return np.asarray(Image.fromarray(a.astype(F32)).resize((w, h), Image.BILINEAR), F32)
