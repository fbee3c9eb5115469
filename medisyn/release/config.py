"""Release settings: which set leaves the run, and the policy it must pass first."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from medisyn.configtools import ConfigError

AUDITS = ("memorization", "fidelity")  # audits a release can require (their records name set and corpus)
INTENDED_USE = (
    "Research on medical image analysis: training and evaluating classifiers alongside real data, and "
    "studying generative models. Not for clinical decisions, and not a stand-in for the patients of the "
    "source repositories."
)


@dataclass(frozen=True)
class ReleaseConfig:
    """``medisyn release``: a synthetic set as Parquet shards that Hugging Face ``datasets`` loads, a card
    (README.md with its YAML header, croissant.json) and the list of images left out, beside it."""

    RANGES: ClassVar[dict[str, str]] = {
        "max_flag_rate": "0..1",
        "min_fidelity": "0..1",
        "max_gap": ">=0",
        "shard_rows": ">=1",
    }

    set: str = ""  # the synthetic set to release; "" = the stage does nothing and says so
    name: str = ""  # folder name under <run_dir>/release; "" = the set's name
    require: tuple[str, ...] = ("memorization",)  # audits that must have finished on these images and corpus
    max_flag_rate: float = 0.05  # the memorization audit's flag rate (its own) above which the release is refused
    min_fidelity: float = 0.0  # every specialty's prompt-fidelity share must reach this (0 = not checked)
    on_flagged: Literal["drop", "refuse"] = "drop"  # flagged images are left out, or the release is refused
    max_gap: float = 0.0  # images whose guidance_gap is above this are left out (0 = the gap is not used)
    shard_rows: int = 512  # rows per Parquet shard
    licence: str = ""  # the card's licence (an SPDX id); "" = "other": the sources' licences apply
    intended_use: str = INTENDED_USE

    def __post_init__(self):
        unknown = [a for a in self.require if a not in AUDITS]
        if unknown:
            raise ConfigError(
                f"release.require: unknown audit(s) {', '.join(map(repr, unknown))}; "
                f"expected some of {', '.join(AUDITS)}"
            )
        for key in ("set", "name"):
            value = getattr(self, key)
            if value and (value.startswith(".") or any(c in value for c in "/\\") or value != value.strip()):
                raise ConfigError(f"release.{key}: {value!r} is not a plain folder name")
        if not self.intended_use.strip():
            raise ConfigError("release.intended_use: say what the data is for (the card prints it)")
