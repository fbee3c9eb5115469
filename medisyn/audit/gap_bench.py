"""``medisyn bench guidance-gap``: how well each memorization signal separates a memorising run's images.

Reads one set's manifest in two run directories (``--memorized``: e.g. ``make demo-memorize``'s run,
``--normal``: the normal demo's) and prints the AUROC of the guidance gap (manifest ``guidance_gap``,
higher = more memorised) for telling the first run's images from the second's, with n of each; and
the same for the memorization audit's patch distance (lower = closer to a train image, so its
negation is scored) where both runs have ``audit/memorization/pairs.parquet`` for the set. Images
without a value (a set made before the gap, or unguided) are left out and counted.
"""

from __future__ import annotations

import numpy as np

from medisyn import storage
from medisyn.records import read_manifest


def separation(memorized: list[float | None], normal: list[float | None], name: str) -> dict:
    """AUROC of ``memorized`` values above ``normal`` ones (None / NaN left out); None when a side is empty."""
    from sklearn.metrics import roc_auc_score

    def known(values):
        v = np.asarray([np.nan if x is None else x for x in values], dtype=float)
        return v[np.isfinite(v)]

    a, b = known(memorized), known(normal)
    auroc = None
    if len(a) and len(b):
        y = np.r_[np.ones(len(a)), np.zeros(len(b))]
        auroc = float(roc_auc_score(y, np.r_[a, b]))
    return {
        "signal": name,
        "auroc": auroc,
        "n_memorized": int(len(a)),
        "n_normal": int(len(b)),
        "left_out": int(len(memorized) - len(a) + len(normal) - len(b)),
    }


def _distances(run: str, set_name: str) -> list[float] | None:
    pairs = storage.path(run) / "audit" / "memorization" / "pairs.parquet"
    if not pairs.is_file():
        return None
    t = storage.read_table(pairs, columns=["kind", "distance"]).to_pylist()
    found = [-p["distance"] for p in t if p["kind"] == f"synthetic:{set_name}"]  # closer = more memorised
    return found or None


def run(memorized: str, normal: str, set_name: str = "memorization") -> dict:
    """Both signals' AUROC for ``set_name`` in the two run directories; printed and returned."""
    gaps = [
        read_manifest(storage.path(r) / "synthetic" / set_name, ["guidance_gap"]).column("guidance_gap").to_pylist()
        for r in (memorized, normal)
    ]
    results = [separation(*gaps, "guidance_gap")]
    dist = [_distances(r, set_name) for r in (memorized, normal)]
    if all(d is not None for d in dist):
        results.append(separation(*dist, "patch distance (negated)"))
    print(f"bench guidance-gap: set {set_name!r}, memorised run {memorized} against normal run {normal}")
    for r in results:
        auroc = "n/a" if r["auroc"] is None else f"{r['auroc']:.3f}"
        print(
            f"  {r['signal']:<26} AUROC {auroc}   n memorised {r['n_memorized']}, n normal {r['n_normal']}"
            + (f", {r['left_out']} without a value left out" if r["left_out"] else "")
        )
    if len(results) == 1:
        print("  patch distance: not measured (a run has no audit/memorization/pairs.parquet for this set)")
    return {"set": set_name, "results": results}
