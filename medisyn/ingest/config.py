"""Ingest settings: which repositories to read and how to turn them into 512² pairs."""

from __future__ import annotations

import codecs
import string
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal

from medisyn.configtools import ConfigError
from medisyn.records import IMAGE_TYPES, SPECIALTIES


@dataclass(frozen=True)
class RepositoryConfig:
    """One source repository: where its files are, how to read them, how to caption them."""

    name: str  # short name, used in `source` and in reject records
    kind: Literal["dicom", "wsi", "image"]  # reader: pydicom, openslide, or Pillow
    path: str  # repository root (relative paths resolve against the config file's folder)
    glob: str  # files to ingest, relative to `path` (e.g. "**/*.dcm")
    labels_csv: str  # label table, relative to `path`
    path_column: str  # label-table column with the file path relative to `path`
    label_columns: tuple[str, ...]  # one column (single label) or one column per finding (multi-label, 1 = present)
    patient_column: str  # label-table column with the patient id (hashed with a salt, never stored)
    template: str  # caption template with a {label} placeholder
    specialty: str  # one of SPECIALTIES
    image_type: str  # one of IMAGE_TYPES
    classes: dict[str, str] = field(default_factory=dict)  # raw label value (or finding column) -> caption phrase
    split_column: str = ""  # optional official split column (train/val/test); "" = patient hash split
    frames: Literal["all", "middle", "first"] = "all"  # multi-frame DICOM: which frames become images
    intensity: Literal["auto", "ct_window", "percentile", "minmax", "none"] = "auto"  # auto: CT window for CT,
    #   percentile clip for MR/mammography (8-bit JPEG/PNG too) and other >8-bit grey, other 8-bit and colour
    #   kept as they are; see clips_by_default
    encoding: str = "utf-8"  # of the label CSV (e.g. latin-1, cp1252 for tables exported on Windows)

    @property
    def clips_by_default(self) -> bool:
        """MRI and mammography are percentile-clipped whatever their file format (the paper's 0.5-99.5th
        percentile), so an 8-bit JPEG/PNG export is stretched like its DICOM original. Mammograms share
        the image type X-ray with chest X-rays (kept as they are), so they are known by their caption
        template or repository name."""
        mammography = any("mammogra" in text.lower() for text in (self.template, self.name))
        return self.image_type == "magnetic resonance imaging" or mammography

    def __post_init__(self):
        if self.intensity == "auto" and self.clips_by_default:  # resolved here, so the unit ids change with it
            object.__setattr__(self, "intensity", "percentile")
        if self.specialty not in SPECIALTIES:
            raise ConfigError(
                f"repository {self.name!r}: unknown specialty {self.specialty!r}; "
                f"expected one of {', '.join(SPECIALTIES)}"
            )
        if self.image_type not in IMAGE_TYPES:
            raise ConfigError(
                f"repository {self.name!r}: unknown image_type {self.image_type!r}; "
                f"expected one of {', '.join(IMAGE_TYPES)}"
            )
        if "{label}" not in self.template:
            raise ConfigError(f"repository {self.name!r}: template {self.template!r} has no {{label}} placeholder")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as exc:
            raise ConfigError(f"repository {self.name!r}: template {self.template!r} is malformed ({exc})") from None
        if fields != {"label"}:
            other = sorted(fields - {"label"})
            raise ConfigError(
                f"repository {self.name!r}: template {self.template!r} has unknown field(s) "
                f"{', '.join('{' + f + '}' for f in other)}; only {{label}} is filled in"
            )
        for key in ("glob", "labels_csv"):
            value = getattr(self, key)
            if PurePosixPath(value).is_absolute() or ".." in PurePosixPath(value.replace("\\", "/")).parts:
                raise ConfigError(
                    f"repository {self.name!r}: {key} {value!r} must stay inside the repository (relative, no '..')"
                )
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ConfigError(f"repository {self.name!r}: unknown encoding {self.encoding!r}") from None
        if not self.label_columns:
            raise ConfigError(f"repository {self.name!r}: label_columns is empty")
        if not self.classes:
            raise ConfigError(f"repository {self.name!r}: classes (label value -> caption phrase) is empty")


@dataclass(frozen=True)
class IngestConfig:
    """How sources become corpus shards (paper §4.1 numbers are the defaults)."""

    RANGES: ClassVar[dict[str, str]] = {
        "size": ">=8",
        "ct_window_width": ">0",
        "wsi_level": ">=0",
        "wsi_patch_size": ">=8",
        "wsi_tissue_fraction": "0..1",
        "near_duplicate_bits": ">=-1",
        "near_duplicate_rms": "0..1",
        "max_tasks": ">=0",
        "files_per_task": ">=1",
        "elements_per_task": ">=1",
        "row_group_rows": ">=1",
        "shard_rows": ">=1",
        "shard_row_group_rows": ">=1",
        "png_compress_level": "0..9",
        "max_pixels": ">=64",
    }

    repositories: tuple[RepositoryConfig, ...] = ()  # inline repository descriptions
    repositories_file: str = ""  # or a YAML file with a `repositories:` list (e.g. the phantoms' repositories.yaml)
    # public repositories as their publishers ship them (DESIGN §10): a catalog of source entries, each read from
    # <sources_root>/<entry name>/; an entry whose folder is absent is skipped (the summary says how to get it)
    sources: str = ""  # catalog: a name under jobs/configs/sources (e.g. paper) or a YAML file; "" = none
    sources_root: str = ""  # folder or object-store prefix (s3://bucket/sources) with one folder per entry
    source_paths: dict[str, str] = field(default_factory=dict)  # entry name -> its own folder, not <root>/<name>
    source_entries: tuple[str, ...] = ()  # read only these catalog entries (empty: every entry)
    # entry -> {caps|wsi|lesions|video|volume: {key: value}}: this run's reading settings over the catalog's
    source_settings: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    size: int = 512  # output side in pixels: shorter side resized to this, then centre-cropped
    ct_window_width: float = 700.0  # Hounsfield units
    ct_window_level: float = 100.0  # Hounsfield units
    percentile_low: float = 0.5  # MRI and mammography clip, percent
    percentile_high: float = 99.5  # percent
    wsi_level: int = 0  # pyramid level patches are cut from (0 = full resolution)
    wsi_patch_size: int = 512  # patch side at that level, pixels
    wsi_overlap: float = 0.0  # fraction of the patch side shared with a neighbour, at most 0.1
    wsi_tissue_fraction: float = 0.5  # a patch needs at least this fraction of tissue in the thumbnail mask
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train/val/test, by patient
    split_salt: str = "medisyn"  # salt of the patient-id hash; change it to re-draw the split
    near_duplicate_bits: int = 4  # near duplicates: perceptual-hash Hamming distance at most this (-1: exact only)
    near_duplicate_rms: float = 0.01  # ... and 32x32 grey thumbnails within this RMS difference (fraction of 255)
    image_format: Literal["auto", "png", "webp"] = (
        "auto"  # stored encoding; auto: PNG for grey, lossless WebP for colour
    )
    png_compress_level: int = 1  # 0-9; 1 writes ~2x faster than Pillow's default 6 for a few % more bytes
    max_tasks: int = 0  # concurrent ingest tasks (0 = one per CPU of the cluster)
    files_per_task: int = 16  # source files per Ray task (and per staging shard); slides: 1
    elements_per_task: int = 256  # consecutive frames of one video (rows of one HDF5 file) per Ray task
    row_group_rows: int = 64  # parquet row group size: bounds a task's memory on huge multi-frame files and slides
    shard_rows: int = 1024  # rows per corpus shard: ~150-480 MB of 512² images (grey PNG ~150 KiB, colour WebP ~480)
    shard_row_group_rows: int = 16  # corpus row group: reading one image by id reads this many (~2-8 MB)
    max_pixels: int = 100_000_000  # a DICOM (rows x columns x frames) or image above this is a reject, not a decode

    def __post_init__(self):
        if not 0.0 <= self.wsi_overlap <= 0.1:
            raise ConfigError(
                f"ingest.wsi_overlap: {self.wsi_overlap} is outside [0, 0.1] (the paper allows at most 10% overlap)"
            )
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ConfigError(f"ingest.split_fractions: {list(self.split_fractions)} must be non-negative and sum to 1")
        if not 0 <= self.percentile_low < self.percentile_high <= 100:
            raise ConfigError(
                f"ingest.percentile_low/high: need 0 <= {self.percentile_low} < {self.percentile_high} <= 100"
            )
        if self.size % 8:
            raise ConfigError(f"ingest.size: {self.size} must be a multiple of 8 (the VAE's latent factor)")
        if self.files_per_task < 1 or self.row_group_rows < 1 or self.elements_per_task < 1:
            raise ConfigError("ingest.files_per_task, elements_per_task and row_group_rows must be at least 1")
        if not 0 <= self.png_compress_level <= 9:
            raise ConfigError(f"ingest.png_compress_level: {self.png_compress_level} is outside 0-9")
        self._check_sources()

    def _check_sources(self) -> None:
        """The catalog options make sense together; entry names are checked against the catalog when it loads."""
        if not self.sources:
            for key in ("sources_root", "source_paths", "source_entries", "source_settings"):
                if getattr(self, key):
                    raise ConfigError(f"ingest.{key} is set but ingest.sources (the catalog, e.g. paper) is not")
            return
        repeated = sorted({n for n in self.source_entries if self.source_entries.count(n) > 1})
        if repeated:
            raise ConfigError(f"ingest.source_entries: {', '.join(map(repr, repeated))} named more than once")
        for name, folder in self.source_paths.items():
            if not folder.strip():
                raise ConfigError(f"ingest.source_paths.{name}: empty folder")
            if self.source_entries and name not in self.source_entries:
                raise ConfigError(f"ingest.source_paths.{name}: not among ingest.source_entries, so never read")
        uncovered = [n for n in self.source_entries if n not in self.source_paths]
        if not self.sources_root and (uncovered or not self.source_entries):
            raise ConfigError(
                "ingest.sources_root: needed to find "
                + (
                    f"entr{'ies' if len(uncovered) > 1 else 'y'} {', '.join(map(repr, uncovered))}"
                    if uncovered
                    else "the catalog's entries"
                )
                + " (or give each entry a folder in ingest.source_paths and name them in ingest.source_entries)"
            )
