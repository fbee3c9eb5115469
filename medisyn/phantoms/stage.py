"""The ``phantoms`` stage: write the demo source repositories once per (seed, scale, defects)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from medisyn.config import ConfigError, RunConfig
from medisyn.storage import is_remote

log = logging.getLogger(__name__)


def phantoms_dir(cfg: RunConfig) -> Path:
    """Phantoms are source repositories, read by ingest as a user's own files would be: on a
    local or shared disk, so with a ``run_dir`` on object storage ``phantoms.out`` must be an
    absolute path."""
    if Path(cfg.phantoms.out).is_absolute():
        return Path(cfg.phantoms.out)
    if is_remote(cfg.run_dir):
        raise ConfigError(
            f"phantoms.out: {cfg.phantoms.out!r} would be under {cfg.run_dir}, but source repositories are read "
            "from a disk; give an absolute local or shared path"
        )
    return Path(cfg.run_path.path) / cfg.phantoms.out


def ensure_phantoms(out: Path, seed: int, scale: str, defects: bool = True, layout: str = "demo") -> dict:
    """Generate into ``out`` unless a finished generation with the same settings is there.

    ``phantoms.json`` is written last, so its presence means the folder is complete; a
    half-written folder (an interrupted run) is cleared and made again.
    """
    from medisyn.phantoms import catalog_digest, generate_phantoms

    marker = out / "phantoms.json"
    if marker.is_file():
        summary = json.loads(marker.read_text())
        have = (summary.get("catalog"), summary.get("seed"), summary.get("scale"), summary.get("defects_planted"))
        if have == (catalog_digest(), seed, scale, bool(defects)) and summary.get("layout", "flat") == layout:
            log.info("phantoms: %s already holds seed %d, scale %s; nothing to do", out, seed, scale)
            return summary
    if out.exists():
        log.info("phantoms: clearing incomplete or different generation in %s", out)
        shutil.rmtree(out)
    return generate_phantoms(out, seed=seed, scale=scale, defects=defects, layout=layout)


def _print_summary(out: Path, summary: dict) -> None:
    repos = summary.get("repositories", {})
    print(f"phantom repositories in {out}:")
    for name, info in repos.items():
        print(
            f"  {name:16s} {info.get('specialty', ''):17s} {info.get('image_type', ''):30s} "
            f"{info.get('files', '?'):>5} files"
        )
    if summary.get("layout") == "demo":
        read = "ingest.sources: paper, ingest.sources_root: the folder above"
    else:
        read = f"ingest.repositories_file: {out / 'repositories.yaml'}"
    print(f"  planted defects: {len(summary.get('defects', []))}; read with {read}")


def run(cfg: RunConfig) -> None:
    out = phantoms_dir(cfg)
    _print_summary(out, ensure_phantoms(out, cfg.phantoms.seed, cfg.phantoms.scale, layout=cfg.phantoms.layout))


def run_cli(
    cfg: RunConfig, out: str | None, seed: int | None, scale: str | None, defects: bool, layout: str | None = None
) -> None:
    """``medisyn phantoms [OUT] [--seed S] [--scale small|medium] [--layout demo|flat]``; flags win over the config."""
    target = Path(out) if out else phantoms_dir(cfg)
    seed = cfg.phantoms.seed if seed is None else seed
    summary = ensure_phantoms(target, seed, scale or cfg.phantoms.scale, defects, layout or cfg.phantoms.layout)
    _print_summary(target, summary)
