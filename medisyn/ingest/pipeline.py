"""The ``ingest`` stage: repositories → corpus parquet shards + rejects, on Ray Data.

    listing (driver: labels joined, ids hashed; catalog entries by ingest/steps.py, absent ones skipped)
      → Ray Data map: read + transform + encode, one task per unit of files → staging shards
      → duplicates found across all repositories: exact from the pixel hashes (driver),
        near by one Ray task per image type (pHash + thumbnail columns; only drops return)
      → Ray tasks, one per corpus shard: staging shards minus duplicates, compacted into
        shards of ``ingest.shard_rows`` rows (+ their rejects) → one corpus index
      → summary.json and a printed table

Memory stays bounded: tasks stream row groups to disk and return only counts; the driver
reads only hash and label columns and index rows, never images. Re-running skips finished
units and corpus shards already written (their names hash their content), so an interrupted
ingest resumes without duplicating a shard and a rerun that changes nothing rewrites nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa
from upath import UPath

from medisyn.config import ConfigError, RunConfig
from medisyn.ingest.catalog import load_inputs, probes, reading
from medisyn.ingest.compact import COMPACT_FORMAT, CompactJob, compact_shard, plan_shards, shard_index, shard_name
from medisyn.ingest.dedup import find_exact_duplicates, near_duplicates_in_files
from medisyn.ingest.listing import list_repository
from medisyn.ingest.steps import list_entry
from medisyn.ingest.summary import summarize, write_summary
from medisyn.ingest.units import Item, Unit, UnitSettings, unit_id
from medisyn.ingest.worker import process_unit
from medisyn.records import (
    INDEX_DIR,
    REJECT_SCHEMA,
    SHARD_LIST,
    atomic_write_table,
    index_file,
    publish_shards,
    shard_files,
)
from medisyn.storage import parquet_is_whole, read_table, uri

log = logging.getLogger(__name__)
STAGING_FORMAT = 4  # bump when the staging shard layout changes, so old shards are not reused


def ingest_dirs(cfg: RunConfig) -> dict[str, UPath]:
    root = cfg.run_path
    return {
        "corpus": root / "corpus",
        "rejects": root / "rejects",
        "staging": root / "ingest" / "staging",
        "ingest": root / "ingest",
        "private": root / "private",
    }


def _settings(repo, cfg: RunConfig) -> UnitSettings:
    """A repository's (or catalog entry's, with its reader spec's ``settings``) unit settings."""
    return settings_for(repo, cfg.ingest)


def settings_for(repo, i) -> UnitSettings:
    """Unit settings of a repository or a catalog entry's ``Reading`` (its reader spec's ``settings``)
    under ingest config ``i`` (also what ``sources check`` opens its samples with)."""
    return replace(_base_settings(repo, i), **dict(getattr(repo, "settings", ())))


def _base_settings(repo, i) -> UnitSettings:
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


def plan_units(repo, items: list[Item], cfg: RunConfig, staging: UPath) -> list[Unit]:
    """Chunks of ``files_per_task`` files (one slide per unit), or of ``elements_per_task`` consecutive
    elements of one file (a video's frames, an HDF5 file's rows: a long video is many units, and a stopped
    ingest resumes by segment), each with a content-derived id."""
    per = 1 if repo.kind == "wsi" else cfg.ingest.files_per_task
    settings = _settings(repo, cfg)
    if any(it.index >= 0 for it in items):
        per, by_file = cfg.ingest.elements_per_task, {}
        for it in items:
            by_file.setdefault(it.path, []).append(it)
        chunks = [
            run[start : start + per]
            for run in (sorted(v, key=lambda it: it.index) for v in by_file.values())
            for start in range(0, len(run), per)
        ]
    else:
        chunks = [items[start : start + per] for start in range(0, len(items), per)]
    return [Unit(unit_id(repo.name, chunk, settings), uri(staging), settings, tuple(chunk)) for chunk in chunks]


def _ray_map(key: str, rows: list, fn, max_tasks: int = 0) -> list[dict]:
    """Run ``fn`` over typed rows ``{key: row}`` as a Ray Data job: one block per row, so every
    row is its own task."""
    import ray

    if not rows:
        return []
    ds = ray.data.from_items([{key: r} for r in rows], override_num_blocks=len(rows))
    compute = ray.data.TaskPoolStrategy(size=max_tasks) if max_tasks else None
    return ds.map(fn, num_cpus=1, compute=compute).take_all()


def _read_units(units: list[Unit], max_tasks: int) -> None:
    """Ray Data map #1. A source a task cannot fetch or open fails its unit (no marker: the next run
    reads it again) and the stage, as one line naming the repository, the file's ref and the node."""
    try:
        _ray_map("unit", units, process_unit, max_tasks)
    except Exception as exc:  # Ray Data wraps the task's error; its text keeps the worker's message
        found = re.search(r"SourceUnreadable: (.+)", str(exc))
        if found is None:
            raise
        raise ConfigError(f"ingest: {found.group(1).strip()}") from None


def _dedup(
    units: list[Unit], staging: UPath, max_distance: int, max_rms: float, repo_order: list[str]
) -> dict[str, dict[str, list[str]]]:
    """``{unit id: {ref: [reason, kept ref]}}`` across all repositories (they overlap: ISIC 2019
    holds HAM10000), so one image never reaches two splits. Keep order: ``repo_order`` (the
    config's), then ``source_ref``. Exact duplicates from the pixel-hash column here; near ones by
    one Ray task per image type, which reads the thumbnails itself and returns only the drops."""
    import ray

    from medisyn import storage

    rank = {name: i for i, name in enumerate(repo_order)}
    files = {u.id: storage.uri(staging / f"{u.id}.parquet") for u in units}
    unit_of: dict[str, str] = {}
    refs, ids, ranks = [], [], []
    for u in units:
        t = storage.read_table(files[u.id], columns=["source_ref", "id"])
        unit_refs = t.column("source_ref").to_pylist()
        unit_of.update(dict.fromkeys(unit_refs, u.id))
        refs += unit_refs
        ids += t.column("id").to_pylist()
        ranks += [rank[u.items[0].repo]] * len(unit_refs)
    dropped: dict[str, dict[str, list[str]]] = {u.id: {} for u in units}
    for ref, (reason, kept) in find_exact_duplicates(refs, ids, ranks).items():
        dropped[unit_of[ref]][ref] = [reason, kept]
    if max_distance < 0:
        return dropped
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.settings.image_type, []).append(u)
    task = ray.remote(num_cpus=1)(near_duplicates_in_files)
    pending = [
        task.remote(
            [files[u.id] for u in group],
            [rank[u.items[0].repo] for u in group],
            [ref for u in group for ref in dropped[u.id]],
            max_distance,
            max_rms,
            [u.settings.kind == "video" for u in group],
        )
        for group in groups.values()
    ]
    for found in ray.get(pending):
        for ref, kept in found.items():
            dropped[unit_of[ref]][ref] = ["near duplicate", kept]
    return dropped


def _compact(cfg: RunConfig, d: dict[str, UPath], kept: list[tuple[str, int]], dropped) -> tuple[list[str], str]:
    """Write the corpus shards the plan names that are not there yet, and the corpus index; returns
    (shard names, index path under the corpus folder), for :func:`publish_shards`. The driver holds
    only index rows: images stream through one Ray task per shard (:mod:`medisyn.ingest.compact`)."""
    import ray

    started = time.perf_counter()
    size = cfg.ingest.shard_row_group_rows
    jobs = []
    for position, slices in enumerate(plan_shards(kept, cfg.ingest.shard_rows)):
        units_dropped = {uid: {ref: tuple(v) for ref, v in dropped[uid].items()} for uid, _, _ in slices}
        name = shard_name(position, slices, units_dropped, size)
        jobs.append(
            CompactJob(name, uri(d["staging"]), uri(d["corpus"]), uri(d["rejects"]), tuple(slices), units_dropped, size)
        )
    names = [j.name for j in jobs]
    old = index_file(d["corpus"])
    known = {}  # index rows of shards the published index already holds: they are not read again
    if old is not None and parquet_is_whole(old):
        table = read_table(old)
        shard = np.asarray(table.column("shard").to_pylist(), dtype=object)
        bounds = [0, *(np.flatnonzero(shard[1:] != shard[:-1]) + 1).tolist(), len(shard)]  # a shard's rows are adjacent
        known = {shard[a]: table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a}
    pieces: dict[str, pa.Table] = {}
    todo = []
    for job in jobs:
        if parquet_is_whole(d["corpus"] / job.name) and parquet_is_whole(d["rejects"] / job.name):
            pieces[job.name] = known[job.name] if job.name in known else shard_index(d["corpus"], job.name, size)
        else:
            todo.append(job)
    log.info("ingest: %d corpus shards, %d to write", len(jobs), len(todo))
    task = ray.remote(num_cpus=1)(compact_shard)
    limit = cfg.ingest.max_tasks or len(todo) or 1
    waiting, running = list(todo), {}
    while waiting or running:
        while waiting and len(running) < limit:
            job = waiting.pop(0)
            running[task.remote(job)] = job.name
        done, _ = ray.wait(list(running), num_returns=1)
        pieces[running.pop(done[0])] = ray.get(done[0])
    digest = hashlib.sha256(json.dumps([COMPACT_FORMAT, names]).encode()).hexdigest()[:16]
    index = f"{INDEX_DIR}/{digest}.parquet"
    if not parquet_is_whole(d["corpus"] / index):
        atomic_write_table(pa.concat_tables([pieces[n] for n in names]), d["corpus"] / index)
    log.info("ingest: corpus compacted into %d shards in %.1f s", len(names), time.perf_counter() - started)
    return names, index


def _staged(staging: UPath, uid: str) -> bool:
    """A unit counts as done only when its marker is there and its shards read back whole; a
    truncated or corrupt one is processed again (and said so), never trusted."""
    if not (staging / f"{uid}.json").exists():
        return False
    broken = [n for n in (f"{uid}.parquet", f"{uid}.rejects.parquet") if not parquet_is_whole(staging / n)]
    if broken:
        log.warning("ingest: staging %s is not whole; processing its unit again", ", ".join(broken))
        (staging / f"{uid}.json").unlink()
    return not broken


def run(cfg: RunConfig) -> dict:
    from medisyn.raytools import check_sources, ensure_ray

    d = ingest_dirs(cfg)
    for p in d.values():
        p.mkdir(parents=True, exist_ok=True)
    # config errors stop here, before any work; a URI stays a URI (cfg.resolve makes a local Path)
    repos, sources = load_inputs(cfg.ingest, lambda p: p.replace("{run_dir}", cfg.run_dir))
    # catalog entries are listed before any Ray work: a present entry that does not match its description
    # (header, a template that resolves to nothing, a missing table) stops here, naming the entry and cause
    listings = {s.entry.name: (s, list_entry(s.entry, s.root, cfg.ingest)) for s in sources if not s.skipped}
    if not repos and not listings:
        raise ConfigError(
            f"ingest: no entry of catalog {cfg.ingest.sources!r} can be read: "
            + "; ".join(f"{s.entry.name} {s.skipped.split(';')[0]}" for s in sources)
        )
    first = {name: lst.items[0].path for name, (_, lst) in listings.items() if lst.items}
    ensure_ray()  # every node must read every repository, or the stage stops now, naming the node
    check_sources(
        {repo.name: (uri(root), uri(root / repo.labels_csv)) for repo, root in repos} | probes(sources, first)
    )
    listing_rejects, source_map, units = [], [], []
    for repo, root in repos:
        items, rejects, refs = list_repository(repo, root, cfg.ingest)
        log.info("ingest: %s: %d files to read, %d rejected at listing", repo.name, len(items), len(rejects))
        listing_rejects += rejects
        source_map += [{"source_ref": r, "source": repo.name, "path": p} for r, p in refs.items()]
        units += plan_units(repo, items, cfg, d["staging"])
    for name, (source, lst) in listings.items():
        log.info(
            "ingest: %s: %d files to read, %d rejected at listing, %d left out by its rules",
            name,
            len(lst.items),
            len(lst.rejects),
            sum(lst.left_out.values()),
        )
        listing_rejects += lst.rejects
        source_map += [{"source_ref": r, "source": name, "path": p} for r, p in lst.source_map.items()]
        units += plan_units(reading(source.entry), lst.items, cfg, d["staging"])
    for s in sources:
        if s.skipped:
            log.info("ingest: %s: skipped (%s)", s.entry.name, s.skipped.split(";")[0])
    atomic_write_table(
        pa.Table.from_pylist(
            source_map, pa.schema([("source_ref", pa.string()), ("source", pa.string()), ("path", pa.string())])
        ),
        d["private"] / "source_map.parquet",
    )

    todo = [u for u in units if not _staged(d["staging"], u.id)]
    log.info("ingest: %d units, %d already done, %d to process", len(units), len(units) - len(todo), len(todo))
    _read_units(todo, cfg.ingest.max_tasks)
    unit_counts = [json.loads((d["staging"] / f"{u.id}.json").read_text()) for u in units]

    dropped = _dedup(
        units,
        d["staging"],
        cfg.ingest.near_duplicate_bits,
        cfg.ingest.near_duplicate_rms,
        [repo.name for repo, _ in repos] + list(listings),
    )
    kept = sorted((u.id, c["accepted"] - len(dropped[u.id])) for u, c in zip(units, unit_counts, strict=True))
    if sum(n for _, n in kept) == 0:  # an all-rejecting run never replaces a corpus: the previous one stays in force
        reasons = Counter(r["reason"] for r in listing_rejects)
        for u in units:
            staged = read_table(d["staging"] / f"{u.id}.rejects.parquet", columns=["reason"])
            reasons.update(staged.column("reason").to_pylist())
            reasons.update(f"{reason} of {other}" for reason, other in dropped[u.id].values())
        top = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3))
        kept_shards = len(shard_files(d["corpus"])) if (d["corpus"] / SHARD_LIST).is_file() else 0
        raise ConfigError(  # the CLI prints it as one line: the input, not the code, is at fault
            f"ingest: every image was rejected ({sum(reasons.values())} rejects; most common: {top or 'no files'}); "
            + (f"the previous corpus ({kept_shards} shards) is kept" if kept_shards else "no corpus was written")
        )
    current, index = _compact(cfg, d, kept, dropped)
    listing_name = "listing.parquet"
    listing_name = "listing.parquet"
    atomic_write_table(pa.Table.from_pylist(listing_rejects, REJECT_SCHEMA), d["rejects"] / listing_name)
    publish_shards(d["corpus"], current, index)
    publish_shards(d["rejects"], [*current, listing_name])

    left_out = {name: dict(lst.left_out) for name, (_, lst) in listings.items()}
    for u, c in zip(units, unit_counts, strict=True):  # a reader's rules: slices without mask, in-between patches
        for reason, n in c.get("left_out", {}).items():
            into = left_out.setdefault(u.items[0].repo, {})
            into[reason] = into.get(reason, 0) + n
    summary = summarize(
        d["corpus"],
        d["rejects"],
        unit_counts,
        files=len(source_map),
        left_out=left_out,
        skipped={s.entry.name: s.skipped for s in sources if s.skipped},
    )
    write_summary(summary, d["ingest"] / "summary.json")
    return summary
