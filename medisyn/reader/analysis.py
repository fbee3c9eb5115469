"""``medisyn reader analyze|export``: the reader study's numbers, as the paper reports them and more.

From the answers of readers who submitted their study (first showings only, unless said):
accuracy and mean confidence on real vs synthetic images per reader and as mean ± sd across
readers (the paper's table), per class; Fleiss' kappa between readers (statsmodels);
intra-reader agreement on repeated images (share and Cohen's kappa, scikit-learn); accuracy by
position in the reading order (quarters); and a 95% CI for the real − synthetic accuracy
difference from a bootstrap that resamples readers and cases (both vary between studies).
Exports: every answer with its key (``answers.csv``, for the steward, never for readers) and the
long format MRMC tools read (``mrmc.csv``: reader, modality, case, truth, rating). Every text cell
a spreadsheet would run as a formula is neutralised (``csv_safe``); ``analysis.json`` is strict
JSON (an undefined number is ``null`` with a ``*_note`` saying why); every file is 0600.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd

from medisyn.reader import db

log = logging.getLogger("medisyn.reader")

COLUMNS = [
    "study",
    "reader",
    "reader_name",
    "submitted",
    "item",
    "image",
    "showing",
    "origin",
    "truth",
    "answer",
    "correct",
    "confidence",
    "position",
    "first_shown_at",
    "last_edit_at",
    "active_ms",
    "revisions",
]


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Text cells that begin with ``= + - @``, tab or CR get a leading ``'``: a spreadsheet opening
    the CSV shows them as text instead of running them (a reader named ``=HYPERLINK(…)``). Item
    ids are kept as they are, to join back to the database: the database made them from
    ``[A-Za-z0-9_-]``, which spells no formula call, and new ones begin with a letter or digit."""
    out = frame.copy()
    for col in out.columns:
        if col != "item" and (out[col].dtype == object or pd.api.types.is_string_dtype(out[col].dtype)):
            out[col] = out[col].map(lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v)
    return out


def csv_text(frame: pd.DataFrame) -> str:
    """A frame as RFC 4180 CSV (CRLF rows, so a CR or LF inside a cell is quoted and cannot start
    a row of its own), formula cells neutralised."""
    return csv_safe(frame).to_csv(index=False, lineterminator="\r\n")


def strict_json(value):
    """``value`` with every NaN or infinity as None: ``analysis.json`` is shared, and a bare NaN is
    not JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def answers_frame(conn: sqlite3.Connection, study: str | None = None) -> pd.DataFrame:
    """Every answer joined with the key, one row per (reader, item)."""
    rows = conn.execute(
        "SELECT r.study, r.reader_id AS reader, r.name AS reader_name, r.submitted_at IS NOT NULL AS submitted, "
        "a.item_id AS item, i.image_id AS image, t.showing, i.origin, i.truth, a.answer, "
        "a.answer = i.truth AS correct, a.confidence, a.position, a.first_shown_at, a.last_edit_at, a.active_ms, "
        "a.revisions FROM answers a JOIN readers r ON r.reader_id = a.reader_id "
        "JOIN items t ON t.item_id = a.item_id JOIN images i ON i.image_id = t.image_id "
        + ("WHERE r.study = ? " if study else "")
        + "ORDER BY r.study, r.reader_id, a.position",
        (study,) if study else (),
    ).fetchall()
    frame = pd.DataFrame([dict(r) for r in rows], columns=COLUMNS)
    return frame.astype({"submitted": bool, "correct": bool}) if len(frame) else frame


def mrmc_frame(answers: pd.DataFrame) -> pd.DataFrame:
    """The long format of MRMC analysis tools: one row per reader × case (first showings), modality
    real or synthetic, truth the case's class, rating 1 when the reader named it and 0 otherwise
    (percent correct), with the chosen class and the confidence beside it."""
    first = answers[answers["showing"] == 1]
    return pd.DataFrame(
        {
            "reader": first["reader"].to_numpy(),
            "modality": first["origin"].to_numpy(),
            "case": first["image"].to_numpy(),
            "truth": first["truth"].to_numpy(),
            "rating": first["correct"].astype(int).to_numpy(),
            "answer": first["answer"].to_numpy(),
            "confidence": first["confidence"].to_numpy(),
        }
    )


def _mean_sd(values) -> dict:
    v = np.asarray(list(values), dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else float("nan"),
        "sd": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
        "n": int(len(v)),
    }


def fleiss(first: pd.DataFrame, classes: list[str]) -> float:
    """Fleiss' kappa over the cases every reader answered (statsmodels)."""
    from statsmodels.stats.inter_rater import fleiss_kappa

    wide = first.pivot_table(index="image", columns="reader", values="answer", aggfunc="first").dropna()
    if wide.shape[1] < 2 or wide.empty:
        return float("nan")  # analyze writes null with FLEISS_NOTE
    counts = np.stack([(wide.to_numpy() == c).sum(axis=1) for c in classes], axis=1)
    return float(fleiss_kappa(counts, method="fleiss"))


FLEISS_NOTE = "undefined: fewer than two submitted readers answered the same images"
SAME_NOTE = "undefined: the reader gave one answer to every repeated image (no chance agreement to correct)"


def intra_reader(answers: pd.DataFrame) -> dict:
    """Per reader, agreement with themselves on images shown twice: share and Cohen's kappa
    (NaN, with ``kappa_note`` saying why, when the reader gave one answer to every repeat)."""
    from sklearn.metrics import cohen_kappa_score

    out = {}
    for reader, g in answers.groupby("reader"):
        wide = g.pivot_table(index="image", columns="showing", values="answer", aggfunc="first")
        if 2 not in wide.columns:
            continue
        pairs = wide.dropna(subset=[1, 2])
        if pairs.empty:
            continue
        a, b = pairs[1].to_numpy(), pairs[2].to_numpy()
        same = len(set(a) | set(b)) == 1
        out[str(reader)] = {
            "pairs": int(len(pairs)),
            "agreement": float((a == b).mean()),
            "kappa": float("nan") if same else float(cohen_kappa_score(a, b)),
        }
        if same:
            out[str(reader)]["kappa_note"] = SAME_NOTE
    return out


def by_position(first: pd.DataFrame, bins: int = 4) -> list[dict]:
    """Accuracy by where in the reading order an image came (quarters of each reader's order),
    mean ± sd across readers: fatigue or learning shows here."""
    rows = []
    for k in range(bins):
        accs = []
        for _, g in first.groupby("reader"):
            n = g["position"].max() + 1
            part = g[(g["position"] * bins // n) == k]
            if len(part):
                accs.append(part["correct"].mean())
        rows.append({"quarter": k + 1, **_mean_sd(accs)})
    return rows


def bootstrap_difference(first: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Real − synthetic accuracy and its 95% percentile CI, resampling readers and cases (real and
    synthetic cases separately) with replacement: a reader × case accuracy matrix per origin,
    answers missing from it left out of the mean."""
    readers = sorted(first["reader"].unique())
    rng = np.random.default_rng(seed)
    mats = {}
    for origin in ("real", "synthetic"):
        part = first[first["origin"] == origin]
        wide = part.pivot_table(index="reader", columns="image", values="correct", aggfunc="first")
        mats[origin] = wide.reindex(readers).to_numpy(dtype=float)  # NaN where a reader skipped a case
    if any(m.size == 0 for m in mats.values()):
        return {"difference": float("nan"), "lo95": float("nan"), "hi95": float("nan"), "resamples": 0}

    def acc(m, r, c):
        sub = m[np.ix_(r, c)]
        return np.nanmean(sub)

    point = np.nanmean(mats["real"]) - np.nanmean(mats["synthetic"])
    diffs = np.empty(n_resamples)
    for i in range(n_resamples):
        r = rng.integers(0, len(readers), len(readers))
        cr = rng.integers(0, mats["real"].shape[1], mats["real"].shape[1])
        cs = rng.integers(0, mats["synthetic"].shape[1], mats["synthetic"].shape[1])
        diffs[i] = acc(mats["real"], r, cr) - acc(mats["synthetic"], r, cs)
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return {"difference": float(point), "lo95": float(lo), "hi95": float(hi), "resamples": int(n_resamples)}


def summarize(answers: pd.DataFrame, classes: list[str], n_resamples: int = 2000, seed: int = 0) -> dict:
    """The study's numbers from its answers (one study; the rows of submitted readers)."""
    first = answers[answers["showing"] == 1]
    per_reader = {}
    for reader, g in first.groupby("reader"):
        rec = {"name": str(g["reader_name"].iloc[0]), "answered": int(len(g))}
        for origin in ("real", "synthetic"):
            o = g[g["origin"] == origin]
            rec[origin] = {
                "accuracy": float(o["correct"].mean()) if len(o) else float("nan"),
                "confidence": float(o["confidence"].mean()) if len(o) else float("nan"),
                "images": int(len(o)),
                "by_class": {
                    c: float(o[o["truth"] == c]["correct"].mean()) if (o["truth"] == c).any() else float("nan")
                    for c in classes
                },
            }
        per_reader[str(reader)] = rec
    across = {
        origin: {
            "accuracy": _mean_sd(r[origin]["accuracy"] for r in per_reader.values()),
            "confidence": _mean_sd(r[origin]["confidence"] for r in per_reader.values()),
            "by_class": {c: _mean_sd(r[origin]["by_class"][c] for r in per_reader.values()) for c in classes},
        }
        for origin in ("real", "synthetic")
    }
    kappa = fleiss(first, classes)
    return {
        "readers": len(per_reader),
        "per_reader": per_reader,
        "across_readers": across,
        "fleiss_kappa": kappa,
        **({"fleiss_kappa_note": FLEISS_NOTE} if math.isnan(kappa) else {}),
        "intra_reader": intra_reader(answers),
        "by_position": by_position(first),
        "real_minus_synthetic": bootstrap_difference(first, n_resamples, seed),
    }


def figure(summary: dict, study: str, path: Path) -> None:
    """Accuracy on real vs synthetic images per reader (bars) and by reading-order quarter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medisyn.figures import save_png

    readers = list(summary["per_reader"].values())
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    x = np.arange(len(readers))
    for k, origin in enumerate(("real", "synthetic")):
        a.bar(x + (k - 0.5) * 0.38, [100 * r[origin]["accuracy"] for r in readers], 0.38, label=origin)
    a.set_xticks(x, [r["name"] for r in readers], rotation=20, fontsize=8)
    a.set_ylabel("accuracy (%)")
    a.set_ylim(0, 100)
    a.set_title(f"{study}: accuracy per reader")
    a.legend(fontsize=8)
    pos = summary["by_position"]
    b.errorbar(
        [p["quarter"] for p in pos],
        [100 * p["mean"] for p in pos],
        yerr=[100 * p["sd"] if p["sd"] == p["sd"] else 0 for p in pos],
        marker="o",
        capsize=3,
    )
    b.set_xticks([1, 2, 3, 4])
    b.set_xlabel("quarter of the reading order")
    b.set_ylim(0, 105)
    b.set_title("accuracy by position")
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def analyze(reader_dir: Path, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Analyse every study with submitted readers; write ``analysis.json``, CSVs and figures."""
    conn = db.connect(reader_dir)
    try:
        studies = conn.execute("SELECT name, classes FROM studies ORDER BY name").fetchall()
        frames = {s["name"]: answers_frame(conn, s["name"]) for s in studies}
    finally:
        conn.close()
    out = {}
    for s in studies:
        frame = frames[s["name"]]
        done = frame[frame["submitted"]] if len(frame) else frame
        pending = int(frame.loc[~frame["submitted"], "reader"].nunique()) if len(frame) else 0
        if done.empty:
            out[s["name"]] = {"readers": 0, "pending_readers": pending}
            continue
        summary = summarize(done, json.loads(s["classes"]), n_resamples, seed)
        summary["pending_readers"] = pending
        out[s["name"]] = summary
        png = reader_dir / f"{s['name']}-accuracy.png"
        figure(summary, s["name"], png)
        png.chmod(0o600)
    export(reader_dir, frames)
    db.write_private(reader_dir / "analysis.json", json.dumps(strict_json(out), indent=2, allow_nan=False))
    for name, summary in out.items():
        log.info("reader study %s: %s", name, table_line(summary))
    return out


def export(reader_dir: Path, frames: dict[str, pd.DataFrame] | None = None) -> list[Path]:
    """``exports/answers.csv`` (every answer with its key) and ``exports/mrmc.csv`` (submitted readers)."""
    if frames is None:
        conn = db.connect(reader_dir)
        try:
            frames = {"*": answers_frame(conn)}
        finally:
            conn.close()
    frames_list = [f for f in frames.values() if len(f)]
    answers = pd.concat(frames_list) if frames_list else pd.DataFrame(columns=COLUMNS)
    folder = db.private_dir(reader_dir / "exports")
    paths = [folder / "answers.csv", folder / "mrmc.csv"]
    db.write_private(paths[0], csv_text(answers))
    submitted = answers[answers["submitted"].astype(bool)] if len(answers) else answers
    mrmc = mrmc_frame(submitted) if len(submitted) else pd.DataFrame(columns=["reader", "modality", "case"])
    if len(submitted):
        mrmc.insert(0, "study", submitted[submitted["showing"] == 1]["study"].to_numpy())
    db.write_private(paths[1], csv_text(mrmc))
    return paths


def table_line(summary: dict) -> str:
    if not summary.get("readers"):
        return f"no submitted readers yet ({summary.get('pending_readers', 0)} reading)"
    a = summary["across_readers"]

    def fmt(origin):
        acc, conf = a[origin]["accuracy"], a[origin]["confidence"]
        return (
            f"{origin} {100 * acc['mean']:.2f} ± {100 * acc['sd']:.2f}% accuracy, "
            f"confidence {conf['mean']:.2f} ± {conf['sd']:.2f}"
        )

    d = summary["real_minus_synthetic"]
    return (
        f"{summary['readers']} readers; {fmt('real')}; {fmt('synthetic')}; real − synthetic "
        f"{100 * d['difference']:+.1f} points (95% CI {100 * d['lo95']:+.1f}, {100 * d['hi95']:+.1f})"
    )
