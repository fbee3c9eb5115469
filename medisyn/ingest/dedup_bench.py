"""``medisyn bench dedup``: near-duplicate search on hashes as crowded as real CT slices.

The hashes are drawn here (no images): a few hundred base pHashes, each image its base with
0–3 bits flipped, so every cluster's images are within 6 bits of each other and most pairs
fall in one pHash bucket — as slices of one body region do. Thumbnails are the cluster's
smooth base image plus a smooth per-image change of ~5–10% of the range (different slices:
not duplicates) and pixel noise; 2% of the images are re-encoded copies of an earlier image
(0–1 bit flipped, ~0.5% RMS: near duplicates) and 0.5% exact copies. The vectorised search
runs on all of them; the pure-Python reference runs on a prefix (and half of it) and its time
is extrapolated as n² — the clusters stay while their size grows — which the output says,
with the exponent the two prefixes measured. Both must find the same duplicates on the prefix.
"""

from __future__ import annotations

import time

import numpy as np

from medisyn.ingest.dedup import find_duplicates, find_duplicates_reference


def _smooth_fields(rng: np.random.Generator, n: int, side: int = 32, knots: int = 5) -> np.ndarray:
    """``n`` smooth random fields (side × side, unit-ish amplitude): bilinear from a knots² grid."""
    x = np.linspace(0, knots - 1, side)
    w = np.maximum(0, 1 - np.abs(x[:, None] - np.arange(knots)[None, :]))  # (side, knots)
    return np.einsum("ak,nkl,bl->nab", w, rng.normal(size=(n, knots, knots)), w).reshape(n, side * side)


def clustered(n: int, bases: int = 300, seed: int = 0) -> dict:
    """``n`` images' (refs, pixel hashes, hex pHashes, thumbnails) drawn as described above."""
    rng = np.random.default_rng(seed)
    base_hash = rng.integers(0, np.iinfo(np.uint64).max, bases, dtype=np.uint64, endpoint=True)
    base_thumb = 128 + 45 * _smooth_fields(rng, bases)
    cluster = rng.integers(0, bases, n)
    hashes = base_hash[cluster].copy()
    for _ in range(3):  # 0-3 flipped bits (a flip may undo another)
        flip = rng.random(n) < 0.5
        hashes[flip] ^= np.left_shift(np.uint64(1), rng.integers(0, 64, flip.sum()).astype(np.uint64))
    basis = _smooth_fields(rng, 64)
    change = rng.normal(size=(n, 64)).astype(np.float32) @ basis.astype(np.float32)
    thumbs = base_thumb[cluster] + 2.5 * change + rng.normal(0, 2.0, (n, basis.shape[1]))
    thumbs = np.clip(thumbs, 0, 255).round().astype(np.uint8)
    ids = np.array([f"{i:032x}" for i in range(n)])
    copy = (rng.random(n) < 0.025) & (np.arange(n) > 0)
    originals = np.flatnonzero(~copy)  # a copy's source is an earlier original: a prefix holds both
    src = originals[(rng.random(n) * np.searchsorted(originals, np.arange(n))).astype(np.int64)]
    near = copy & (rng.random(n) < 0.8)
    hashes[near] = hashes[src[near]] ^ np.where(
        rng.random(near.sum()) < 0.5, np.left_shift(np.uint64(1), rng.integers(0, 64, near.sum()).astype(np.uint64)), 0
    ).astype(np.uint64)
    noisy = thumbs[src[near]].astype(np.int16) + rng.integers(-2, 3, (near.sum(), thumbs.shape[1]))
    thumbs[near] = np.clip(noisy, 0, 255).astype(np.uint8)
    exact = copy & ~near
    ids[exact], hashes[exact], thumbs[exact] = ids[src[exact]], hashes[src[exact]], thumbs[src[exact]]
    refs = [f"ct/{x:016x}" for x in rng.integers(0, np.iinfo(np.int64).max, n)]
    return {
        "refs": refs,
        "ids": ids.tolist(),
        "phashes": [f"{int(x):016x}" for x in hashes],
        "thumbs": thumbs,
    }


def _subset(data: dict, n: int) -> dict:
    return {k: v[:n] for k, v in data.items()}


def _new(data: dict, k: int, rms: float) -> tuple[dict, float]:
    start = time.perf_counter()
    found = find_duplicates(data["refs"], data["ids"], data["phashes"], k, data["thumbs"], rms)
    return found, time.perf_counter() - start


def _reference(data: dict, k: int, rms: float) -> tuple[dict, float]:
    thumbs = [t.tobytes() for t in data["thumbs"]]
    start = time.perf_counter()
    found = find_duplicates_reference(data["refs"], data["ids"], data["phashes"], k, thumbs, rms)
    return found, time.perf_counter() - start


def run(n: int = 200_000, reference_n: int = 20_000, bases: int = 300, k: int = 4, rms: float = 0.01) -> dict:
    """Times both searches and checks they agree; returns the numbers it printed."""
    print(f"bench dedup: drawing {n:,} clustered pHashes + 32x32 thumbnails ({bases} base hashes) ...")
    data = clustered(n, bases)
    found, new_s = _new(data, k, rms)
    near = sum(r == "near duplicate" for r, _ in found.values())
    print(
        f"vectorised: {new_s:8.2f} s  {n / new_s:10,.0f} images/s  "
        f"({len(found) - near:,} exact + {near:,} near duplicates of {n:,})"
    )
    m = min(reference_n, n)
    small = _subset(data, m)
    ref_found, ref_s = _reference(small, k, rms)
    new_small, new_small_s = _new(small, k, rms)
    same = new_small == ref_found
    if m == n:
        ref_total, how = ref_s, "measured"
        p = 1.0
    else:
        _, half_s = _reference(_subset(data, m // 2), k, rms)
        p = float(np.log(ref_s / half_s) / np.log(2))
        ref_total = ref_s * (n / m) ** 2  # the clusters stay, so compares grow with the square of their size
        how = f"extrapolated from {m:,} images ({ref_s:.1f} s) as n²; measured {m // 2:,} -> {m:,}: n^{p:.2f}"
    print(f"reference:  {ref_total:8.2f} s  {n / ref_total:10,.0f} images/s  ({how})")
    print(f"speed-up: {ref_total / new_s:.1f}x at {n:,} images; {ref_s / new_small_s:.1f}x measured at {m:,}")
    print(
        f"same duplicates as the reference on the {m:,} both ran: {'yes' if same else 'NO'} "
        f"({len(ref_found):,} duplicates)"
    )
    assert same, "the vectorised search disagrees with the reference"
    return {
        "n": n,
        "new_s": new_s,
        "reference_s": ref_total,
        "reference_measured_n": m,
        "exponent": p,
        "ratio": ref_total / new_s,
        "duplicates": len(found),
        "same": same,
    }
