"""``medisyn bench bootstrap`` and ``medisyn bench classifier``: the utility audit's two costs.

bootstrap: 2,000 paired resamples of macro AUROC on a 5,500 × 4 multi-label test set (the
size of the paper's chest X-ray test set), the vectorised ``bootstrap_aurocs`` against a plain
scikit-learn loop over the same resample indices, in this process; prints both times, the
ratio, and the largest difference between the two sets of estimates (0 up to rounding).

classifier: training images/s of one utility trial's ResNet (``fit``'s own loop: channels-last,
bf16 autocast on CUDA) on random images, after one warm-up epoch.
"""

from __future__ import annotations

import time

import numpy as np


def bootstrap(resamples: int = 2000, n: int = 5500, classes: int = 4, loop_resamples: int = 0) -> dict:
    from sklearn.metrics import roc_auc_score

    from medisyn.audit.stats import bootstrap_aurocs, resample_indices

    rng = np.random.default_rng(0)
    y = rng.random((n, classes)) < 0.3
    scores = {arm: np.round(y * (0.2 + 0.2 * i) + rng.random((n, classes)), 3) for i, arm in enumerate("abcd")}
    pair = {k: scores[k] for k in ("a", "b")}
    start = time.perf_counter()
    fast = bootstrap_aurocs(y, pair, resamples, seed=0)
    t_fast = time.perf_counter() - start
    loop_n = loop_resamples or resamples
    start = time.perf_counter()
    idx = resample_indices(y, resamples, seed=0)[:loop_n]
    ref = np.array([[roc_auc_score(y[i], pair[k][i], average="macro") for k in pair] for i in idx])
    t_loop = (time.perf_counter() - start) * resamples / loop_n  # scaled when the loop ran fewer
    diff = float(np.abs(ref - np.stack([fast["samples"][k][:loop_n] for k in pair], axis=1)).max())
    start = time.perf_counter()
    bootstrap_aurocs(y, scores, resamples, seed=0)  # all four arms of a task on the same resamples
    t_four = time.perf_counter() - start
    print(f"bench bootstrap: {resamples} paired resamples of macro AUROC, {n} x {classes} multi-label, 2 scorers")
    print(
        f"  scikit-learn loop      {t_loop:8.2f} s" + (f"  (timed on {loop_n}, scaled)" if loop_n < resamples else "")
    )
    print(f"  vectorised             {t_fast:8.2f} s   {t_loop / t_fast:6.1f}x   max |difference| {diff:.1e}")
    print(f"  vectorised, 4 scorers  {t_four:8.2f} s   (the audit's four arms on one set of resamples)")
    return {"loop_s": t_loop, "vectorised_s": t_fast, "ratio": t_loop / t_fast, "max_diff": diff, "four_s": t_four}


def classifier(arch: str = "resnet50", image_size: int = 0, batch: int = 0, steps: int = 0) -> dict:
    import torch

    from medisyn.audit.classifier import FitSettings, fit

    cuda = torch.cuda.is_available()
    image_size = image_size or (224 if cuda else 64)
    batch = batch or (256 if cuda else 16)
    steps = steps or (40 if cuda else 6)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (batch * steps, image_size, image_size, 3), dtype=np.uint8)
    y = np.eye(4, dtype=bool)[rng.integers(0, 4, len(x))]
    tiny = (x[:8], y[:8])
    s = FitSettings(arch=arch, num_classes=4, epochs=1, batch_size=batch, device="cuda" if cuda else "cpu")
    fit((x[: batch * 2], y[: batch * 2]), tiny, tiny, s)  # warm-up: kernels, allocator
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fit((x, y), tiny, tiny, s)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rate = len(x) / seconds
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench classifier: {arch} at {image_size}², batch {batch}, {steps} steps on {where}")
    print(f"  training {rate:8.1f} images/s" + ("  (bf16 autocast, channels-last)" if cuda else ""))
    return {"arch": arch, "image_size": image_size, "batch": batch, "images_per_s": rate}


# The paper's pairs by image type (DESIGN §2): the share of each search group at 1M images.
PAPER_IMAGE_TYPES = (193_080, 254_921, 3_064, 10_692, 415_549, 193_675, 38_788, 121_958, 29_002, 17_233)


def search(n_real: int = 100_000, n_queries: int = 10_000, dim: int = 512, pairs: int = 200) -> dict:
    """``medisyn bench audit``: exact top-1 of ``n_queries`` against ``n_real`` unit vectors by
    ``topk_search`` and by ``faiss.IndexFlatIP`` (same process, same threads), the patch
    distances of the re-ranking, and the projection to 1M real × 10,000 synthetic."""
    import faiss

    from medisyn.audit.neighbours import patch_distance, shards, topk_search

    rng = np.random.default_rng(0)
    real = rng.standard_normal((n_real, dim), dtype=np.float32)
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    queries = real[rng.choice(n_real, n_queries, replace=False)] + 0.05 * rng.standard_normal(
        (n_queries, dim), dtype=np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    start = time.perf_counter()
    index = faiss.IndexFlatIP(dim)
    index.add(real)
    f_scores, f_idx = index.search(queries, 1)
    t_faiss = time.perf_counter() - start
    start = time.perf_counter()
    o_scores, o_idx = topk_search(queries, shards(real, 65536), 1)
    t_ours = time.perf_counter() - start
    same = (o_idx[:, 0] == f_idx[:, 0]) | (np.abs(o_scores[:, 0] - f_scores[:, 0]) < 1e-6)  # ties within 1e-6

    a = rng.integers(0, 256, (pairs, 512, 512, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (pairs, 512, 512, 3), dtype=np.uint8)
    start = time.perf_counter()
    for x, y in zip(a, b, strict=True):
        patch_distance(x, y)
    per_pair = (time.perf_counter() - start) / pairs

    flops = 2.0 * n_real * n_queries * dim
    shares = np.asarray(PAPER_IMAGE_TYPES, dtype=np.float64) / sum(PAPER_IMAGE_TYPES)
    scale = (1_000_000 * 10_000) / (n_real * n_queries)
    flat, grouped = t_ours * scale, t_ours * scale * float((shares**2).sum())
    print(f"bench audit: exact top-1, {n_queries:,} queries x {n_real:,} real, {dim}-d, float32, in this process")
    print(f"  faiss.IndexFlatIP      {t_faiss:8.2f} s   {flops / t_faiss / 1e9:6.1f} GFLOP/s")
    print(
        f"  topk_search (sharded)  {t_ours:8.2f} s   {flops / t_ours / 1e9:6.1f} GFLOP/s   {t_faiss / t_ours:5.1f}x   "
        f"same neighbour: {same.mean():.2%}"
    )
    print(
        f"  patch distance 512²    {per_pair * 1e3:8.2f} ms per pair; the audit's k = 50 candidates per query: "
        f"{per_pair * 50 * 10_000 / 60:.1f} min per 10,000 synthetic images (one core)"
    )
    print(
        f"  projected search, 1M real x 10,000 synthetic: {flat / 60:.1f} min as one group, {grouped / 60:.1f} min "
        "searched by image type (the paper's mix)"
    )
    return {
        "faiss_s": t_faiss,
        "search_s": t_ours,
        "ratio": t_faiss / t_ours,
        "same": float(same.mean()),
        "patch_ms": per_pair * 1e3,
        "projected_1m_grouped_s": grouped,
    }
