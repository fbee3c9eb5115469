"""The memorization audit's statistics: the paper's test, and what a p-value cannot say.

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
