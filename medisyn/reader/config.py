"""Blinded reader-study settings (paper: 102 images per specialty, half synthetic, 3 classes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReaderConfig:
    images_per_study: int = 102  # half real test images, half synthetic
    classes_per_study: int = 3
    host: str = "127.0.0.1"
    port: int = 8765
