"""Blinded reader-study settings (paper: 102 images per study, half synthetic, 3 classes).

A study (``jobs/configs/reader/<name>.yaml``: ``paper`` holds the paper's two, ``demo`` their
phantom equivalents) names one task: specialty, image type, optional repositories, the classes
readers choose from, and the synthetic set its generated half comes from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from medisyn.configtools import ConfigError, load_yaml_file, named_file
from medisyn.phrases import ClassNeed
from medisyn.records import IMAGE_TYPES, SPECIALTIES

STUDY_DIR = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "reader"
STUDY_KEYS = ("name", "question", "specialty", "image_type", "sources", "classes", "synthetic_set")
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


@dataclass(frozen=True)
class ReaderConfig:
    RANGES: ClassVar[dict[str, str]] = {
        "images_per_study": ">=2",
        "repeat_fraction": "0..1",
        "image_size": ">=16",
        "port": "1..65535",
        "bootstrap_resamples": ">=1",
        "link_expiry_hours": ">0",
    }
    enabled: bool = True  # `medisyn pipeline` builds the studies (needs the studies' synthetic set)
    studies_file: str = "paper"  # jobs/configs/reader/<name>.yaml, or a path
    studies: tuple[str, ...] = ()  # which of the file's studies to build; () = all
    images_per_study: int = 102  # half real test images, half synthetic, balanced across classes
    real_splits: tuple[str, ...] = ("test",)  # where the real half comes from (the demo adds val: few patients)
    repeat_fraction: float = 0.1  # share of images shown a second time (intra-reader agreement)
    image_size: int = 512  # every served image is re-encoded to this square size
    dir: str = "{run_dir}/reader"  # study database and images: a local path (SQLite needs a disk)
    host: str = "127.0.0.1"  # serve binds here; put TLS in front of it (README) before leaving localhost
    port: int = 8765
    bootstrap_resamples: int = 2000  # readers x cases resamples of the real - synthetic accuracy difference
    link_expiry_hours: float = 168.0  # a reader's link works once, within this long of add-reader/reissue

    def __post_init__(self):
        if "://" in self.dir:
            raise ConfigError(
                f"reader.dir: {self.dir!r} is a URI; the study's SQLite database needs a local disk "
                "(the corpus and synthetic sets may stay on object storage)"
            )
        bad = [s for s in self.real_splits if s not in ("train", "val", "test")]
        if bad or not self.real_splits:
            raise ConfigError(f"reader.real_splits: {list(self.real_splits)} must name some of train, val, test")
        if self.images_per_study % 2:
            raise ConfigError(
                f"reader.images_per_study: {self.images_per_study} must be even (half real, half synthetic)"
            )


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    specialty: str
    image_type: str
    classes: tuple[str, ...]
    synthetic_set: str
    sources: tuple[str, ...] = ()

    def label_of(self, labels) -> str | None:
        """The class of a row whose labels name exactly one of the study's classes, else None."""
        hits = [c for c in self.classes if c in labels]
        return hits[0] if len(hits) == 1 else None


def load_studies(studies_file: str, names: tuple[str, ...] = ()) -> list[Study]:
    """The studies of a file (by name under ``jobs/configs/reader/`` or a path), checked whole."""
    path = named_file(studies_file, STUDY_DIR, "reader.studies_file")
    data = load_yaml_file(path, "reader.studies_file") or {}
    raw = data.get("studies") if isinstance(data, dict) else None
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{path}: expected a mapping with a non-empty list under 'studies'")
    studies = [_study(s, f"{path.name}: studies[{i}]") for i, s in enumerate(raw)]
    seen = [s.name for s in studies]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"{path.name}: study names repeat: {', '.join(seen)}")
    unknown = sorted(set(names) - set(seen))
    if unknown:
        raise ConfigError(f"reader.studies: unknown study {unknown[0]!r}; {path.name} has {', '.join(seen)}")
    return [s for s in studies if not names or s.name in names]


def study_needs(studies: list[Study]) -> list[ClassNeed]:
    """Every study class, to check against the corpus's phrases before a study is drawn (:mod:`medisyn.phrases`)."""
    return [
        ClassNeed(c, f"reader study {s.name!r}", s.specialty, s.image_type, s.sources)
        for s in studies
        for c in s.classes
    ]


def _study(raw, where: str) -> Study:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(STUDY_KEYS)}")
    missing = [k for k in ("name", "specialty", "image_type", "classes", "synthetic_set") if not raw.get(k)]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    name = str(raw["name"])
    if not STUDY_NAME.fullmatch(name):
        raise ConfigError(f"{where}: study name {name!r} must be 1-64 letters, digits, '-' or '_'")
    if raw["specialty"] not in SPECIALTIES:
        raise ConfigError(f"{where} ({name}): unknown specialty {raw['specialty']!r}; expected one of {SPECIALTIES}")
    if raw["image_type"] not in IMAGE_TYPES:
        raise ConfigError(f"{where} ({name}): unknown image_type {raw['image_type']!r}; expected one of {IMAGE_TYPES}")
    classes = raw["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or len({str(c) for c in classes}) != len(classes):
        raise ConfigError(f"{where} ({name}): classes must list at least two distinct labels")
    sources = raw.get("sources") or []
    if not isinstance(sources, list):
        raise ConfigError(f"{where} ({name}): sources must be a list of repository names")
    question = str(raw.get("question") or f"Which finding does this {raw['image_type']} image show?")
    return Study(
        name,
        question,
        raw["specialty"],
        raw["image_type"],
        tuple(str(c) for c in classes),
        str(raw["synthetic_set"]),
        tuple(str(s) for s in sources),
    )
