"""Slides labelled patch by patch from lesion outlines (ASAP XML, as CAMELYON16 ships them).

A tumour slide's label says only that metastasis is somewhere on it; the pathologists' outlines
say where. Each grid patch gets the fraction of its level-0 square that lies inside a tumour
polygon and outside every hole, and is positive (fraction ≥ ``tumour_min``), negative
(≤ ``normal_max``) or left out in between, counted. Outlines are rasterised with Pillow on a
coarse grid per patch (no geometry dependency). A tumour-mask TIFF (non-zero: tumour) may stand
in for the outlines: :func:`read_tumour_mask` gives the same per-patch fraction from its pixels.
The XML comes from the internet: it is parsed
with ElementTree after a size cap and a refusal of any DTD (a real ASAP file has none; this
shuts out entity expansion), and every failure is a :class:`Rejected` with a fixed reason that
carries nothing from the file.
"""

from __future__ import annotations

import hashlib
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medisyn.ingest.readers import Rejected, io_error, iter_wsi_patches, open_slide

TUMOUR_GROUPS = ("_0", "_1", "Tumor")  # ../shared/SOURCES.md §11
HOLE_GROUPS = ("_2", "Exclusion")  # non-tumour areas cut out of the tumour polygons ("Exclusion": unconfirmed)
AREA_TYPES = ("Polygon", "Spline", "Rectangle")  # a spline is taken by its control points
MAX_XML_BYTES = 64 << 20  # CAMELYON16's largest outlines are a few MB
GRID = 64  # raster cells per patch side: fractions in steps of 1/4096

LEFT_BETWEEN = "tumour fraction between thresholds"
LEFT_CAP = "cap per slide"


@dataclass(frozen=True)
class Lesions:
    """Level-0 float polygons ((N, 2) arrays of x, y) of one slide: tumour, and holes cut out of it."""

    tumour: list[np.ndarray]
    holes: list[np.ndarray] = field(default_factory=list)
    tumour_boxes: np.ndarray = field(init=False, repr=False)  # (n, 4) x_min, y_min, x_max, y_max
    hole_boxes: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "tumour_boxes", _boxes(self.tumour))
        object.__setattr__(self, "hole_boxes", _boxes(self.holes))


def _boxes(polygons: Sequence[np.ndarray]) -> np.ndarray:
    if not polygons:
        return np.zeros((0, 4))
    return np.array([[*p.min(axis=0), *p.max(axis=0)] for p in polygons], dtype=np.float64)


# ----------------------------------------------------------------------------- ASAP XML


def _parse(data: bytes) -> ET.Element:
    if not data.strip():
        raise Rejected("empty annotation file")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise Rejected("annotation file declares a DTD (refused)")
    try:
        return ET.fromstring(data)
    except ET.ParseError:
        raise Rejected("malformed annotation XML") from None


def _number(text: str | None) -> float:
    try:
        v = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise Rejected("annotation coordinate is not a number") from None
    if not math.isfinite(v):
        raise Rejected("annotation coordinate is not a number")
    return v


def _polygon(annotation: ET.Element) -> np.ndarray:
    coords = annotation.findall("./Coordinates/Coordinate")
    points = []
    for i, c in enumerate(coords):
        order = c.get("Order")
        try:
            rank = int(order) if order is not None else i
        except ValueError:
            raise Rejected("annotation coordinate order is not an integer") from None
        points.append((rank, _number(c.get("X")), _number(c.get("Y"))))
    if len(points) < 3:
        raise Rejected("annotation polygon with fewer than 3 points")
    points.sort(key=lambda p: p[0])
    poly = np.array([(x, y) for _, x, y in points], dtype=np.float64)
    x, y = poly[:, 0], poly[:, 1]
    if abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) == 0.0:  # shoelace: twice the area
        raise Rejected("annotation polygon with no area")
    return poly


def read_asap(
    xml_path: str | Path, *, tumour_groups: Sequence[str] = TUMOUR_GROUPS, hole_groups: Sequence[str] = HOLE_GROUPS
) -> Lesions:
    """The tumour polygons and holes of one ASAP XML file (root ``ASAP_Annotations``, each
    ``Annotations/Annotation`` with ``PartOfGroup`` and ``Coordinates/Coordinate`` ``Order``, ``X``, ``Y``).

    Groups compare case-insensitively; an annotation of any other group, or not an area, is a reject
    (a silently dropped outline would mislabel patches). File-system errors (missing, no permission)
    are raised as they are, as in :mod:`readers`.
    """
    path = Path(xml_path)
    try:
        if path.stat().st_size > MAX_XML_BYTES:
            raise Rejected(f"annotation file larger than {MAX_XML_BYTES >> 20} MiB")
        data = path.read_bytes()
    except OSError as exc:
        if io_error(exc):
            raise
        raise Rejected("unreadable annotation file") from None
    root = _parse(data)
    if root.tag != "ASAP_Annotations":
        raise Rejected("not an ASAP annotation file")
    annotations = root.findall("./Annotations/Annotation")
    if not annotations:
        raise Rejected("no annotation in the file")
    tumour_set = {g.casefold() for g in tumour_groups}
    hole_set = {g.casefold() for g in hole_groups}
    tumour, holes = [], []
    for a in annotations:
        group = (a.get("PartOfGroup") or "").casefold()
        if group not in tumour_set and group not in hole_set:
            raise Rejected("annotation group neither tumour nor exclusion")
        if a.get("Type") not in AREA_TYPES:
            raise Rejected("annotation that is not an area (polygon, spline or rectangle)")
        (tumour if group in tumour_set else holes).append(_polygon(a))
    if not tumour:
        raise Rejected("no tumour polygon in the file")
    return Lesions(tumour, holes)


Polygon = Sequence[Sequence[float]]


# ----------------------------------------------------------------------------- tumour masks

MASK_PIXELS = 1 << 26  # a mask is read at its finest level with at most this many pixels (a few per patch)
MASK_ASPECT = 0.02  # relative difference of the mask's and the slide's scale in x and y tolerated (rounding)


@dataclass(frozen=True)
class TumourMask:
    """A slide's tumour mask (True: tumour) at a coarse resolution, ``scale`` mask pixels per level-0
    pixel; :func:`tumour_fraction` takes it where it takes :class:`Lesions`."""

    tumour: np.ndarray  # (h, w) bool
    scale: tuple[float, float]  # (x, y)

    def fraction(self, x0: float, y0: float, size0: float) -> float:
        """The area-weighted tumour fraction of the level-0 square (partial mask pixels count by overlap)."""
        h, w = self.tumour.shape
        wx = _overlap(x0 * self.scale[0], (x0 + size0) * self.scale[0], w)
        wy = _overlap(y0 * self.scale[1], (y0 + size0) * self.scale[1], h)
        total = wx.sum() * wy.sum()
        if total <= 0:
            return 0.0
        return float(wy @ self.tumour.astype(np.float64) @ wx / total)


def _overlap(a: float, b: float, n: int) -> np.ndarray:
    """How much of each unit cell ``[i, i+1)`` of ``n`` lies in ``[a, b)``."""
    i = np.arange(n, dtype=np.float64)
    return np.clip(np.minimum(i + 1, b) - np.maximum(i, a), 0.0, None)


def read_tumour_mask(mask_path: str | Path, slide_size: tuple[int, int]) -> TumourMask:
    """A tumour-mask TIFF (CAMELYON16 evaluation masks, CAMELYON17 masks: non-zero pixels are tumour),
    pyramidal or flat, read with tifffile at its finest level of at most :data:`MASK_PIXELS` pixels.
    ``slide_size``: the slide's level-0 (width, height); a mask of another aspect ratio belongs to another
    slide (or was cropped): a reject, as is a file tifffile cannot read."""
    import tifffile

    try:
        with tifffile.TiffFile(str(mask_path)) as tif:
            if not tif.series:
                raise Rejected("tumour mask without an image")
            fits = [lv for lv in tif.series[0].levels if int(np.prod(lv.shape[:2])) <= MASK_PIXELS]
            if not fits:
                raise Rejected("tumour mask too large at every level")
            arr = max(fits, key=lambda lv: int(np.prod(lv.shape[:2]))).asarray()
    except Rejected:
        raise
    except (OSError, ValueError, KeyError, IndexError, tifffile.TiffFileError) as exc:
        if isinstance(exc, OSError) and io_error(exc):
            raise
        raise Rejected(f"unreadable tumour mask ({type(exc).__name__})") from None
    if arr.ndim == 3 and arr.shape[-1] in (1, 3, 4):
        arr = arr[..., :3].any(axis=-1) if arr.shape[-1] > 1 else arr[..., 0]
    if arr.ndim != 2:
        raise Rejected(f"tumour mask is not a 2-D image ({arr.ndim} dimensions)")
    h, w = arr.shape
    sx, sy = w / slide_size[0], h / slide_size[1]
    if abs(sx - sy) > MASK_ASPECT * max(sx, sy) + 1.0 / min(w, h):
        raise Rejected("tumour mask's aspect ratio differs from the slide's")
    return TumourMask(arr != 0, (sx, sy))


def slide_dimensions(slide_path: str | Path) -> tuple[int, int]:
    """A slide's level-0 (width, height), for fitting a mask to it."""
    with open_slide(slide_path) as handle:
        return tuple(handle.dimensions)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- fractions and labels


def _hits(boxes: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.flatnonzero((boxes[:, 0] < x1) & (boxes[:, 2] > x0) & (boxes[:, 1] < y1) & (boxes[:, 3] > y0))


def tumour_fraction(lesions: Lesions | TumourMask, x0: float, y0: float, size0: float, grid: int = GRID) -> float:
    """Fraction of the level-0 square ``[x0, x0+size0)²`` inside tumour and outside every hole,
    sampled at the centres of a ``grid × grid`` raster (polygons whose box misses the square are skipped);
    for a :class:`TumourMask`, the share of its tumour pixels in the square."""
    if isinstance(lesions, TumourMask):
        return lesions.fraction(x0, y0, size0)
    x1, y1 = x0 + size0, y0 + size0
    tumour = _hits(lesions.tumour_boxes, x0, y0, x1, y1)
    if tumour.size == 0:
        return 0.0
    scale = grid / size0
    img = Image.new("1", (grid, grid), 0)
    draw = ImageDraw.Draw(img)

    def fill(poly: np.ndarray, value: int) -> None:
        # Pillow fills a pixel whose integer corner lies inside; -0.5 makes that its centre
        xy = (poly - (x0, y0)) * scale - 0.5
        draw.polygon([tuple(p) for p in xy.tolist()], fill=value)

    for i in tumour:
        fill(lesions.tumour[i], 1)
    for i in _hits(lesions.hole_boxes, x0, y0, x1, y1):
        fill(lesions.holes[i], 0)
    return float(np.asarray(img).mean())


def check_thresholds(tumour_min: float, normal_max: float) -> None:
    if not 0.0 <= normal_max < tumour_min <= 1.0:
        raise ValueError(f"need 0 <= normal_max < tumour_min <= 1, got {normal_max} and {tumour_min}")


def label_for(fraction: float, tumour_min: float = 0.5, normal_max: float = 0.0) -> str | None:
    """``"positive"`` at ≥ ``tumour_min``, ``"negative"`` at ≤ ``normal_max``, None in between (left out)."""
    if fraction >= tumour_min:
        return "positive"
    if fraction <= normal_max:
        return "negative"
    return None


def label_patches(
    lesions: Lesions | TumourMask | None,
    boxes: Iterable[tuple[float, float, float]],
    *,
    tumour_min: float = 0.5,
    normal_max: float = 0.0,
) -> list[str | None]:
    """The label of each level-0 box ``(x0, y0, size0)``; no lesions (a normal slide): all negative."""
    check_thresholds(tumour_min, normal_max)
    return [label_for(0.0 if lesions is None else tumour_fraction(lesions, *b), tumour_min, normal_max) for b in boxes]


def patch_rank(seed: int, level: int, x: int, y: int) -> bytes:
    """A patch's place in the seeded cap order: a hash of the seed and its coordinates, so which
    patches a cap keeps depends on neither the order they were read in nor the other slides."""
    return hashlib.sha256(f"{seed}:{level}:{x}:{y}".encode()).digest()


def cap_per_class(labels: dict[tuple[int, int], str], per_slide: int, seed: int, level: int) -> set[tuple[int, int]]:
    """The ``(x, y)`` keys kept when each class keeps its ``per_slide`` lowest-ranked patches (0: all)."""
    if per_slide <= 0:
        return set(labels)
    kept: set[tuple[int, int]] = set()
    for cls in set(labels.values()):
        keys = sorted((k for k, v in labels.items() if v == cls), key=lambda k: patch_rank(seed, level, *k))
        kept.update(keys[:per_slide])
    return kept


# ----------------------------------------------------------------------------- slides


def iter_labelled_patches(
    slide_path: str | Path,
    lesions: Lesions | TumourMask | None,
    *,
    level: int,
    patch: int,
    overlap: float,
    min_tissue: float,
    tumour_min: float,
    normal_max: float,
    slide_positive: bool,
    per_slide: int,
    seed: int,
) -> Iterator[tuple[np.ndarray | None, dict]]:
    """:func:`readers.iter_wsi_patches` with each tissue patch labelled by its tumour fraction.

    Tissue patches carry ``meta["label"]`` (positive | negative) and ``meta["tumour"]``; background
    comes as from ``iter_wsi_patches`` (``(None, meta)``, no label). A patch between the thresholds,
    and one a per-slide cap drops, comes as ``(None, meta)`` with ``meta["left_out"]`` saying why, so
    every patch is accounted for; neither is read. A tumour slide needs its outlines (a reject
    without); a normal slide without outlines gives negatives only (with outlines, they label it).
    With a cap, a first pass lists the tissue patches without reading pixels.
    """
    if slide_positive and lesions is None:
        raise Rejected("tumour slide without lesion annotations")
    check_thresholds(tumour_min, normal_max)
    labels: dict[tuple[int, int], tuple[str | None, float]] = {}

    def classify(meta: dict) -> tuple[str | None, float]:
        key = (meta["x"], meta["y"])
        if key not in labels:
            frac = 0.0 if lesions is None else tumour_fraction(lesions, meta["x0"], meta["y0"], meta["size0"])
            labels[key] = (label_for(frac, tumour_min, normal_max), frac)
        return labels[key]

    grid = partial(iter_wsi_patches, slide_path, level=level, patch=patch, overlap=overlap, min_tissue=min_tissue)
    kept: set[tuple[int, int]] | None = None
    if per_slide > 0:

        def listing(meta: dict) -> bool:
            classify(meta)
            return False  # lists the tissue patches, reads no pixels

        for _ in grid(want=listing):
            pass
        classed = {k: lab for k, (lab, _) in labels.items() if lab is not None}
        kept = cap_per_class(classed, per_slide, seed, level)

    def want(meta: dict) -> bool:
        return classify(meta)[0] is not None and (kept is None or (meta["x"], meta["y"]) in kept)

    for arr, meta in grid(want=want):
        key = (meta["x"], meta["y"])
        if key not in labels:  # background
            yield arr, meta
            continue
        label, frac = labels[key]
        meta["tumour"] = frac
        if label is None:
            meta["left_out"] = LEFT_BETWEEN
            yield None, meta
            continue
        meta["label"] = label
        if kept is not None and key not in kept:
            meta["left_out"] = LEFT_CAP
            yield None, meta
            continue
        yield arr, meta


def _positive(text: str | None) -> float | None:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def base_magnification(slide, from_mpp: bool = True) -> float:
    """Level 0's magnification: the stated objective power, else (``from_mpp``) 10 / µm per pixel, the
    usual convention (40x ≈ 0.25 µm/px). Generic TIFFs, CAMELYON16's format, state only their
    resolution, which OpenSlide gives as ``openslide.mpp-x``; neither: a reject."""
    import openslide

    power = _positive(slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if power:
        return power
    mpp = _positive(slide.properties.get(openslide.PROPERTY_NAME_MPP_X)) if from_mpp else None
    if mpp:
        return 10.0 / mpp
    raise Rejected("slide states neither its objective power nor its resolution (magnification unknown)")


def level_for_magnification(slide, magnification: float, tolerance: float = 0.15, *, from_mpp: bool = True) -> int:
    """The pyramid level whose magnification (:func:`base_magnification` / downsample) is within
    ``tolerance`` (relative) of ``magnification``, so patches are cut at the magnification the caption
    states. The default tolerance takes a 0.2265 µm/px scanner (44x by the convention) as 40x, and stays
    far from the next level (≥ 2x away). ``slide``: an open ``openslide.OpenSlide`` or a path. No level
    near enough (patches would have to be resampled): a reject."""
    if magnification <= 0:
        raise ValueError(f"magnification must be positive, got {magnification}")
    if isinstance(slide, str | Path):
        with open_slide(slide) as handle:
            return level_for_magnification(handle, magnification, tolerance, from_mpp=from_mpp)
    power = base_magnification(slide, from_mpp)
    errors = [abs(power / d - magnification) / magnification for d in slide.level_downsamples]
    best = int(np.argmin(errors))
    if errors[best] > tolerance:
        raise Rejected(f"slide has no pyramid level at {magnification:g}x")
    return best
