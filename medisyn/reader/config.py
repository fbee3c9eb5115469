"""Blinded reader-study settings (paper: 102 images per specialty, half synthetic, 3 classes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class ReaderConfig:
    RANGES: ClassVar[dict[str, str]] = {
        "images_per_study": ">=2",
        "classes_per_study": ">=2",
        "port": "1..65535",
    }
    images_per_study: int = 102  # half real test images, half synthetic
    classes_per_study: int = 3
    host: str = "127.0.0.1"
    port: int = 8765
