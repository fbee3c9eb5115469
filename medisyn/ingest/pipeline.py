"""The ``ingest`` stage: repositories → corpus parquet shards + rejects, on Ray Data.

    listing (driver: labels joined, ids hashed)
      → Ray Data map: read + transform + encode, one task per unit of files → staging shards
      → duplicates found per repository from the small hash columns (driver)
      → Ray Data map: staging shard minus duplicates → corpus shard + rejects shard
      → summary.json and a printed table

Memory stays bounded: tasks stream row groups to disk and return only counts; the driver
reads only hash and label columns, never images. Re-running skips finished units and
finalized shards, so an interrupted ingest resumes without duplicating a shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medisyn.config import ConfigError, RunConfig
from medisyn.ingest.dedup import find_duplicates
from medisyn.ingest.listing import list_repository, load_repositories
from medisyn.ingest.summary import summarize, write_summary
from medisyn.ingest.units import FinalizeJob, Item, Unit, UnitSettings, unit_id
from medisyn.ingest.worker import finalize_unit, process_unit
from medisyn.records import (
    REJECT_SCHEMA,
    SHARD_LIST,
    atomic_write_table,
    atomic_write_text,
    publish_shards,
    shard_files,
)

log = logging.getLogger(__name__)
STAGING_FORMAT = 4  # bump when the staging shard layout changes, so old shards are not reused


def ingest_dirs(cfg: RunConfig) -> dict[str, Path]:
    root = cfg.run_path
    return {
        "corpus": root / "corpus",
        "rejects": root / "rejects",
        "staging": root / "ingest" / "staging",
        "ingest": root / "ingest",
        "private": root / "private",
    }


def _settings(repo, cfg: RunConfig) -> UnitSettings:
    i = cfg.ingest
    return UnitSettings(
        kind=repo.kind,
        specialty=repo.specialty,
        image_type=repo.image_type,
        frames=repo.frames,
        intensity=repo.intensity,
        size=i.size,
        png_compress_level=i.png_compress_level,
        image_format=i.image_format,
        window=(i.ct_window_width, i.ct_window_level),
        pct=(i.percentile_low, i.percentile_high),
        wsi_level=i.wsi_level,
        wsi_patch_size=i.wsi_patch_size,
        wsi_overlap=i.wsi_overlap,
        wsi_tissue_fraction=i.wsi_tissue_fraction,
        row_group_rows=i.row_group_rows,
        max_pixels=i.max_pixels,
        format=STAGING_FORMAT,
    )


def plan_units(repo, items: list[Item], cfg: RunConfig, staging: Path) -> list[Unit]:
    """Chunks of ``files_per_task`` files (one slide per unit), each with a content-derived id."""
    per = 1 if repo.kind == "wsi" else cfg.ingest.files_per_task
    settings = _settings(repo, cfg)
    chunks = [items[start : start + per] for start in range(0, len(items), per)]
    return [Unit(unit_id(repo.name, chunk, settings), str(staging), settings, tuple(chunk)) for chunk in chunks]


def _ray_map(key: str, rows: list, fn, max_tasks: int = 0) -> list[dict]:
    """Run ``fn`` over typed rows ``{key: row}`` as a Ray Data job: one block per row, so every
    row is its own task."""
    import ray

    if not rows:
        return []
    ds = ray.data.from_items([{key: r} for r in rows], override_num_blocks=len(rows))
    compute = ray.data.TaskPoolStrategy(size=max_tasks) if max_tasks else None
    return ds.map(fn, num_cpus=1, compute=compute).take_all()


def _dedup(units: list[Unit], staging: Path, max_distance: int, max_rms: float) -> dict[str, dict[str, list[str]]]:
    """``{unit id: {ref: [reason, kept ref]}}`` from the hash columns of each repository's shards."""
    by_repo: dict[str, list[str]] = {}
    for u in units:
        by_repo.setdefault(u.items[0].repo, []).append(u.id)
    dropped_by_unit: dict[str, dict[str, list[str]]] = {u.id: {} for u in units}
    for uids in by_repo.values():
        cols = {"source_ref": [], "id": [], "phash": [], "thumb": []}
        unit_of = {}
        for uid in uids:
            t = pq.read_table(staging / f"{uid}.parquet", columns=list(cols))
            for k in cols:
                cols[k].extend(t.column(k).to_pylist())
            unit_of.update({r: uid for r in t.column("source_ref").to_pylist()})
        found = find_duplicates(cols["source_ref"], cols["id"], cols["phash"], max_distance, cols["thumb"], max_rms)
        for ref, (reason, kept) in found.items():
            dropped_by_unit[unit_of[ref]][ref] = [reason, kept]
    return dropped_by_unit


def run(cfg: RunConfig) -> dict:
    from medisyn.raytools import ensure_ray

    d = ingest_dirs(cfg)
    for p in d.values():
        p.mkdir(parents=True, exist_ok=True)
    repos = load_repositories(cfg.ingest, cfg.resolve)  # config errors stop here, before any work
    listing_rejects, source_map, units = [], [], []
    for repo, root in repos:
        items, rejects, refs = list_repository(repo, root, cfg.ingest)
        log.info("ingest: %s: %d files to read, %d rejected at listing", repo.name, len(items), len(rejects))
        listing_rejects += rejects
        source_map += [{"source_ref": r, "source": repo.name, "path": p} for r, p in refs.items()]
        units += plan_units(repo, items, cfg, d["staging"])
    atomic_write_table(
        pa.Table.from_pylist(
            source_map, pa.schema([("source_ref", pa.string()), ("source", pa.string()), ("path", pa.string())])
        ),
        d["private"] / "source_map.parquet",
    )

    todo = [u for u in units if not (d["staging"] / f"{u.id}.json").exists()]
    log.info("ingest: %d units, %d already done, %d to process", len(units), len(units) - len(todo), len(todo))
    ensure_ray()
    _ray_map("unit", todo, process_unit, cfg.ingest.max_tasks)
    unit_counts = [json.loads((d["staging"] / f"{u.id}.json").read_text()) for u in units]

    dropped = _dedup(units, d["staging"], cfg.ingest.near_duplicate_bits, cfg.ingest.near_duplicate_rms)
    state_file = d["ingest"] / "finalized.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    # a corpus shard is final for a given set of duplicates to drop; rewrite it when that set changes
    fingerprints = {u.id: hashlib.sha256(json.dumps(dropped[u.id], sort_keys=True).encode()).hexdigest() for u in units}
    jobs = [
        FinalizeJob(
            uid,
            str(d["staging"]),
            str(d["corpus"]),
            str(d["rejects"]),
            {ref: tuple(v) for ref, v in dropped[uid].items()},
        )
        for uid, fp in fingerprints.items()
        if not (
            state.get(uid) == fp
            and (d["corpus"] / f"{uid}.parquet").exists()
            and (d["rejects"] / f"{uid}.parquet").exists()
        )
    ]
    log.info("ingest: %d shards to finalize", len(jobs))
    _ray_map("job", jobs, finalize_unit, cfg.ingest.max_tasks)
    atomic_write_text(json.dumps(fingerprints, indent=0), state_file)

    current = sorted(f"{u.id}.parquet" for u in units)
    accepted = sum(pq.ParquetFile(d["corpus"] / name).metadata.num_rows for name in current)
    if accepted == 0:  # an all-rejecting run never replaces a corpus: the previous one stays in force
        reasons = Counter(r["reason"] for r in listing_rejects)
        for name in current:
            reasons.update(pq.read_table(d["rejects"] / name, columns=["reason"]).column("reason").to_pylist())
        top = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3))
        kept = len(shard_files(d["corpus"])) if (d["corpus"] / SHARD_LIST).is_file() else 0
        raise ConfigError(  # the CLI prints it as one line: the input, not the code, is at fault
            f"ingest: every image was rejected ({sum(reasons.values())} rejects; most common: {top or 'no files'}); "
            + (f"the previous corpus ({kept} shards) is kept" if kept else "no corpus was written")
        )
    listing_name = "listing.parquet"
    atomic_write_table(pa.Table.from_pylist(listing_rejects, REJECT_SCHEMA), d["rejects"] / listing_name)
    publish_shards(d["corpus"], current)
    publish_shards(d["rejects"], [*current, listing_name])

    summary = summarize(d["corpus"], d["rejects"], unit_counts, files=len(source_map))
    write_summary(summary, d["ingest"] / "summary.json")
    return summary
