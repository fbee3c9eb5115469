"""Named model presets as data (open_clip's habit): one JSON file per preset in this folder.

Each file has a ``kind`` — ``diffusion`` (a text-to-image pipeline), ``embedder`` (an image
embedder for the memorization audit) or ``scheduler`` — and one way to make it:
``build`` (configs in the file, seeded random weights, no download), ``pretrained`` (hub ids
or local directories) or, for embedders, ``open_clip`` (a hub id) / ``open_clip_config``.
Adding a preset is adding a file; ``medisyn.models`` reads these, and no code branches on a
preset's name. This module imports nothing of medisyn, so configs can validate names.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

PRESET_DIR = Path(__file__).resolve().parent
KINDS = ("diffusion", "embedder", "scheduler")


@cache
def _all() -> dict[str, dict]:
    presets = {}
    for f in sorted(PRESET_DIR.glob("*.json"), key=lambda f: f.stem):
        entry = json.loads(f.read_text())
        if entry.get("kind") not in KINDS:
            raise ValueError(f"preset file {f}: kind {entry.get('kind')!r} is not one of {', '.join(KINDS)}")
        presets[f.stem] = entry
    return presets


def preset_names(kind: str | None = None) -> list[str]:
    """Names of the presets of one kind (all when ``kind`` is None), sorted."""
    return [name for name, entry in _all().items() if kind is None or entry["kind"] == kind]


def get_preset(name: str, kind: str | None = None) -> dict:
    """A copy of preset ``name``; an unknown name (or one of another kind) names the valid ones."""
    entry = _all().get(name)
    if entry is None or (kind is not None and entry["kind"] != kind):
        valid = ", ".join(preset_names(kind))
        raise ValueError(f"unknown {kind + ' ' if kind else ''}preset {name!r}; expected one of {valid}")
    return copy.deepcopy(entry)
