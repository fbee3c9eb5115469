"""Per-repository generation context: deterministic RNGs, patient ids, writers.

Every random draw comes from a `numpy.random.Generator` seeded by
(seed, crc32(repo name), index), so output is byte-identical for a given
seed/scale and independent of the order repositories are generated in.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PLANTED_MARKER = "LEAKCANARY"
PLANTED_PATIENT_NAME = "LEAKCANARY^PHANTOM"
PLANTED_INSTITUTION = "LEAKCANARY GENERAL HOSPITAL"

PATIENT_OFFSET = 1_000_000  # rng index space for per-patient draws
DEFECT_OFFSET = 2_000_000  # rng index space for planted defects


@dataclass
class GenResult:
    """What a repository generator produced (rows become the label CSV)."""

    rows: list[dict]
    files: int = 0  # valid image files written
    frames: int = 0  # 2-D images inside them (DICOM slices/frames, JPEGs, ...)
    slides: int = 0  # whole-slide images
    extra: dict = field(default_factory=dict)


@dataclass
class GenContext:
    seed: int
    repo: str
    repo_dir: Path

    @property
    def repo_key(self) -> int:
        return zlib.crc32(self.repo.encode("utf-8"))

    def rng(self, i: int) -> np.random.Generator:
        """Generator for item `i` of this repository."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.repo_key, i]))

    def patient_rng(self, p: int) -> np.random.Generator:
        """Generator for per-patient attributes shared by all their images."""
        return self.rng(PATIENT_OFFSET + p)

    def patient_id(self, p: int) -> str:
        """MRN-like id, unique within the repository, e.g. 'P4170012'."""
        return f"P{100 + self.repo_key % 900}{p:04d}"

    def uid(self, *parts) -> str:
        """Deterministic DICOM UID from the seed, repo and any identifying parts."""
        from pydicom.uid import generate_uid

        src = "|".join([str(self.seed), self.repo, *map(str, parts)])
        return str(generate_uid(entropy_srcs=[src]))

    def path(self, rel: str) -> Path:
        p = self.repo_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def save_jpeg(arr: np.ndarray, path: Path, quality: int = 90) -> None:
    """RGB uint8 -> baseline JPEG (Pillow's encoder is deterministic)."""
    Image.fromarray(arr).save(path, format="JPEG", quality=quality, optimize=False)


def save_png(arr: np.ndarray, path: Path) -> None:
    """uint8 (L/RGB) or uint16 ('I;16') array -> PNG."""
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def split_patients(n_images: int, rng: np.random.Generator, lo: int = 2, hi: int = 4) -> list[int]:
    """Partition n images into per-patient groups of lo..hi images (sizes)."""
    sizes, left = [], n_images
    while left > 0:
        k = int(min(left, rng.integers(lo, hi + 1)))
        sizes.append(k)
        left -= k
    return sizes


def class_schedule(
    ctx: GenContext, classes: list[str], n_per_class: int, lo: int = 2, hi: int = 4
) -> list[tuple[int, str, int]]:
    """(patient index, class, image index) for single-label repos.

    Each patient has one class and lo..hi images, so a random image-level
    split would leak patients across train/test (a patient-level split matters).
    """
    out, p, i = [], 0, 0
    rng = ctx.rng(PATIENT_OFFSET - 1)
    for c in classes:
        for size in split_patients(n_per_class, rng, lo, hi):
            for _ in range(size):
                out.append((p, c, i))
                i += 1
            p += 1
    return out
