"""Audit settings: memorization (nearest neighbour + patch distance) and utility (ResNet-50 trials)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from medisyn.configtools import ConfigError
from medisyn.presets import preset_names


@dataclass(frozen=True)
class MemorizationConfig:
    """Paper: BiomedCLIP cosine nearest neighbour, 4x4 patch distance, threshold 0.15."""

    RANGES: ClassVar[dict[str, str]] = {
        "images_per_prompt": ">=1",
        "grid": ">=1",
        "threshold": "0..1",
        "k": ">=1",
        "relative_alpha": ">0",
        "control_queries": ">=0",
        "shard_size": ">=1",
        "batch_size": ">=1",
        "min_actors": ">=1",
        "max_actors": ">=0",
    }

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
    # embedding actor pool bounds, one GPU each on GPU clusters (raytools.actor_pool_bounds); max 0 = every GPU
    # the cluster has or its autoscaler can add (1 actor on a CPU cluster). CPU tasks decode the images.
    min_actors: int = 1
    max_actors: int = 0

    def __post_init__(self):
        if not self.sets:
            raise ConfigError("audit_memorization.sets: name at least one synthetic set")
        if self.k < 1 or self.grid < 1 or self.shard_size < 1 or self.control_queries < 0:
            raise ConfigError("audit_memorization: k, grid and shard_size must be >= 1, control_queries >= 0")
        if self.max_actors and self.min_actors > self.max_actors:
            raise ConfigError(
                f"audit_memorization.min_actors: {self.min_actors} is above audit_memorization.max_actors "
                f"({self.max_actors})"
            )
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

    RANGES: ClassVar[dict[str, str]] = {
        "thumbnail_size": ">=2",
        "real_per_class": ">=0",
    }

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
    """Paper: ImageNet ResNet-50 on 2,000 real vs 1,000 real vs 1,000 real + 1,000 synthetic
    train images, 15 epochs, AdamW 1e-4, best-validation epoch tested; plus a 1,000 x 2 control."""

    tasks_file: str = "paper"  # jobs/configs/utility/<name>.yaml, or a path to such a file
    tasks: tuple[str, ...] = ()  # task names to run from the file (empty: all of them)
    real_full: int = 2000  # arm (i): real train images, class-matched
    real_half: int = 1000  # arm (ii): a class-matched subset of (i); (iv) uses it twice
    synthetic: int = 1000  # arm (iii) = (ii) + this many synthetic images, class-matched to (ii)
    seeds: int = 3  # trials per arm; seed k fixes the subset draw, initialisation and data order
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 1e-4  # AdamW
    image_size: int = 224  # classifier input side in pixels
    arch: str = "resnet50"  # a torchvision classification model
    weights: str = "imagenet"  # imagenet (torchvision's, downloaded; random init when unreachable), none, or a file
    equal_steps: bool = False  # every arm trains for as many optimizer steps as arm (i)
    checkpoint: bool = True  # a resumable checkpoint per epoch (off: a restarted trial starts over)
    bootstrap_resamples: int = 2000
    stratified_bootstrap: bool = False  # resample within classes (label combinations), so none goes missing
    cpus_per_trial: float = 4
    gpus_per_trial: float = 1  # on GPU clusters; a fraction packs trials onto one GPU
    max_failures: int = 2  # restarts of a failed trial (from its last checkpoint)

    def __post_init__(self):
        if not 0 < self.real_half <= self.real_full:
            raise ConfigError(f"audit_utility: need 0 < real_half <= real_full, got {self.real_half}, {self.real_full}")
        positive = ("synthetic", "seeds", "epochs", "batch_size", "image_size", "bootstrap_resamples")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"audit_utility.{name}: {getattr(self, name)} must be >= 1")
        if not self.learning_rate > 0:
            raise ConfigError(f"audit_utility.learning_rate: {self.learning_rate} must be > 0")
        if not self.cpus_per_trial > 0 or not 0 < self.gpus_per_trial <= 1 or self.max_failures < 0:
            raise ConfigError("audit_utility: need cpus_per_trial > 0, 0 < gpus_per_trial <= 1, max_failures >= 0")
        if self.arch not in _CLASSIFIERS:
            raise ConfigError(f"audit_utility.arch: {self.arch!r}; expected one of {', '.join(_CLASSIFIERS)}")


_CLASSIFIERS = ("resnet18", "resnet34", "resnet50", "resnet101")  # torchvision ResNets: one head to replace (fc)
