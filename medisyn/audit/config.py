"""Audit settings: memorization (nearest neighbour + patch distance) and utility (ResNet-50 trials)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medisyn.configtools import ConfigError
from medisyn.presets import preset_names


@dataclass(frozen=True)
class MemorizationConfig:
    """Paper: BiomedCLIP cosine nearest neighbour, 4x4 patch distance, threshold 0.15."""

    embedder: str = "biomedclip"  # embedder preset (medisyn/presets), or hf-hub:org/repo, local-dir:/path
    sets: tuple[str, ...] = ("memorization",)  # synthetic sets to audit
    images_per_prompt: int = 500  # audited images per prompt (the first ones by index)
    grid: int = 4  # patches per side
    threshold: float = 0.15  # distance at or below which a pair is a possible copy
    k: int = 50  # embedding neighbours re-ranked by patch distance
    relative_alpha: float = 0.5  # relative distance = distance / (alpha x mean distance to the k neighbours)
    control_queries: int = 1000  # held-out test images and left-out train images searched as controls
    shard_size: int = 65536  # train embeddings per block of the exact search
    batch_size: int = 64  # images per embedding call
    num_actors: int = 4  # embedding actors at most (one GPU each on GPU clusters)

    def __post_init__(self):
        if not self.sets:
            raise ConfigError("audit_memorization.sets: name at least one synthetic set")
        if self.k < 1 or self.grid < 1 or self.shard_size < 1 or self.control_queries < 0:
            raise ConfigError("audit_memorization: k, grid and shard_size must be >= 1, control_queries >= 0")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"audit_memorization.threshold: {self.threshold} is outside (0, 1)")
        valid = preset_names("embedder")
        if self.embedder not in valid and not self.embedder.startswith(("hf-hub:", "local-dir:")):
            raise ConfigError(
                f"audit_memorization.embedder: unknown embedder {self.embedder!r}; expected one of "
                f"{', '.join(valid)}, hf-hub:<repo id> or local-dir:<path>"
            )


@dataclass(frozen=True)
class FidelityConfig:
    """Prompt fidelity: a classifier trained on real train images labels the synthetic images."""

    sets: tuple[str, ...] = ("memorization",)  # synthetic sets to check (their prompts name specialty and type)
    features: Literal["thumbnail", "embedder"] = "embedder"  # embedder: audit_memorization.embedder (linear probe)
    thumbnail_size: int = 16  # side of the colour thumbnails (features: thumbnail)
    real_per_class: int = 200  # real train images per class the classifier learns from (0 = all)

    def __post_init__(self):
        if not self.sets:
            raise ConfigError("audit_fidelity.sets: name at least one synthetic set")
        if self.thumbnail_size < 2 or self.real_per_class < 0:
            raise ConfigError("audit_fidelity: thumbnail_size must be >= 2 and real_per_class >= 0")


@dataclass(frozen=True)
class UtilityConfig:
    """Paper: ImageNet ResNet-50, 2,000 real vs 1,000 real vs 1,000 real + 1,000 synthetic."""

    tasks: tuple[str, ...] = ("chest-xray", "dermoscopy", "prostatectomy")
    real_full: int = 2000
    real_half: int = 1000
    synthetic: int = 1000
    epochs: int = 15
    learning_rate: float = 1e-4  # AdamW
    image_size: int = 224  # classifier input side in pixels
    bootstrap_resamples: int = 2000
    seeds: int = 1  # trials per arm
    pretrained: bool = True  # ImageNet weights (offline runs set false)
