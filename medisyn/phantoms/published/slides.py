"""CAMELYON16 in its publisher's layout at demo scale: pyramidal TIFF slides in
``CAMELYON16/training/{tumor,normal}/`` and the pathologists' outlines as ASAP XML in
``CAMELYON16/training/lesion_annotations/<slide>.xml`` (``jobs/configs/sources/paper.yaml``; the replica in
``replicas.py`` writes the same layout in miniature).

A tumour slide's metastasis is drawn only inside its outlines (less their ``_2`` holes) and normal node
elsewhere, with the flat demo's stains and nuclei at its pixel scale (``pathology.lesion_slide_rgb``), so a
patch is captioned by what it shows. The expectations are those of the demo's settings
(:data:`SETTINGS`, ``ingest.source_settings.camelyon16`` in demo.yaml): ingest tiles level 0 (40x at
0.25 µm/px) into 256-px patches, a patch is tissue when at least half of it is, and is labelled by the
share of its 64 x 64 sample points inside the outlines. To make each decision certain, the slides are
built on that 256-px grid: a patch the section's outline leaves near half tissue gets a round lobule
inscribed in it, and an outline that would leave a patch near a threshold (a sliver of tumour, or about
half) is drawn again from the next numbers of the slide's RNG. Tumour slides (1792 x 2304) hold about 38
tissue patches: 16-18 metastasis (the cap keeps 16), 6-10 in between, the rest negative; normal slides
(1536 x 2048, as the flat demo's) about 28, all negative (16 kept).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

from .. import draw as D
from ..common import DEFECT_OFFSET
from ..formats import write_asap
from ..pathology import LEVEL0_HW, lesion_slide_rgb, low_res, pyramid, write_slide
from ..replicas import Writer, expected
from .splits import lands

__all__ = ["camelyon16", "SETTINGS"]

# what the demo overrides in paper.yaml's camelyon16 entry (catalog: 512-px patches, 500 per slide and class)
SETTINGS = {"wsi": {"patch_size": 256}, "lesions": {"per_slide": 16}}
PATCH = SETTINGS["wsi"]["patch_size"]
PER_SLIDE = SETTINGS["lesions"]["per_slide"]
TUMOUR_MIN, NORMAL_MAX, TISSUE_MIN = 0.5, 0.0, 0.5  # the catalog's lesions.tumour_min / normal_max, wsi.tissue_fraction
GRID = 64  # ingest's sample points per patch side (medisyn.ingest.lesions.GRID)
MARGIN = 0.04  # no patch's tumour share within this of 0.5 (164 of ingest's 4096 sample points)
SLIVER = 0.03  # nor a share of tumour above 0 but below this (123 sample points)
TISSUE_MARGIN = 0.08  # nor a tissue share within this of half (ingest judges tissue on a 2x-reduced thumbnail)
GLASS_MAX = 0.1  # at most this share of an outline's area on background patches (outlines follow tumour)
SIZES = {"tumor": (1792, 2304), "normal": LEVEL0_HW}  # level 0 (h, w): a tumour slide holds ~38 tissue patches
POSITIVE, NEGATIVE = "metastasis", "no presence of metastasis"
LEFT_BETWEEN = "lesions: tumour fraction between thresholds"
LEFT_CAP = "lesions: cap per slide"
TOP = "CAMELYON16/training"
NUMBERS = {"tumor": 111, "normal": 160}  # CAMELYON16's training slides: tumor_001-111, normal_001-160


def _slide_names(cls: str, n: int) -> list[str]:
    """``n`` of CAMELYON16's slide names of a class, picked in number order so that the group hash gives one
    val and one test slide (n >= 3) and the rest train, as the flat demo's stratified split did: with 5
    slides a class, a plain hash split of 10 left pathology without a test slide."""
    held = max(1, round(0.1 * n)) if n >= 3 else 0
    want = Counter(val=held, test=held)
    want["train"] = n - want["val"] - want["test"]
    names = []
    for k in range(1, NUMBERS[cls] + 1):
        name, split = f"{cls}_{k:03d}", lands(f"{cls}_{k:03d}")
        if want[split] > 0:
            want[split] -= 1
            names.append(name)
    if len(names) < n:
        raise ValueError(f"camelyon16: {n} {cls} slides asked for; CAMELYON16 has {NUMBERS[cls]}")
    return names


def _tissue(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A lymph-node section as slide_rgb draws it (one soft lobulated blob); a patch the blob leaves near
    half tissue (42-58%, where ingest's thumbnail could go either way) gets a round lobule inscribed in it,
    which makes it three quarters tissue or more and leaves its neighbours as they were. Returns the
    (H, W) map and the (rows, cols) patches ingest takes for tissue."""
    cy, cx = h / 2 + rng.uniform(-80, 80), w / 2 + rng.uniform(-120, 120)
    tissue = low_res(
        rng,
        h,
        w,
        lambda a, b: D.blob(
            a, b, cy / 8, cx / 8, min(a, b) * 0.44, rng, 0.18, aspect=0.78, angle=rng.uniform(-0.4, 0.4), soft=1.0
        ),
    )
    rows, cols = h // PATCH, w // PATCH
    cells = tissue.reshape(rows, PATCH, cols, PATCH).transpose(0, 2, 1, 3)  # a view: edits reach `tissue`
    share = (cells > 0.5).mean(axis=(2, 3))
    yy, xx = np.mgrid[:PATCH, :PATCH] - (PATCH - 1) / 2
    lobule = np.clip(0.5 + (PATCH / 2 - 6 - np.hypot(yy, xx)) / 6, 0, 1).astype(np.float32)
    for r, c in zip(*np.nonzero(np.abs(share - TISSUE_MIN) <= TISSUE_MARGIN), strict=True):
        np.maximum(cells[r, c], lobule, out=cells[r, c])
    return tissue, (cells > 0.5).mean(axis=(2, 3)) >= TISSUE_MIN


def _outline(rng: np.random.Generator, irregularity: float, points: int = 72) -> np.ndarray:
    """A closed lobulated outline of unit radius around (0, 0) (x, y), as a pathologist draws round a deposit."""
    theta = np.linspace(0, 2 * np.pi, points, endpoint=False)
    rad = np.ones_like(theta)
    for k in range(2, 6):
        rad += irregularity * rng.uniform(0.3, 1.0) / (k - 1) ** 0.7 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    rad *= 1 + 0.02 * rng.standard_normal(theta.size)  # hand-drawn wobble
    return np.stack([rad * np.cos(theta), rad * np.sin(theta)], axis=1)


def _raster(
    polygons: list[np.ndarray], holes: list[np.ndarray], scale: float, shape: tuple[int, int], widen: int = 0
) -> np.ndarray:
    """The outlines less their holes, filled at ``scale`` pixels per level-0 pixel (pixel centres, as ingest);
    ``widen``: each outline also stroked that many pixels wide (a dilation by about half of it)."""
    img = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(img)
    for polys, value in ((polygons, 1), (holes, 0)):
        for p in polys:
            xy = [tuple(q) for q in (p * scale - 0.5).tolist()]
            draw.polygon(xy, fill=value)
            if widen:  # (polygon's own outline stays inside the polygon)
                draw.line([*xy, xy[0]], fill=value, width=widen, joint="curve")
    return np.asarray(img, np.float32)


def _shares(polygons: list[np.ndarray], holes: list[np.ndarray], rows: int, cols: int, widen: int = 0) -> np.ndarray:
    """Each patch's tumour share, sampled as ingest samples it (GRID x GRID points a patch)."""
    grid = _raster(polygons, holes, GRID / PATCH, (rows * GRID, cols * GRID), widen)
    return grid.reshape(rows, GRID, cols, GRID).mean(axis=(1, 3))


def _clear(share: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Patches no rounding can move across a threshold: no tumour even with the outlines widened (``near``:
    ingest rounds the vertices of each patch's outlines to its sample grid), or tumour well clear of 0 and of
    half (a one-point shift of an edge moves at most GRID points)."""
    return (
        ((share == 0) & (near == 0))
        | ((share >= SLIVER) & (share <= TUMOUR_MIN - MARGIN))
        | (share >= TUMOUR_MIN + MARGIN)
    )


def _lesions(rng: np.random.Generator, tissue_cells: np.ndarray, with_hole: bool):
    """One deposit's outline (and, ``with_hole``, a stretch of normal tissue cut out of it: group _2), off the
    section's centre so one side of the node stays free of it, sized so that PER_SLIDE to PER_SLIDE + 2 tissue
    patches are metastasis, every patch's share clear of the thresholds (:func:`_clear`) and at least 3 tissue
    patches free of tumour; else another shape and place from the same RNG. Returns (outlines, holes, shares)."""
    rows, cols = tissue_cells.shape
    ys, xs = np.nonzero(tissue_cells)
    my, mx, spread = (ys.mean() + 0.5) * PATCH, (xs.mean() + 0.5) * PATCH, np.sqrt(len(ys) / np.pi) * PATCH
    for _ in range(200):
        a, off = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.4) * spread
        cy, cx = my + off * np.sin(a), mx + off * np.cos(a)
        shape = _outline(rng, 0.2)
        b, hole_r = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.22)
        hole = _outline(rng, 0.15, 36) * hole_r + 0.4 * np.array([np.cos(b), np.sin(b)]) if with_hole else None
        lo, hi = 0.3 * spread, 1.2 * spread
        for _ in range(10):  # bisect the size for the number of metastasis patches
            r = (lo + hi) / 2
            polygons = [np.round(shape * r + (cx, cy), 1)]
            holes = [np.round(hole * r + (cx, cy), 1)] if with_hole else []
            share = _shares(polygons, holes, rows, cols)
            pos = int((tissue_cells & (share >= TUMOUR_MIN)).sum())
            if pos < PER_SLIDE:
                lo = r
            elif pos > PER_SLIDE + 2:
                hi = r
            else:
                break
        neg = int((tissue_cells & (share <= NORMAL_MAX)).sum())
        if not (PER_SLIDE <= pos <= PER_SLIDE + 2 and neg >= 3):
            continue
        near = _shares(polygons, [], rows, cols, widen=5)
        if _clear(share, near)[tissue_cells].all() and near[~tissue_cells].sum() <= GLASS_MAX * near.sum():
            return polygons, holes, share
    raise RuntimeError("camelyon16: no lesion outline with unambiguous patches in 200 draws")


def _counts(tissue_cells: np.ndarray, share: np.ndarray | None) -> Counter:
    """What ingest makes of one slide's patches: labelled, in between, capped, background."""
    out = Counter(background=int((~tissue_cells).sum()))
    shares = np.zeros(int(tissue_cells.sum())) if share is None else share[tissue_cells]
    labels = Counter(
        POSITIVE if s >= TUMOUR_MIN else NEGATIVE if s <= NORMAL_MAX else LEFT_BETWEEN for s in shares.tolist()
    )
    out[LEFT_BETWEEN] += labels.pop(LEFT_BETWEEN, 0)
    for phrase, k in labels.items():
        out[phrase] += min(k, PER_SLIDE)
        out[LEFT_CAP] += max(0, k - PER_SLIDE)
    return out


def camelyon16(w: Writer, n: int, defects: bool) -> dict:
    """``n`` tumour slides (with outlines) and ``n`` normal slides (without), one slide per patient as
    CAMELYON16 has it; with ``defects``, a ``.tif`` of random bytes among the normal slides (a reject)."""
    total, splits = Counter(), Counter()
    names = {cls: _slide_names(cls, n) for cls in ("tumor", "normal")}
    for cls in ("tumor", "normal"):
        for i, name in enumerate(names[cls]):
            k = i + (n if cls == "normal" else 0)  # slide k draws from rng(k) and its geometry from patient_rng(k)
            geometry = w.ctx.patient_rng(k)
            tissue, cells = _tissue(geometry, *SIZES[cls])
            tumour, share = np.zeros_like(tissue), None
            if cls == "tumor":
                polygons, holes, share = _lesions(geometry, cells, with_hole=i % 2 == 1)
                tumour = _raster(polygons, holes, 1.0, tissue.shape)
                write_asap(w.path(f"{TOP}/lesion_annotations/{name}.xml"), polygons, holes)
            write_slide(pyramid(lesion_slide_rgb(w.ctx.rng(k), tissue, tumour)), w.path(f"{TOP}/{cls}/{name}.tif"))
            counts = _counts(cells, share)
            total += counts
            splits[lands(name)] += counts[POSITIVE] + counts[NEGATIVE]
    records, read_rejects = [], {}
    if defects:
        spare = next(k for k in range(1, NUMBERS["normal"] + 1) if f"normal_{k:03d}" not in names["normal"])
        rel = f"{TOP}/normal/normal_{spare:03d}.tif"
        w.path(rel).write_bytes(w.ctx.rng(DEFECT_OFFSET).bytes(64 * 1024))
        detail = "random bytes with a .tif name among the training/normal slides"
        records.append({"repo": w.ctx.repo, "path": f"{w.ctx.repo}/{rel}", "kind": "not_a_tiff", "detail": detail,
                        "in_labels_csv": False})  # fmt: skip
        read_rejects = {"unreadable slide (OpenSlideUnsupportedFormatError)": 1}
    classes = {p: total[p] for p in (POSITIVE, NEGATIVE)}
    left = {k: total[k] for k in (LEFT_BETWEEN, LEFT_CAP) if total[k]}
    return expected(
        sum(classes.values()),
        classes,
        left,
        splits={"by": "slide hash (ingest.split_fractions)", "groups": 2 * n},
        read_rejects=read_rejects,
        defects=records,
        background=total["background"],
        split_counts=dict(sorted(splits.items())),  # under ingest.split_salt's default
        listing={"items": 2 * n + int(defects), "classes": {POSITIVE: n, NEGATIVE: n + int(defects)}, "left_out": {}},
        settings=SETTINGS,
    )
