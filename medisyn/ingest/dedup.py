"""Exact and near duplicates across all repositories of a run — what a diffusion model memorizes first.

Exact: the same pixel hash. Near: perceptual hashes (64-bit pHash) within a Hamming
distance ``k`` *and* grey 32×32 thumbnails within an RMS difference ``rms`` (of the full
range). pHash alone is too coarse for medical images: neighbouring CT slices or two
different patients' OCT scans share their low-frequency structure and land within 4 bits
while differing by 10% of the range pixel for pixel. The thumbnail check keeps those and
still catches re-encoded, rescaled or slightly shifted copies (RMS well under 1%).

Which copy is kept: images are put in *keep order* — the repository's position in the run's
repository list (config order), then ``source_ref`` — and an image is dropped when it equals
(exact) or nearly equals (near) an image kept before it in that order; it names the earliest
such image. Exact duplicates are removed first, and only the remaining images are searched
for near ones. Frames of one video (same ``series``, the video's ref) are never near duplicates of
each other: a static scene's consecutive frames are what the video shows, not copies; exact copies are
removed everywhere, and near ones across videos and against every other image. So a repository
listed first keeps its copies (list HAM10000 before ISIC 2019),
and the choice is the same on every run and every machine.

Near search (:func:`near_duplicates`) is the pigeonhole trick on numpy arrays: split the 64
bits into ``k + 1`` bands; two hashes within distance ``k`` agree exactly on at least one band,
so only images sharing a band value are compared. Images are taken in blocks of the keep
order; each block is compared with a sorted band index of the images kept so far (a dropped
image is never a candidate again, so a run of near-identical blank slices costs one compare
each) and then within itself. Candidate pairs are filtered by XOR + popcount, then by cheap
lower bounds of the thumbnail distance (block sums), and only the survivors get the exact
RMS. Medical images crowd into few pHash buckets, so the old pure-Python loop
(:func:`find_duplicates_reference`, kept for tests and ``medisyn bench dedup``) approached
O(N²) Python steps; this does the same comparisons as array operations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from medisyn import storage


def _bands(bits: int, k: int) -> list[tuple[int, int]]:
    n = k + 1
    edges = [round(i * bits / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1]) for i in range(n)]


def _rms(a: bytes, b: bytes) -> float:
    x = np.frombuffer(a, np.uint8).astype(np.float32) - np.frombuffer(b, np.uint8).astype(np.float32)
    return float(np.sqrt(np.mean(x * x)) / 255.0)


def find_duplicates_reference(
    refs: list[str],
    pixel_hashes: list[str],
    phashes: list[str],
    max_distance: int = 4,
    thumbs: list[bytes] | None = None,
    max_rms: float = 0.01,
) -> dict[str, tuple[str, str]]:
    """The original pure-Python search (keep order = ``ref``): the baseline of ``medisyn bench
    dedup`` and the reference the tests hold :func:`find_duplicates` to."""
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


def keep_order(refs: Sequence[str], ranks: Sequence[int] | None = None) -> np.ndarray:
    """Indices of ``refs`` in keep order: repository rank (config order), then ``source_ref``."""
    if ranks is None:
        return np.argsort(np.asarray(refs, dtype=str), kind="stable").astype(np.int64)
    return np.lexsort((np.asarray(refs, dtype=str), np.asarray(ranks))).astype(np.int64)


def exact_duplicates(pixel_hashes: Sequence[str]) -> np.ndarray:
    """``match[i]``: the first image (in the given order) with image ``i``'s pixels, -1 for that first one."""
    n = len(pixel_hashes)
    if n == 0:
        return np.empty(0, np.int64)
    _, first, inverse = np.unique(np.asarray(pixel_hashes, dtype=str), return_index=True, return_inverse=True)
    match = first[inverse.reshape(-1)].astype(np.int64)
    match[match == np.arange(n)] = -1
    return match


def parse_phashes(phashes: Sequence[str]) -> np.ndarray:
    """Hex pHash strings (16 digits) as uint64."""
    if len(phashes) == 0:
        return np.empty(0, np.uint64)
    return np.frombuffer(b"".join(bytes.fromhex(p.zfill(16)) for p in phashes), dtype=">u8").astype(np.uint64)


def _max_ss(pixels: int, max_rms: float) -> int:
    """The largest integer sum of squared differences over ``pixels`` that :func:`_rms` accepts,
    bisected on _rms's own float32 arithmetic so both decide every pair alike (-1: none)."""

    def ok(ss: int) -> bool:
        return float(np.sqrt(np.float32(ss) / pixels) / 255.0) <= max_rms

    lo, hi = -1, pixels * 255 * 255
    if ok(hi):
        return hi
    while hi - lo > 1:  # ok(lo) or lo == -1; not ok(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


class _Thumbs:
    """Thumbnail distance for candidate pairs: lower bounds from block sums reject most
    non-matches cheaply (Σ over a block of (a-b)² ≥ (Σa - Σb)² / block size; 1, then 4, then
    16 blocks), then the exact sum of squares decides. Integer arithmetic, so no bound ever
    rejects a pair that the exact check would accept (an int32 overflow can only let one pass)."""

    def __init__(self, thumbs: np.ndarray, max_rms: float):
        self.t = np.ascontiguousarray(thumbs, dtype=np.uint8)
        n, d = self.t.shape
        self.limit = _max_ss(d, max_rms)
        self.levels = []  # (block sums, pixels per block)
        for blocks in (1, 4, 16):
            if d % blocks == 0:
                sums = self.t.reshape(n, blocks, d // blocks).sum(2, dtype=np.int64)
                self.levels.append((sums.astype(np.int16 if d // blocks * 255 < 2**15 else np.int64), d // blocks))

    def ok(self, q: np.ndarray, c: np.ndarray, batch: int = 1 << 16) -> np.ndarray:
        keep = np.zeros(len(q), bool)
        if self.limit < 0 or len(q) == 0:
            return keep
        alive = np.arange(len(q))
        for sums, size in self.levels:
            x = sums[q[alive]] - sums[c[alive]]
            if x.dtype == np.int16:
                x = x.astype(np.int32)
            alive = alive[np.einsum("ij,ij->i", x, x) <= size * self.limit]
        for s in range(0, len(alive), batch):
            part = alive[s : s + batch]
            x = self.t[q[part]].astype(np.int32) - self.t[c[part]]
            keep[part] = np.einsum("ij,ij->i", x, x) <= self.limit
        return keep


def _spans(lo: np.ndarray, cnt: np.ndarray, limit: int):
    """Yield (query positions, index positions) for the ranges ``lo[i] : lo[i] + cnt[i]``, at
    most ~``limit`` pairs at a time (memory stays bounded in a crowded bucket)."""
    cum = np.cumsum(cnt)
    start = 0
    while start < len(cnt):
        base = cum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(cum, base + limit, "right")))
        c = cnt[start:stop]
        total = int(c.sum())
        if total:
            qpos = np.repeat(np.arange(start, stop), c)
            ipos = np.arange(total) - np.repeat(np.cumsum(c) - c, c) + np.repeat(lo[start:stop], c)
            yield qpos, ipos
        start = stop


def near_duplicates(
    hashes: np.ndarray,
    max_distance: int = 4,
    thumbs: np.ndarray | None = None,
    max_rms: float = 0.01,
    block: int = 1024,
    limit: int = 1 << 21,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """``match[i]``: the earliest kept image that image ``i`` nearly duplicates, -1 if ``i`` is kept.

    ``hashes`` (uint64 pHashes) and ``thumbs`` (``(n, pixels)`` uint8, optional) are in keep order.
    Same result as the reference loop: ``i`` is dropped when it is within ``max_distance`` bits
    (and ``max_rms``) of an image kept before it. ``groups`` (int per image, -1 = none): two images of
    the same group >= 0 (frames of one video) are never compared.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    match = np.full(n, -1, np.int64)
    if n == 0 or max_distance < 0:
        return match
    masks = [np.uint64(((1 << (hi - lo)) - 1) << lo) for lo, hi in _bands(64, max_distance)]
    vals = [h & m for m in masks]  # band values in place: equality and order are all that matter
    check = _Thumbs(thumbs, max_rms) if thumbs is not None else None

    g = None if groups is None else np.asarray(groups, dtype=np.int64)

    def confirm(q: np.ndarray, c: np.ndarray, x: np.ndarray, band: int) -> np.ndarray:
        sel = np.bitwise_count(x) <= max_distance
        if g is not None:
            sel &= (g[q] < 0) | (g[q] != g[c])
        for m in masks[:band]:  # a pair sharing an earlier band was already compared there
            sel &= (x & m) != 0
        if check is not None:
            idx = np.flatnonzero(sel)
            sel[idx] = check.ok(q[idx], c[idx])
        return sel

    index = [(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty(0, np.uint64)) for _ in masks]
    for start in range(0, n, block):
        ids = np.arange(start, min(start + block, n))
        best = np.full(len(ids), n, np.int64)
        # 1. against the images kept in earlier blocks, through each band's sorted index
        for b, (kv, ki, kh) in enumerate(index):
            v = vals[b][ids]
            lo = np.searchsorted(kv, v, "left")
            cnt = np.searchsorted(kv, v, "right") - lo
            for qpos, ipos in _spans(lo, cnt, limit):
                q, c = ids[qpos], ki[ipos]
                sel = confirm(q, c, h[q] ^ kh[ipos], b)
                np.minimum.at(best, qpos[sel], c[sel])
        hit = best < n
        match[ids[hit]] = best[hit]
        # 2. within the block, among the images no earlier one claimed: all pairs, then in keep order
        rest = ids[~hit]
        x = h[rest][:, None] ^ h[rest][None, :]
        close = np.bitwise_count(x) <= max_distance
        if g is not None:
            gr = g[rest]
            close &= (gr[:, None] < 0) | (gr[:, None] != gr[None, :])
        i, j = np.nonzero(np.triu(close, 1))
        if len(i) and check is not None:
            sel = check.ok(rest[i], rest[j])
            i, j = i[sel], j[sel]
        kept = np.ones(len(rest), bool)
        if len(i):
            by_j = np.lexsort((i, j))
            i, j = i[by_j], j[by_j]
            heads = np.flatnonzero(np.r_[True, j[1:] != j[:-1]])
            for s, e in zip(heads, [*heads[1:], len(j)], strict=True):
                earlier = i[s:e][kept[i[s:e]]]
                if len(earlier):
                    kept[j[s]] = False
                    match[rest[j[s]]] = rest[earlier[0]]
        # 3. the block's kept images join the index (after equal values: indices stay sorted)
        new = rest[kept]
        for b, (kv, ki, kh) in enumerate(index):
            v = vals[b][new]
            o = np.argsort(v, kind="stable")
            pos = np.searchsorted(kv, v[o], "right")
            index[b] = (np.insert(kv, pos, v[o]), np.insert(ki, pos, new[o]), np.insert(kh, pos, h[new[o]]))
    return match


def _named(refs: Sequence[str], order: np.ndarray, match: np.ndarray, reason: str) -> dict[str, tuple[str, str]]:
    return {refs[order[p]]: (reason, refs[order[match[p]]]) for p in np.flatnonzero(match >= 0)}


def find_exact_duplicates(
    refs: Sequence[str], pixel_hashes: Sequence[str], ranks: Sequence[int] | None = None
) -> dict[str, tuple[str, str]]:
    """``{ref: ("exact duplicate", kept_ref)}``: every image whose pixels an earlier one in keep order has."""
    order = keep_order(refs, ranks)
    return _named(refs, order, exact_duplicates([pixel_hashes[i] for i in order]), "exact duplicate")


def find_near_duplicates(
    refs: Sequence[str],
    phashes: Sequence[str],
    max_distance: int = 4,
    thumbs: Sequence[bytes] | np.ndarray | None = None,
    max_rms: float = 0.01,
    ranks: Sequence[int] | None = None,
    series: Sequence[str] | None = None,
) -> dict[str, tuple[str, str]]:
    """``{ref: ("near duplicate", kept_ref)}`` among the given images (exact duplicates already removed).
    ``series``: a video frame's video ref ("" for any other image): frames of one video are not compared."""
    order = keep_order(refs, ranks)
    t = None
    if thumbs is not None:
        t = thumbs[order] if isinstance(thumbs, np.ndarray) else _thumb_array([thumbs[i] for i in order])
    groups = None
    if series is not None and any(series):
        ids: dict[str, int] = {}
        groups = np.array([ids.setdefault(series[i], len(ids)) if series[i] else -1 for i in order], np.int64)
    near = near_duplicates(parse_phashes([phashes[i] for i in order]), max_distance, t, max_rms, groups=groups)
    return _named(refs, order, near, "near duplicate")


def find_duplicates(
    refs: Sequence[str],
    pixel_hashes: Sequence[str],
    phashes: Sequence[str],
    max_distance: int = 4,
    thumbs: Sequence[bytes] | np.ndarray | None = None,
    max_rms: float = 0.01,
    ranks: Sequence[int] | None = None,
) -> dict[str, tuple[str, str]]:
    """``{ref: (reason, kept_ref)}`` for every image to drop; all inputs are aligned lists.

    ``reason`` is "exact duplicate" or "near duplicate"; ``ranks`` (the repository's position
    in the config, default all 0) then ``ref`` give the keep order.
    """
    dropped = find_exact_duplicates(refs, pixel_hashes, ranks)
    if max_distance < 0:
        return dropped
    rest = [i for i, r in enumerate(refs) if r not in dropped]
    t = thumbs[rest] if isinstance(thumbs, np.ndarray) else None if thumbs is None else [thumbs[i] for i in rest]
    near = find_near_duplicates(
        [refs[i] for i in rest],
        [phashes[i] for i in rest],
        max_distance,
        t,
        max_rms,
        None if ranks is None else [ranks[i] for i in rest],
    )
    return dropped | near


def near_duplicates_in_files(
    files: list[str],
    ranks: list[int],
    skip: list[str],
    max_distance: int,
    max_rms: float,
    videos: list[bool] | None = None,
) -> dict[str, str]:
    """``{ref: kept_ref}`` among the images of some staging shards (one image type, one Ray task):
    ``ranks`` is each file's repository rank, ``skip`` the refs already dropped as exact duplicates,
    ``videos`` whether a file holds video frames (not compared within their video, by ``series``).
    Reads only the hash columns and returns only the drops, so the driver never holds thumbnails."""
    skipped = set(skip)
    refs, phashes, thumbs, rank, series = [], [], [], [], []
    for k, (f, r) in enumerate(zip(files, ranks, strict=True)):
        video = bool(videos and videos[k])
        columns = ["source_ref", "phash", "thumb", *(["series"] if video else [])]
        t = storage.read_table(storage.path(f), columns=columns)
        values = [t.column(c).to_pylist() for c in columns] + ([] if video else [[""] * t.num_rows])
        for ref, ph, th, se in zip(*values, strict=True):
            if ref not in skipped:
                refs.append(ref)
                phashes.append(ph)
                thumbs.append(th)
                rank.append(r)
                series.append(se)
    found = find_near_duplicates(refs, phashes, max_distance, thumbs, max_rms, rank, series)
    return {ref: kept for ref, (_, kept) in found.items()}


def _thumb_array(thumbs: Sequence[bytes]) -> np.ndarray:
    if not thumbs:
        return np.empty((0, 1), np.uint8)
    return np.frombuffer(b"".join(thumbs), np.uint8).reshape(len(thumbs), -1)
