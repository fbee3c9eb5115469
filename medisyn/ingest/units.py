"""What an ingest task receives: typed, frozen units of work built on the driver.

A *unit* is a handful of files of one repository (one slide for WSI; up to
``ingest.elements_per_task`` consecutive frames or rows of one video or HDF5 file) plus every setting
that changes their pixels. Its id is a hash of those, so a re-run recognises finished units
by their marker file and a unit whose files or settings changed gets a new id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Item:
    """One source file to read; everything a worker needs, nothing identifying but the path."""

    ref: str  # repo/<16 hex>: the file's only name outside the driver
    path: str  # absolute path or object URI (s3://…), used only to open the file
    repo: str
    patient: str  # salted hash
    split: str
    labels: tuple[str, ...]  # caption phrases
    caption: str
    series: str = ""  # repo/<16 hex>: salted hash of the file's folder (a DICOM series' slices share it; a
    #   video's frames share the video's ref, which near-duplicate removal reads)
    index: int = -1  # an element's frame number (video) or row (HDF5); -1 for a whole file
    annotation: str = ""  # path or URI of a slide's lesion XML or a volume's mask ("" = none)
    alternatives: tuple[tuple[str, tuple[str, ...], str], ...] = ()  # (class, labels, caption) per patch class
    #   of a slide labelled from its lesion outlines: ("positive", ...), ("negative", ...)


@dataclass(frozen=True)
class UnitSettings:
    """Every setting that changes a unit's pixels or stored bytes (part of the unit id)."""

    kind: str  # dicom | wsi | image | video | mat | hdf5 | nifti
    specialty: str
    image_type: str
    frames: str  # multi-frame DICOM: all | middle | first
    intensity: str  # auto | ct_window | percentile | minmax | none
    size: int  # output side in pixels
    png_compress_level: int
    image_format: str  # auto | png | webp
    window: tuple[float, float]  # CT window (width, level), Hounsfield units
    pct: tuple[float, float]  # percentile clip (low, high), percent
    wsi_level: int
    wsi_patch_size: int
    wsi_overlap: float
    wsi_tissue_fraction: float
    row_group_rows: int
    max_pixels: int  # larger sources are rejects (checked from the header, before decoding)
    format: int  # staging layout version: bump it and old staging shards are not reused
    video_fps: float = 0.0  # the annotation's frame rate (video)
    hdf5_dataset: str = ""
    mat_image: str = ""
    mat_transpose: bool = True
    volume_axis: int = 2
    volume_every: int = 1
    volume_keep: tuple[float, float] = (0.0, 1.0)
    volume_channel: int = 0
    tumour_min: float = 0.5  # slides labelled from lesion outlines
    normal_max: float = 0.0
    per_slide: int = 0
    seed: int = 0  # of the per-slide cap
    lesions: bool = False  # slides of an entry labelled from lesion outlines (lesions.py's tiling)
    lesion_masks: bool = False  # ... from tumour-mask TIFFs instead of ASAP XML (item.annotation is the mask)
    wsi_magnification: float = 0.0  # > 0: tile at the level of this magnification instead of wsi_level


@dataclass(frozen=True)
class Unit:
    """Files a task reads and the staging folder it writes ``<id>.parquet``/``.rejects``/``.json`` to."""

    id: str
    dir: str
    settings: UnitSettings
    items: tuple[Item, ...]


def unit_id(repo: str, items: list[Item], settings: UnitSettings) -> str:
    """Content address of a unit: its files, their captions and splits, and its settings."""
    key = {**asdict(settings), "captions": [it.caption for it in items], "splits": [it.split for it in items]}
    if any(it.annotation or it.alternatives for it in items):  # a slide's outlines, a volume's mask
        key["annotations"] = [[it.annotation, list(it.alternatives)] for it in items]
    h = hashlib.sha256(json.dumps([repo, [it.ref for it in items], key], sort_keys=True).encode()).hexdigest()[:16]
    return f"{repo}-{h}"
