"""Where each catalog entry's files are, and which entries an ingest or a check reads.

A catalog (``ingest.sources``, DESIGN §10) describes public repositories as their publishers ship
them; a user keeps each in its own folder, ``<ingest.sources_root>/<entry name>`` or the folder
``ingest.source_paths`` gives it (local or ``s3://``). Many users cannot get every repository
(credentialed sets), so an entry whose folder is absent is skipped, and the summary says how to get
it. A present entry that does not match its description is an error (raised by
``steps.list_entry``), never a silent zero. Runs on the driver, without Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from upath import UPath

from medisyn import storage
from medisyn.configtools import ConfigError
from medisyn.ingest.config import IngestConfig, RepositoryConfig
from medisyn.ingest.describe import SourceEntry, load_catalog
from medisyn.ingest.listing import glob_files, load_repositories


@dataclass(frozen=True)
class Source:
    """One catalog entry and its folder; ``skipped`` says why it is not read ("" = it is read)."""

    entry: SourceEntry
    root: UPath
    present: bool  # the folder exists (as seen from the driver)
    skipped: str = ""  # reason, and for an absent folder the entry's access terms and download steps


@dataclass(frozen=True)
class Reading:
    """What the pipeline's unit planning needs of a repository (``RepositoryConfig`` has the same
    attributes), for a catalog entry."""

    name: str
    kind: Literal["dicom", "image", "wsi", "video", "mat", "hdf5", "nifti"]
    specialty: str
    image_type: str
    frames: str
    intensity: str
    settings: tuple[tuple[str, object], ...] = ()  # UnitSettings fields the entry's reader spec sets


def _reader_settings(entry: SourceEntry) -> dict:
    """The UnitSettings of an entry's reader spec (so unit ids change with them); wsi: only what it sets."""
    out: dict = {}
    if entry.video is not None:
        out["video_fps"] = float(entry.video.fps)
    if entry.hdf5 is not None:
        out["hdf5_dataset"] = entry.hdf5.dataset
    if entry.mat is not None:
        out |= {"mat_image": entry.mat.image, "mat_transpose": entry.mat.transpose}
    if entry.reader == "nifti" and entry.volume is not None:
        v = entry.volume
        out |= {
            "volume_axis": v.axis,
            "volume_every": v.every,
            "volume_keep": tuple(v.keep),
            "volume_channel": v.channel,
        }
    if entry.wsi is not None:
        w = entry.wsi
        named = {"wsi_level": w.level, "wsi_patch_size": w.patch_size, "wsi_overlap": w.overlap}
        out |= {k: v for k, v in (named | {"wsi_tissue_fraction": w.tissue_fraction}).items() if v is not None}
        if w.magnification:
            out["wsi_magnification"] = float(w.magnification)
    if entry.lesions is not None:
        les = entry.lesions
        out |= {"tumour_min": les.tumour_min, "normal_max": les.normal_max, "per_slide": les.per_slide}
        out |= {"seed": entry.caps.seed, "lesions": True}
        if les.masks:
            out["lesion_masks"] = True
    return out


def reading(entry: SourceEntry) -> Reading:
    """``intensity: auto`` resolves as for repositories (MRI and mammography clip by percentile), so
    a catalog entry and the same files described as a repository give the same pixels."""
    intensity = entry.intensity
    if intensity == "auto":
        text = " ".join((entry.name, getattr(entry, "repository", ""), getattr(entry, "caption", ""))).lower()
        if entry.image_type == "magnetic resonance imaging" or "mammogra" in text:
            intensity = "percentile"
    settings = tuple(sorted(_reader_settings(entry).items()))
    return Reading(entry.name, entry.reader, entry.specialty, entry.image_type, entry.frames, intensity, settings)


def absent_text(entry: SourceEntry, root: UPath) -> str:
    """Why an absent entry is skipped and how to get it (shown in the summary and by ``sources check``)."""
    return f"absent: no folder {storage.uri(root)}; access: {entry.access}; download: {entry.download}"


def entry_root(name: str, cfg: IngestConfig, resolve=str) -> UPath:
    """``ingest.source_paths[name]``, else ``<ingest.sources_root>/<name>``; ``resolve`` fills placeholders
    such as ``{run_dir}`` and must keep a URI a URI."""
    if name in cfg.source_paths:
        return storage.path(os.fspath(resolve(cfg.source_paths[name])))
    if not cfg.sources_root:
        raise ConfigError(
            f"ingest.sources_root: needed to find source {name!r} (or give it a folder in ingest.source_paths)"
        )
    return storage.path(os.fspath(resolve(cfg.sources_root))) / name


def _is_dir(root: UPath) -> bool:
    try:
        if storage.is_remote(root):
            root.fs.invalidate_cache(root.path.rstrip("/"))  # this process may have listed it before it changed
        return root.is_dir()
    except OSError:  # an unreadable mount or bucket: as absent, its reason in the summary
        return False


def load_sources(cfg: IngestConfig, resolve=str) -> tuple[Source, ...]:
    """The entries of ``ingest.sources`` (only ``ingest.source_entries`` when set, in catalog order),
    each with its folder and whether it is read. Unknown entry names are a ConfigError listing the
    catalog's names."""
    if not cfg.sources:
        return ()
    entries = load_catalog(cfg.sources, cfg.source_settings)
    names = [e.name for e in entries]
    for key, wanted in (("source_entries", cfg.source_entries), ("source_paths", tuple(cfg.source_paths))):
        unknown = [n for n in wanted if n not in names]
        if unknown:
            raise ConfigError(
                f"ingest.{key}: no entr{'ies' if len(unknown) > 1 else 'y'} {', '.join(map(repr, unknown))} in "
                f"catalog {cfg.sources!r}; its entries: {', '.join(names)}"
            )
    out = []
    for entry in entries:
        if cfg.source_entries and entry.name not in cfg.source_entries:
            continue
        root = entry_root(entry.name, cfg, resolve)
        present = _is_dir(root)
        skipped = "" if present else absent_text(entry, root)
        out.append(Source(entry, root, present, skipped))
    return tuple(out)


def load_inputs(
    cfg: IngestConfig, resolve=str
) -> tuple[tuple[tuple[RepositoryConfig, UPath], ...], tuple[Source, ...]]:
    """Old-format repositories (``ingest.repositories``/``repositories_file``) and catalog sources,
    together: names unique across both, and at least one of them configured."""
    repos = load_repositories(cfg, resolve) if cfg.repositories or cfg.repositories_file else ()
    sources = load_sources(cfg, resolve)
    if not repos and not sources:
        raise ConfigError(
            "ingest: no repositories; set ingest.sources (a catalog, e.g. paper) with ingest.sources_root, "
            "or ingest.repositories or ingest.repositories_file"
        )
    names = [r.name for r, _ in repos] + [s.entry.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"ingest: repository and source names must be unique; repeated: {', '.join(dupes)} "
            "(rename the repository, or leave the entry out with ingest.source_entries)"
        )
    return repos, sources


def matching(root: UPath, pattern: str) -> list[str]:
    """Relative POSIX paths of the files ``pattern`` matches under ``root`` (local or an object store,
    one listing of the prefix), sorted."""
    return [rel for rel, _, _ in glob_files(root, pattern)]


def probes(sources: tuple[Source, ...], first_file: dict[str, str]) -> dict[str, tuple[str, str]]:
    """What every node must read before ingest starts (``raytools.check_sources``): each read entry's
    folder and each of its table files (resolved from their globs here, on the driver); an entry
    without tables is probed with its first listed file (``first_file``: entry -> path or URI)."""
    out: dict[str, tuple[str, str]] = {}
    for s in sources:
        if s.skipped:
            continue
        files = [storage.uri(s.root / rel) for pattern in s.entry.table_files for rel in matching(s.root, pattern)]
        if not files and s.entry.name in first_file:
            files = [first_file[s.entry.name]]
        for i, f in enumerate(files):
            out[s.entry.name if i == 0 else f"{s.entry.name} (table {i + 1})"] = (storage.uri(s.root), f)
    return out
