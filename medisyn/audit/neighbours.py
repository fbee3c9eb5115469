"""Exact nearest neighbours and the patch distance: the two measurements of the memorization audit.

Search is exact inner product (the embeddings are unit length, so cosine) by blocked matrix
products: the real side arrives in shards, each shard's top-k is merged into a running top-k,
so no step holds more than one shard of a group's real embeddings. No approximate index is
used (none is offered until its recall can be measured per run).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def patch_distance(a: np.ndarray, b: np.ndarray, grid: int = 4) -> float:
    """Max over a grid×grid of non-overlapping patches of ‖P_a − P_b‖₂ / sqrt(255² · N).

    ``a`` and ``b`` are uint8 arrays of one shape (H×W or H×W×C); N is the number of values in a
    patch, so each patch term (and the result) is in [0, 1]: 0 for identical images, 1 for black
    against white. Pixels beyond the last full patch (H or W not divisible by ``grid``) are
    ignored, as non-overlapping patches leave them out.
    """
    if a.shape != b.shape:
        raise ValueError(f"patch_distance: shapes differ: {a.shape} vs {b.shape}")
    h, w = a.shape[0] // grid, a.shape[1] // grid
    if h == 0 or w == 0:
        raise ValueError(f"patch_distance: a {a.shape} image has no {grid}x{grid} grid of patches")
    diff = a[: h * grid, : w * grid].astype(np.float64) - b[: h * grid, : w * grid].astype(np.float64)
    diff = diff.reshape(grid, h, grid, w, -1)
    per_patch = np.sqrt((diff**2).sum(axis=(1, 3, 4)))  # [grid, grid]
    n = h * w * diff.shape[-1]
    return float(per_patch.max() / np.sqrt(255.0**2 * n))


def topk_search(
    queries: np.ndarray,
    key_shards: Iterable[tuple[int, np.ndarray]],
    k: int,
    exclude: np.ndarray | None = None,
    block: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products of each query over all keys, streamed shard by shard.

    ``key_shards`` yields (offset of the shard's first key, [n_i, d] float32). ``exclude[i]`` is
    a key index query i must not match (itself, for a leave-one-out control; -1 = none).
    Returns (scores [q, k'], indices [q, k']) sorted by descending score, k' = min(k, #keys);
    ties are broken by the lower key index, so sharding never changes the answer.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(q), 0), dtype=np.int64)
    for offset, shard in key_shards:
        shard = np.ascontiguousarray(shard, dtype=np.float32)
        for start in range(0, len(shard), block):
            keys = shard[start : start + block]
            scores = q @ keys.T  # [q, b]
            if exclude is not None:
                local = exclude - (offset + start)
                rows = np.flatnonzero((local >= 0) & (local < len(keys)))
                scores[rows, local[rows]] = -np.inf
            s, i = _block_topk(scores, k)
            s = np.concatenate([best_s, s], axis=1)
            i = np.concatenate([best_i, i + (offset + start)], axis=1)
            keep = min(k, s.shape[1])
            order = np.lexsort((i, -s), axis=1)[:, :keep]  # score descending, then index ascending
            best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_s, best_i


def _block_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best (score, column), ties at the boundary resolved to the lowest columns.

    ``argpartition`` is linear in the block, where sorting whole rows was not; it may pick any of
    several equal scores at the k-th place, so rows with such a tie are redone exactly."""
    n = scores.shape[1]
    if k == 1:  # argmax returns the first (lowest) column of the maximum
        i = scores.argmax(axis=1)[:, None]
        return np.take_along_axis(scores, i, 1), i
    if k >= n:
        i = np.broadcast_to(np.arange(n), scores.shape)
        return scores, i
    i = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(scores, i, 1)
    kth = s.min(axis=1)
    ties = (scores == kth[:, None]).sum(axis=1) > (s == kth[:, None]).sum(axis=1)  # more equal scores than slots
    for r in np.flatnonzero(ties):
        exact = np.lexsort((np.arange(n), -scores[r]))[:k]
        i[r], s[r] = exact, scores[r, exact]
    return s, i


def shards(keys: np.ndarray, size: int) -> Iterable[tuple[int, np.ndarray]]:
    """An in-memory key matrix as (offset, shard) pairs: what ``topk_search`` streams."""
    for start in range(0, len(keys), size):
        yield start, keys[start : start + size]
