"""What an ingest task receives: typed, frozen units of work built on the driver.

A *unit* is a handful of files of one repository (one slide for WSI) plus every setting
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
    series: str = ""  # repo/<16 hex>: salted hash of the file's folder (a DICOM series' slices share it)


@dataclass(frozen=True)
class UnitSettings:
    """Every setting that changes a unit's pixels or stored bytes (part of the unit id)."""

    kind: str  # dicom | wsi | image
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
    h = hashlib.sha256(json.dumps([repo, [it.ref for it in items], key], sort_keys=True).encode()).hexdigest()[:16]
    return f"{repo}-{h}"
