"""The audits' statistics: memorization tails (below) and utility AUROC bootstraps (further down).

At n ≥ 1,000 pairs the one-sided Wilcoxon p-value that distances exceed 0.15 is always tiny,
so the audit also reports the tail: the count at or below the threshold with its exact
(Clopper–Pearson) 95% upper bound, the minimum and the 1st percentile.
"""

from __future__ import annotations

import numpy as np


def wilcoxon_above(d: np.ndarray, threshold: float = 0.15) -> float:
    """One-sided Wilcoxon signed-rank p-value for H1: the distances' median is above ``threshold``."""
    from scipy.stats import wilcoxon

    d = np.asarray(d, dtype=np.float64)
    if len(d) == 0 or np.all(d == threshold):
        return float("nan")
    return float(wilcoxon(d - threshold, alternative="greater", zero_method="wilcox").pvalue)


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper bound on a rate after ``k`` events in ``n`` trials (k = 0 gives ≈ 3/n)."""
    from scipy.stats import beta

    if n == 0:
        return float("nan")
    if k >= n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


def tail_summary(d: np.ndarray, threshold: float = 0.15) -> dict:
    """Table 1's numbers plus the tail: mean ± sd, pairs, pairs ≤ threshold (% and 95% upper bound),
    minimum, 1st percentile and the Wilcoxon p-value."""
    d = np.asarray(d, dtype=np.float64)
    n = len(d)
    k = int((d <= threshold).sum())
    return {
        "pairs": n,
        "mean": float(d.mean()) if n else float("nan"),
        "sd": float(d.std(ddof=1)) if n > 1 else float("nan"),
        "flagged": k,
        "flagged_pct": 100.0 * k / n if n else float("nan"),
        "flagged_rate_upper95": clopper_pearson_upper(k, n),
        "min": float(d.min()) if n else float("nan"),
        "p1": float(np.percentile(d, 1)) if n else float("nan"),
        "wilcoxon_p_above": wilcoxon_above(d, threshold),
    }


def closer_than_control(synthetic: np.ndarray, control: np.ndarray) -> float:
    """One-sided Mann–Whitney p-value for H1: synthetic images are closer to train than the
    control (held-out real images) is. A small value means the model copies more than chance."""
    from scipy.stats import mannwhitneyu

    if len(synthetic) == 0 or len(control) == 0:
        return float("nan")
    return float(mannwhitneyu(synthetic, control, alternative="less").pvalue)


# --- the utility audit: AUROC, paired bootstrap, two-level bootstrap, DeLong ---
#
# Scores and truths are [n, C] arrays: an indicator matrix for multi-label tasks and a one-hot
# matrix for multi-class ones (macro AUROC one-vs-rest is then the mean of the per-column
# AUROCs, exactly what scikit-learn's ``multi_class="ovr", average="macro"`` computes). Each
# resample's AUROC is the Mann–Whitney statistic with ties counted half (the trapezoidal ROC
# area scikit-learn integrates), counted from the draws with one bincount per column instead of
# one scikit-learn call per resample.


def indicator(y, n_classes: int | None = None) -> np.ndarray:
    """Class indices [n] or an indicator matrix [n, C] -> a boolean [n, C] matrix."""
    y = np.asarray(y)
    if y.ndim == 2:
        return y.astype(bool)
    n_classes = int(y.max()) + 1 if n_classes is None else n_classes
    out = np.zeros((len(y), n_classes), dtype=bool)
    out[np.arange(len(y)), y.astype(int)] = True
    return out


def per_class_auroc(y, scores) -> np.ndarray:
    """[C] AUROC of each column one-vs-rest (NaN where a column lacks positives or negatives)."""
    y, scores = indicator(y, np.shape(scores)[1]), np.asarray(scores, dtype=np.float64)
    return _aurocs(np.ones((len(y), 1), dtype=np.int32), y, scores)[0]


def macro_auroc(y, scores) -> float:
    """Mean AUROC over the classes that have both positives and negatives."""
    auc = per_class_auroc(y, scores)
    return float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")


def _draw_counts(idx: np.ndarray) -> np.ndarray:
    """Resampled indices [R, n] -> counts [n, R] of how often each case is in each resample."""
    r, n = idx.shape
    counts = np.bincount((idx + (np.arange(r) * n)[:, None]).ravel(), minlength=r * n)
    return np.ascontiguousarray(counts.reshape(r, n).T.astype(np.int32))


def _aurocs(counts: np.ndarray, y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """[R, C] AUROCs of the resamples given as ``counts`` [n, R] (NaN where one lacks a class).

    Per column
    the cases are sorted by score, a running sum over the sorted negatives gives every case the
    weight of negatives ranked below it (ties: half of its own group), and the Mann–Whitney sum
    is taken in integers, so the result is exact and never depends on the order of the draws."""
    n, r = counts.shape
    out = np.full((r, y.shape[1]), np.nan)
    for c in range(y.shape[1]):
        order = np.argsort(scores[:, c], kind="stable")
        s, pos = scores[order, c], y[order, c]
        w = counts[order]
        neg_cum = np.cumsum(w * ~pos[:, None], axis=0, dtype=np.int32)  # negatives at or below each row
        new_group = np.r_[True, s[1:] != s[:-1]]
        first = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))  # first row of each tie group
        last = np.r_[np.flatnonzero(new_group)[1:] - 1, n - 1][np.cumsum(new_group) - 1]  # its last row
        rows = np.flatnonzero(pos)
        below_first = neg_cum[first[rows] - 1]
        below_first[first[rows] == 0] = 0  # nothing is below the lowest group (row -1 wrapped)
        twice = (w[rows].astype(np.int64) * (below_first + neg_cum[last[rows]])).sum(axis=0)
        n_pos = w[rows].sum(axis=0, dtype=np.int64)
        n_neg = neg_cum[-1].astype(np.int64)
        ok = (n_pos > 0) & (n_neg > 0)
        out[ok, c] = twice[ok] / (2.0 * n_pos[ok] * n_neg[ok])
    return out


def strata(y) -> np.ndarray:
    """A stratum per row: the class (one-hot rows) or the label combination (multi-label), shared
    by the arms' class matching and the stratified bootstrap."""
    return np.unique(indicator(y), axis=0, return_inverse=True)[1].reshape(-1)


def resample_indices(y, n_resamples: int, seed: int = 0, stratified: bool = False) -> np.ndarray:
    """[R, n] bootstrap draws of test-case indices from ``np.random.default_rng(seed)``.

    Stratified: each resample keeps every stratum's size (a multi-class task's classes, a
    multi-label task's label combinations), so no resample misses a class the test set has."""
    n = len(y)
    rng = np.random.default_rng(seed)
    if not stratified:
        return rng.integers(0, n, size=(n_resamples, n))
    groups = strata(y)  # class indices and one-hot rows give the same strata, so the same draws
    out = np.empty((n_resamples, n), dtype=np.int64)
    for k in range(groups.max() + 1):
        members = np.flatnonzero(groups == k)
        out[:, members] = members[rng.integers(0, len(members), size=(n_resamples, len(members)))]
    return out


def bootstrap_aurocs(
    y, scores: dict[str, np.ndarray], n_resamples: int = 2000, seed: int = 0, stratified: bool = False, chunk: int = 128
) -> dict:
    """Macro AUROC of every scorer on the same paired resamples of the test set.

    Returns ``{"full": {name: AUROC on the whole test set}, "samples": {name: [R'] macro
    AUROCs}, "resamples": R, "dropped": resamples left out because a class lost all its
    positives or negatives (the CI is then conditional on every class being present)}``."""
    first = next(iter(scores.values()))
    y = indicator(y, np.shape(first)[1])
    idx = resample_indices(y, n_resamples, seed, stratified)
    samples = {name: [] for name in scores}
    valid_all = []
    for start in range(0, n_resamples, chunk):
        counts = _draw_counts(idx[start : start + chunk])  # shared by every scorer: the resamples are paired
        per = {name: _aurocs(counts, y, np.asarray(s, dtype=np.float64)) for name, s in scores.items()}
        valid = np.isfinite(next(iter(per.values()))).all(axis=1)
        valid_all.append(valid)
        for name, auc in per.items():
            samples[name].append(auc[valid].mean(axis=1))
    valid_all = np.concatenate(valid_all)
    return {
        "full": {name: macro_auroc(y, s) for name, s in scores.items()},
        "samples": {name: np.concatenate(v) for name, v in samples.items()},
        "resamples": n_resamples,
        "dropped": int((~valid_all).sum()),
    }


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    if len(samples) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def bootstrap_auroc_diff(
    y_true, scores_a, scores_b, n_resamples: int = 2000, seed: int = 0, multilabel: bool = False, stratified=False
) -> tuple[float, float, float]:
    """(AUROC(a) − AUROC(b) on the whole test set, 95% percentile CI from paired resamples).

    ``y_true``: class indices [n] (multi-class) or an indicator matrix [n, C] (``multilabel``);
    scores: [n, C]. Macro AUROC one-vs-rest per class or per label (DESIGN §5)."""
    y_true = np.asarray(y_true)
    if multilabel and y_true.ndim != 2:
        raise ValueError("bootstrap_auroc_diff: multilabel needs an [n, C] indicator matrix of truths")
    res = bootstrap_aurocs(y_true, {"a": scores_a, "b": scores_b}, n_resamples, seed, stratified)
    diff = res["samples"]["a"] - res["samples"]["b"]
    lo, hi = percentile_ci(diff)
    return res["full"]["a"] - res["full"]["b"], lo, hi


def two_level_bootstrap_diff(
    y, scores_a: list[np.ndarray], scores_b: list[np.ndarray], n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Seed × test-case bootstrap of the mean AUROC difference over paired seeds.

    Each resample draws seeds with replacement and test cases with replacement, so the CI
    carries both the training-run variance (subset draw, initialisation, data order) and the
    test-set variance that the paper's single-run CI alone reflects."""
    k = len(scores_a)
    if k != len(scores_b) or k == 0:
        raise ValueError("two_level_bootstrap_diff: need the same number (>= 1) of seeds for both arms")
    y = indicator(y, np.shape(scores_a[0])[1])
    res = bootstrap_aurocs(
        y,
        {f"a{i}": s for i, s in enumerate(scores_a)} | {f"b{i}": s for i, s in enumerate(scores_b)},
        n_resamples,
        seed,
    )
    d = np.stack([res["samples"][f"a{i}"] - res["samples"][f"b{i}"] for i in range(k)], axis=1)  # [R', k]
    pick = np.random.default_rng([seed, 1]).integers(0, k, size=d.shape)
    lo, hi = percentile_ci(np.take_along_axis(d, pick, axis=1).mean(axis=1))
    full = np.mean([res["full"][f"a{i}"] - res["full"][f"b{i}"] for i in range(k)])
    return float(full), lo, hi


def delong_diff(y_bin, scores_a, scores_b) -> dict:
    """DeLong's test for two correlated AUROCs on one binary truth (fast midrank form,
    Sun & Xu 2014): the difference, its standard error, a 95% normal CI and a two-sided p."""
    from scipy.stats import norm, rankdata

    y_bin = np.asarray(y_bin).astype(bool)
    m, n = int(y_bin.sum()), int((~y_bin).sum())
    if m == 0 or n == 0:
        return {"diff": float("nan"), "se": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan")}
    aucs, v10, v01 = [], [], []
    for s in (np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)):
        x, yneg = s[y_bin], s[~y_bin]
        tx, ty, tz = rankdata(x), rankdata(yneg), rankdata(np.r_[x, yneg])
        aucs.append((tz[:m].sum() / m - (m + 1) / 2) / n)
        v10.append((tz[:m] - tx) / n)
        v01.append(1 - (tz[m:] - ty) / m)
    s10, s01 = np.cov(np.stack(v10)), np.cov(np.stack(v01))
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / m + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / n
    diff, se = aucs[0] - aucs[1], float(np.sqrt(max(var, 0.0)))
    z = diff / se if se > 0 else 0.0
    return {
        "diff": float(diff),
        "se": se,
        "lo": float(diff - 1.959964 * se),
        "hi": float(diff + 1.959964 * se),
        "p": float(2 * norm.sf(abs(z))) if se > 0 else 1.0,
    }
