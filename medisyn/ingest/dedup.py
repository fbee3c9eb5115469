"""Exact and near duplicates within a repository — what a diffusion model memorizes first.

Exact: the same pixel hash. Near: perceptual hashes (64-bit pHash) within a Hamming
distance ``k`` *and* grey 32×32 thumbnails within an RMS difference ``rms`` (of the full
range). pHash alone is too coarse for medical images: neighbouring CT slices or two
different patients' OCT scans share their low-frequency structure and land within 4 bits
while differing by 10% of the range pixel for pixel. The thumbnail check keeps those and
still catches re-encoded, rescaled or slightly shifted copies (RMS well under 1%).

Candidate pairs come from the pigeonhole trick instead of all pairs: split the 64 bits into
``k + 1`` bands; two hashes within distance ``k`` agree exactly on at least one band, so
only images sharing a band value are compared. Of each group the first image (by source
reference, so the choice is the same on every run) is kept.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def _bands(bits: int, k: int) -> list[tuple[int, int]]:
    n = k + 1
    edges = [round(i * bits / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def _rms(a: bytes, b: bytes) -> float:
    x = np.frombuffer(a, np.uint8).astype(np.float32) - np.frombuffer(b, np.uint8).astype(np.float32)
    return float(np.sqrt(np.mean(x * x)) / 255.0)


def find_duplicates(
    refs: list[str],
    pixel_hashes: list[str],
    phashes: list[str],
    max_distance: int = 4,
    thumbs: list[bytes] | None = None,
    max_rms: float = 0.01,
) -> dict[str, tuple[str, str]]:
    """``{ref: (reason, kept_ref)}`` for every image to drop; all inputs are aligned lists.

    ``reason`` is "exact duplicate" or "near duplicate". Ordering by ``ref`` makes the kept
    image deterministic.
    """
    order = sorted(range(len(refs)), key=lambda i: refs[i])
    dropped: dict[str, tuple[str, str]] = {}
    first_by_pixels: dict[str, int] = {}
    keep: list[int] = []
    for i in order:
        j = first_by_pixels.setdefault(pixel_hashes[i], i)
        if j != i:
            dropped[refs[i]] = ("exact duplicate", refs[j])
        else:
            keep.append(i)
    if max_distance < 0:
        return dropped
    values = {i: int(phashes[i], 16) for i in keep}
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    bands = _bands(64, max_distance)
    for i in keep:  # in ref order: an image is compared with kept images that came before it
        h = values[i]
        candidates = set()
        keys = [(b, (h >> lo) & ((1 << (hi - lo)) - 1)) for b, (lo, hi) in enumerate(bands)]
        for key in keys:
            candidates.update(buckets.get(key, ()))
        match = min(
            (
                j
                for j in candidates
                if (values[j] ^ h).bit_count() <= max_distance
                and (thumbs is None or _rms(thumbs[i], thumbs[j]) <= max_rms)
            ),
            key=lambda j: refs[j],
            default=None,
        )
        if match is not None:
            dropped[refs[i]] = ("near duplicate", refs[match])
            continue
        for key in keys:
            buckets[key].append(i)
    return dropped
