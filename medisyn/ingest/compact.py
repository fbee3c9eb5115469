"""Ingest's finalize: staging shards minus duplicates → corpus shards of ``ingest.shard_rows`` rows + an index.

A corpus of one shard per unit of 16 files is ~62,000 objects at 1M images, and every stage
that scanned it opened them all. Here the units' kept rows are laid out in unit-id order (rows
in staging order) and cut into shards of ``shard_rows`` rows, each with row groups of
``row_group_rows`` rows (reading one image reads its row group's images only). A shard's name
hashes what it holds (its slices of units, their duplicate sets, the row group size, the layout
version), so a rerun that changes nothing finds every shard in place and rewrites nothing, and
a run cut short redoes only what is missing. One Ray task per shard streams its slices a staging
row group at a time (memory: about one staging row group plus one corpus row group) and returns
only the shard's index rows, never an image. Each shard's rejects (read, transform and duplicate
rejects of the units that start in it) go to ``rejects/<same name>``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from medisyn import storage
from medisyn.records import CORPUS_SCHEMA, INDEX_SCHEMA, REJECT_SCHEMA, atomic_write_table

COMPACT_FORMAT = 1  # bump when the corpus shard layout changes, so old shards are not reused
META_COLUMNS = [n for n in CORPUS_SCHEMA.names if n != "image"]


@dataclass(frozen=True)
class CompactJob:
    """One corpus shard to write: slices ``(unit id, start, stop)`` of the units' kept rows."""

    name: str  # part-<position>-<digest>.parquet
    staging: str
    corpus: str
    rejects: str
    slices: tuple[tuple[str, int, int], ...]
    dropped: dict[str, dict[str, tuple[str, str]]]  # per unit of the slices: {ref: (reason, kept ref)}
    row_group_rows: int


def plan_shards(kept: list[tuple[str, int]], shard_rows: int) -> list[list[tuple[str, int, int]]]:
    """Cut the units' kept rows ``[(unit id, rows kept)]``, in that order, into shards of ``shard_rows``
    rows (the last one shorter). A unit with no row kept rides in the shard being filled (its rejects
    are written there)."""
    shards: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    filled = 0
    for uid, n in kept:
        if n == 0:
            current.append((uid, 0, 0))
        start = 0
        while start < n:
            take = min(n - start, shard_rows - filled)
            current.append((uid, start, start + take))
            start, filled = start + take, filled + take
            if filled == shard_rows:
                shards.append(current)
                current, filled = [], 0
    if current:
        if filled == 0 and shards:  # only units with nothing kept are left: they join the last shard
            shards[-1] += current
        else:
            shards.append(current)
    return shards


def shard_name(position: int, slices, dropped: dict[str, dict], row_group_rows: int) -> str:
    """``part-<position>-<digest>.parquet``: the digest names the shard's content (see the module)."""
    key = [COMPACT_FORMAT, row_group_rows, [list(s) for s in slices]]
    key.append({uid: sorted((ref, list(v)) for ref, v in dropped.get(uid, {}).items()) for uid, _, _ in slices})
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"part-{position:05d}-{digest}.parquet"


def index_rows(meta: pa.Table, name: str, row_group_rows: int) -> pa.Table:
    """A shard's metadata columns (in file order) as index rows: plus shard, row group, row."""
    rows = np.arange(meta.num_rows, dtype=np.int32)
    return (
        meta.select(META_COLUMNS)
        .append_column("shard", pa.array([name] * meta.num_rows, pa.string()))
        .append_column("row_group", pa.array(rows // row_group_rows, pa.int32()))
        .append_column("row", pa.array(rows, pa.int32()))
        .cast(INDEX_SCHEMA)
    )


def compact_shard(job: CompactJob) -> pa.Table:
    """Write ``corpus/<name>`` and ``rejects/<name>``; return the shard's index rows."""
    staging, size = storage.path(job.staging), job.row_group_rows
    pending: list[pa.Table] = []
    meta: list[pa.Table] = []
    rejects: list[dict] = []
    with storage.parquet_writer(storage.path(job.corpus) / job.name, CORPUS_SCHEMA) as writer:

        def flush(final: bool) -> None:
            nonlocal pending
            held = sum(t.num_rows for t in pending)
            while held >= size or (final and held):
                table = pa.concat_tables(pending)
                head = table.slice(0, min(size, held))
                writer.write_table(head, row_group_size=size)  # exactly one row group
                meta.append(head.drop_columns(["image"]))
                pending = [table.slice(head.num_rows)] if held > head.num_rows else []
                held -= head.num_rows

        for uid, start, stop in job.slices:
            dropped = job.dropped.get(uid, {})
            staged = storage.parquet_file(staging / f"{uid}.parquet")
            refs = staged.read(columns=["source_ref"], use_threads=False).column(0).to_pylist()
            if start == 0:  # the unit's rejects go with its first rows
                rejects += storage.read_table(staging / f"{uid}.rejects.parquet").to_pylist()
                rejects += [
                    {"source_ref": r, "stage": "dedup", "reason": f"{dropped[r][0]} of {dropped[r][1]}"}
                    for r in refs
                    if r in dropped
                ]
            kept = [i for i, r in enumerate(refs) if r not in dropped]
            if len(kept) < stop:
                raise RuntimeError(f"ingest: staging shard {uid} holds {len(kept)} kept rows, the plan {stop}")
            wanted = np.asarray(kept[start:stop], dtype=np.int64)
            starts = np.cumsum([0] + [staged.metadata.row_group(g).num_rows for g in range(staged.num_row_groups)])
            groups = np.searchsorted(starts, wanted, side="right") - 1
            for g in np.unique(groups):
                # one thread: a row group's column chunks decoded in turn, so the peak does not depend on timing
                group = staged.read_row_group(int(g), columns=CORPUS_SCHEMA.names, use_threads=False)
                pending.append(group.take(pa.array(wanted[groups == g] - starts[g])).cast(CORPUS_SCHEMA))
                del group  # before the next read: at most one staging row group is held
                flush(final=False)
        flush(final=True)
    atomic_write_table(pa.Table.from_pylist(rejects, REJECT_SCHEMA), storage.path(job.rejects) / job.name)
    table = pa.concat_tables(meta) if meta else CORPUS_SCHEMA.empty_table().drop_columns(["image"])
    return index_rows(table, job.name, size)


def shard_index(corpus, name: str, row_group_rows: int) -> pa.Table:
    """Index rows of a shard already written (a run cut short after writing it): its metadata columns."""
    return index_rows(storage.read_table(storage.path(corpus) / name, columns=META_COLUMNS), name, row_group_rows)
