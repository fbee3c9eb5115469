"""``medisyn bench listing``: the catalog's listing step against the old-format listing, same files.

A CheXpert-like repository is made here (no download): ``rows`` empty files in CheXpert's layout
(``CheXpert-v1.0-small/{train,valid}/patientNNNNN/studyK/viewJ_{frontal,lateral}.jpg``) and its
``train.csv`` / ``valid.csv`` with CheXpert's verbatim header, roughly CheXpert's mix of views (85%
frontal: AP 85%, PA 15%) and of 1.0 / 0.0 / -1.0 / blank per finding column. The catalog side is
the shipped ``chexpert`` entry of ``jobs/configs/sources/paper.yaml`` through ``steps.list_entry``;
the old side an equivalent ``RepositoryConfig`` through ``listing.list_repository`` on the same files
and label rows (one table: both CSVs' rows, with the explicit patient id column the old format needs).
Each is timed whole (glob, table read, matching, labels, groups, split, captions; no pixel is read),
in this process, after an untimed glob that warms the file system's cache for both. The old format
has no filters, so it also lists the lateral and PA views the entry leaves out: the check is that
the catalog's items are exactly the old listing's items of AP frontal rows.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medisyn import storage
from medisyn.configtools import ConfigError
from medisyn.ingest.config import IngestConfig, RepositoryConfig
from medisyn.ingest.describe import SourceEntry, load_catalog
from medisyn.ingest.listing import glob_files, list_repository
from medisyn.ingest.steps import list_entry

HEADER = (  # train.csv / valid.csv of CheXpert-v1.0-small, verbatim
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,"
    "Support Devices"
).split(",")
# (P[1.0], P[0.0], P[-1.0]) per finding column, the rest blank: about train.csv's frequencies
MIX = {
    "Enlarged Cardiomediastinum": (0.05, 0.10, 0.06),
    "Cardiomegaly": (0.12, 0.05, 0.04),
    "Lung Opacity": (0.47, 0.03, 0.03),
    "Lung Lesion": (0.04, 0.01, 0.01),
    "Edema": (0.23, 0.09, 0.06),
    "Consolidation": (0.07, 0.13, 0.12),
    "Pneumonia": (0.03, 0.01, 0.08),
    "Atelectasis": (0.15, 0.01, 0.15),
    "Pneumothorax": (0.09, 0.25, 0.01),
    "Pleural Effusion": (0.39, 0.16, 0.05),
    "Pleural Other": (0.02, 0.00, 0.01),
    "Fracture": (0.04, 0.01, 0.00),
    "Support Devices": (0.52, 0.03, 0.01),
}
TOP = "CheXpert-v1.0-small"
OLD_CSV = "labels-old.csv"  # the old format's one table, beside the top folder


def _views(n: int, rng: np.random.Generator) -> list[tuple[int, int, int, bool]]:
    """(patient, study, view, frontal) of ``n`` images: ~2.6 studies a patient, 30% of studies with a
    second view (lateral two times in three), as CheXpert's 3.5 images a patient and 15% laterals."""
    out, patient = [], 0
    while len(out) < n:
        patient += 1
        for study in range(1, 1 + int(rng.geometric(0.38))):
            out.append((patient, study, 1, True))
            if rng.random() < 0.3:
                out.append((patient, study, 2, bool(rng.random() < 0.35)))
    return out[:n]


def chexpert_tables(n: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, valid rows) of ``n`` images in all: the last patients (>= n/1000 images) are valid,
    numbered after train's as in CheXpert, with 0.0/1.0 labels as valid.csv has."""
    rng = np.random.default_rng(seed)
    views = _views(n, rng)
    last = views[n - max(1, n // 1000)][0]
    valid = np.array([p >= last for p, _, _, _ in views])
    frontal = np.array([f for _, _, _, f in views])
    paths = [
        f"{TOP}/{'valid' if p >= last else 'train'}/patient{p:05d}/study{s}/view{v}_{'frontal' if f else 'lateral'}.jpg"
        for p, s, v, f in views
    ]
    view = rng.choice(["AP", "PA", "LL"], n, p=[0.846, 0.1539, 0.0001])
    cols = {
        "Path": paths,
        "Sex": rng.choice(["Male", "Female", "Unknown"], n, p=[0.59, 0.4099, 0.0001]),
        "Age": rng.integers(18, 91, n).astype(str),
        "Frontal/Lateral": np.where(frontal, "Frontal", "Lateral"),
        "AP/PA": np.where(frontal, view, ""),
        "No Finding": np.where(rng.random(n) < 0.10, "1.0", ""),
    }
    for column, (pos, neg, unc) in MIX.items():
        cols[column] = rng.choice(["1.0", "0.0", "-1.0", ""], n, p=[pos, neg, unc, 1 - pos - neg - unc])
    for column in ("No Finding", *MIX):
        cols[column] = np.where(valid & (cols[column] != "1.0"), "0.0", cols[column])
    table = pd.DataFrame(cols)[HEADER]
    return table[~valid].reset_index(drop=True), table[valid].reset_index(drop=True)


def make_repository(folder: Path, n: int, seed: int = 0) -> tuple[Path, bool]:
    """``folder/chexpert`` with the files and tables of ``n`` images, written once: a folder this
    function made for the same ``n`` and ``seed`` is reused. Returns (the repository root, made now)."""
    root, marker = folder / "chexpert", folder / "bench-listing.json"
    want = {"rows": n, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == want and root.is_dir():
        return root, False
    if root.exists():
        if not marker.is_file():
            raise ConfigError(f"bench listing: {folder}/chexpert exists and was not made by this bench")
        shutil.rmtree(root)
    train, valid = chexpert_tables(n, seed)
    (root / TOP).mkdir(parents=True)
    paths = [*train["Path"], *valid["Path"]]
    for d in dict.fromkeys(p.rpartition("/")[0] for p in paths):
        (root / d).mkdir(parents=True)
    for p in paths:
        (root / p).touch()
    train.to_csv(root / TOP / "train.csv", index=False)
    valid.to_csv(root / TOP / "valid.csv", index=False)
    both = pd.concat([train, valid], ignore_index=True)
    both.assign(Patient=both["Path"].str.extract(r"patient(\d+)", expand=False)).to_csv(root / OLD_CSV, index=False)
    marker.write_text(json.dumps(want))
    return root, True


def old_config(entry: SourceEntry, root: Path) -> RepositoryConfig:
    """The catalog entry in the old format: its glob, finding columns, classes and caption, with the
    patient column (the entry's ``patient(\\d+)`` group, written out) and one table of all rows."""
    return RepositoryConfig(
        name=entry.name,
        kind="image",
        path=str(root),
        glob=entry.files.glob,
        labels_csv=OLD_CSV,
        path_column="Path",
        label_columns=tuple(entry.label.columns),
        patient_column="Patient",
        template=entry.caption,
        specialty=entry.specialty,
        image_type=entry.image_type,
        classes=dict(entry.label.classes),
    )


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(rows: int = 100_000, folder: str = "", seed: int = 0, repeats: int = 1) -> dict:
    """Times both listings (best of ``repeats``, alternating) and checks they agree; returns the figures."""
    entry = next(e for e in load_catalog("paper") if e.name == "chexpert")
    cfg = IngestConfig()
    tmp = None if folder else tempfile.mkdtemp(prefix="medisyn-bench-listing-")
    try:
        base = Path(folder or tmp)
        start = time.perf_counter()
        root, made = make_repository(base, rows, seed)
        made_s = time.perf_counter() - start
        repo = old_config(entry, root)
        glob_s, found = _timed(lambda: glob_files(storage.path(root), entry.files.glob))  # warms the cache for both
        assert len(found) == rows, (len(found), rows)
        new_s = old_s = float("inf")
        for _ in range(max(1, repeats)):
            t, (old_items, _, old_map) = _timed(lambda: list_repository(repo, root, cfg))
            old_s = min(old_s, t)
            t, listing = _timed(lambda: list_entry(entry, root, cfg))
            new_s = min(new_s, t)
        table = pd.read_csv(root / OLD_CSV, dtype=str, keep_default_na=False)
        ap = set(table["Path"][(table["Frontal/Lateral"] == "Frontal") & (table["AP/PA"] == "AP")])
        expected = [i for i in old_items if old_map[i.ref] in ap]
        same = listing.items == expected
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "rows": rows,
        "make_s": made_s,
        "glob_s": glob_s,
        "catalog_s": new_s,
        "old_s": old_s,
        "catalog_rows_per_s": rows / new_s,
        "old_rows_per_s": rows / old_s,
        "ratio": old_s / new_s,
        "catalog_items": len(listing.items),
        "old_items": len(old_items),
        "same": same,
    }
    print(
        f"bench listing: {rows:,} CheXpert-like files and label rows "
        f"({'made' if made else 'reused'} in {made_s:.1f} s); the glob alone {glob_s:.2f} s; "
        f"best of {max(1, repeats)}"
    )
    print(f"{'listing':34s} {'seconds':>8s} {'rows/s':>10s} {'items':>8s}")
    print(f"{'catalog (steps.list_entry)':34s} {new_s:8.2f} {rows / new_s:10,.0f} {len(listing.items):8,d}")
    print(f"{'old (listing.list_repository)':34s} {old_s:8.2f} {rows / old_s:10,.0f} {len(old_items):8,d}")
    print(
        f"catalog listing {rows / new_s:,.0f} rows/s, old listing {rows / old_s:,.0f} rows/s: "
        f"catalog/old {old_s / new_s:.2f}x"
    )
    print(
        f"the catalog's items are the old listing's AP frontals ({len(expected):,}; the old format cannot "
        f"filter out the other {len(old_items) - len(expected):,} views): {'yes' if same else 'NO'}"
    )
    assert same, "the catalog listing and the old listing disagree on the AP frontal files"
    return result
