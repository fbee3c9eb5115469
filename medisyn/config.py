"""The run configuration: one typed dataclass per stage, composed, loaded from YAML.

``load_config("jobs/configs/demo.yaml", ["train.epochs=2"])`` returns a frozen
:class:`RunConfig` or raises :class:`ConfigError` naming the bad key, before any work starts.
Relative paths inside a config resolve against the folder the command runs in (a Ray job's
working dir), except repository paths inside a repositories file, which resolve against
that file's folder. ``{run_dir}`` in a path is replaced by the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

from medisyn.audit.config import FidelityConfig, MemorizationConfig, UtilityConfig
from medisyn.configtools import ConfigError, apply_overrides, build, read_yaml, to_dict
from medisyn.infer.config import GenerateConfig
from medisyn.ingest.config import IngestConfig
from medisyn.presets import get_preset, preset_names
from medisyn.reader.config import ReaderConfig
from medisyn.release.config import ReleaseConfig
from medisyn.select.config import SelectConfig
from medisyn.storage import path as store_path
from medisyn.train.config import CacheConfig, TrainConfig, VaeFitConfig, check_memory_plan

__all__ = ["ConfigError", "ModelConfig", "PhantomsConfig", "RunConfig", "load_config", "to_dict"]


@dataclass(frozen=True)
class ModelConfig:
    """Which networks to build: a diffusion preset of ``medisyn/presets`` (sdxl, tiny, sdxl-random)."""

    RANGES: ClassVar[dict[str, str]] = {"seed": ">=0"}

    preset: str = "sdxl"  # a diffusion preset name (medisyn/presets/<name>.json)
    base: str = ""  # SDXL base repo id or local dir; "" = the preset's default
    vae: str = ""  # VAE repo id or local dir; "" = the preset's default (fp16-fix)
    seed: int = 0  # weight-init seed of build presets (tiny, sdxl-random)
    # What the U-Net predicts: "" = the scheduler's own (SDXL base: epsilon). "v_prediction" trains
    # and samples the velocity (the demo: fewer colour casts from the seed); export records it.
    prediction_type: Literal["", "epsilon", "v_prediction"] = ""

    def __post_init__(self):
        valid = preset_names("diffusion")
        if self.preset not in valid:
            raise ConfigError(f"model.preset: unknown preset {self.preset!r}; expected one of {', '.join(valid)}")


@dataclass(frozen=True)
class PhantomsConfig:
    """The offline demo corpus (``medisyn phantoms``), used when the run starts from phantoms."""

    RANGES: ClassVar[dict[str, str]] = {"seed": ">=0"}

    enabled: bool = False  # generate phantom repositories before ingest
    out: str = "phantoms"  # folder under run_dir, or an absolute path (required when run_dir is a URI)
    seed: int = 0
    scale: Literal["small", "medium"] = "small"
    # demo: each repository as its publisher ships it, read through the paper catalog (ingest.sources: paper);
    # flat: one label table per repository and a repositories.yaml (the ingest.repositories format)
    layout: Literal["demo", "flat"] = "demo"


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; each stage reads its own section."""

    RANGES: ClassVar[dict[str, str]] = {"seed": ">=0"}

    run_dir: str = "runs/default"  # root of every output (local path or cluster URI)
    seed: int = 0  # global seed for splits, sampling and trials
    model: ModelConfig = field(default_factory=ModelConfig)
    phantoms: PhantomsConfig = field(default_factory=PhantomsConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    vae_fit: VaeFitConfig = field(default_factory=VaeFitConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    audit_fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    audit_memorization: MemorizationConfig = field(default_factory=MemorizationConfig)
    audit_utility: UtilityConfig = field(default_factory=UtilityConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    config_path: str = ""  # set by load_config: the YAML file this came from

    def __post_init__(self):
        if "{run_dir}" in self.model.vae:  # a VAE the run fits itself (vae stage): a path in the run
            object.__setattr__(
                self, "model", replace(self.model, vae=self.model.vae.replace("{run_dir}", self.run_dir))
            )
        if self.vae_fit.enabled:
            if not self.model.vae:
                raise ConfigError('vae_fit.enabled: set model.vae to the directory to fit into (e.g. "{run_dir}/vae")')
            if "build" not in get_preset(self.model.preset) or self.model.base:
                raise ConfigError(
                    f"vae_fit.enabled: model.preset {self.model.preset!r} loads a pretrained VAE; "
                    "fitting is for build presets (tiny)"
                )
            if self.vae_fit.crop_size > self.train.resolution:
                raise ConfigError(
                    f"vae_fit.crop_size: {self.vae_fit.crop_size} is larger than the images it crops "
                    f"(train.resolution {self.train.resolution})"
                )
        check_memory_plan(self.model.preset, self.train)  # GPU configs only; the lines are in the message

    @property
    def run_path(self):
        """The run directory as a ``UPath``: a local absolute path or an ``s3://`` URI (storage.py)."""
        return store_path(self.run_dir)

    def resolve(self, path: str) -> Path:
        """A config path with ``{run_dir}`` filled in."""
        return Path(path.replace("{run_dir}", self.run_dir))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read YAML (or start from defaults), apply ``key=value`` overrides, validate everything."""
    data = read_yaml(path) if path else {}
    if "config_path" in data:
        raise ConfigError("config_path is set by the loader; remove it from the file")
    data = apply_overrides(RunConfig, data, list(overrides))
    if path:
        data["config_path"] = str(Path(path).resolve())
    where = f"{path}: " if path else ""
    try:
        return build(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
