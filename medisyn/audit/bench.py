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
