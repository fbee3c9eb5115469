"""``medisyn bench corpus``: a full metadata read and 1,000 images by id, before and after compaction.

A synthetic corpus (16x16 grey PNGs, the corpus schema's other columns filled as ingest fills
them) is written in two layouts: *before*, one shard per 16 images as ingest wrote it per unit of
16 files (no index: readers scan every shard); *after*, shards of ``shard_rows`` rows with row
groups of ``row_group_rows`` and the corpus index, as ingest's finalize writes it now. Both are
read through the same :mod:`medisyn.records` calls the stages use. With ``s3`` the layouts live on
a local S3 server (moto's, as the tests use), where every shard costs requests as on a real object
store; else (or without moto) on a local disk, which the output says. ``before_shards`` caps the
shards the *before* reads time; their time is then scaled to all shards, which the output says.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from medisyn import storage
from medisyn.ingest.compact import index_rows
from medisyn.records import CORPUS_SCHEMA, SPLITS, publish_shards, read_corpus, read_images

META = ["id", "split", "caption", "specialty", "image_type", "labels", "original_size", "series", "source_ref"]


def synthetic_rows(n: int, seed: int = 0) -> pa.Table:
    """``n`` corpus rows with 16x16 PNG images (a few hundred distinct pictures, every id unique)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(256):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(buf, format="PNG")
        pictures.append(buf.getvalue())
    labels = ["normal findings", "a nodule", "an effusion", "a mass"]
    k = np.arange(n)
    cols = {
        "id": [f"{i:032x}" for i in rng.permutation(n * 4)[:n]],
        "image": [pictures[i % 256] for i in k],
        "caption": [f"Chest X-ray showing {labels[i % 4]}." for i in k],
        "specialty": ["radiology"] * n,
        "image_type": ["X-ray"] * n,
        "labels": [[labels[i % 4]] for i in k],
        "patient_id": [f"{i // 8:016x}" for i in k],
        "split": [SPLITS[0 if i % 10 < 8 else 1 + i % 2] for i in k],
        "source": ["chest-xray"] * n,
        "source_ref": [f"chest-xray/{i:016x}" for i in k],
        "series": [f"chest-xray/{i // 8:016x}" for i in k],
        "original_size": [[1024, 1024]] * n,
        "crop_top_left": [[0, 0]] * n,
    }
    return pa.table(cols, schema=CORPUS_SCHEMA)


def write_layouts(
    table: pa.Table, root: Path, shard_rows: int, row_group_rows: int, before_rows: int, unit_rows: int = 16
) -> None:
    """``root/before`` (the first ``before_rows`` rows, one shard per ``unit_rows`` rows, listed, no
    index) and ``root/after`` (every row: compacted shards + index), on a local disk."""
    before, after = root / "before", root / "after"
    before.mkdir(parents=True)
    after.mkdir(parents=True)
    names = []
    for start in range(0, before_rows, unit_rows):
        names.append(f"unit-{start // unit_rows:07d}.parquet")
        pq.write_table(table.slice(start, unit_rows), before / names[-1], row_group_size=64)
    publish_shards(before, names)
    names, pieces = [], []
    for start in range(0, table.num_rows, shard_rows):
        names.append(f"part-{start // shard_rows:05d}-bench.parquet")
        part = table.slice(start, shard_rows)
        pq.write_table(part, after / names[-1], row_group_size=row_group_rows)
        pieces.append(index_rows(part.drop_columns(["image"]), names[-1], row_group_rows))
    (after / "_index").mkdir()
    pq.write_table(pa.concat_tables(pieces), after / "_index" / "bench.parquet")
    publish_shards(after, names, "_index/bench.parquet")


@contextlib.contextmanager
def s3_root():
    """An ``s3://`` folder on a local moto server (None when moto is not installed)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        yield None
        return
    with storage.local_s3("medisyn-bench"):
        yield "s3://medisyn-bench"


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(
    rows: int = 200_000,
    s3: bool = False,
    shard_rows: int = 1024,
    row_group_rows: int = 16,
    wanted: int = 1000,
    before_shards: int = 0,
) -> list[dict]:
    table = synthetic_rows(rows)
    all_before = -(-rows // 16)
    timed_before = min(before_shards or all_before, all_before)
    scale = all_before / timed_before
    results = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="medisyn-bench-"))
        remote = stack.enter_context(s3_root()) if s3 else None
        write_layouts(table, Path(tmp), shard_rows, row_group_rows, before_rows=min(rows, timed_before * 16))
        where, root = "local disk", storage.path(tmp)
        if s3 and remote is None:
            where = "local disk (moto is not installed: no S3 server)"
        elif remote is not None:
            start = time.perf_counter()
            root = storage.path(f"{remote}/corpus")
            root.fs.put(f"{tmp}/", root.path + "/", recursive=True)
            where = f"a local S3 server (moto; upload {time.perf_counter() - start:.0f} s)"
        rng = np.random.default_rng(1)
        for layout in ("before", "after"):
            n = min(rows, timed_before * 16) if layout == "before" else rows
            sample = rng.choice(table.column("id").to_pylist()[:n], size=min(wanted, n), replace=False).tolist()
            meta_s, meta = _timed(lambda f=root / layout: read_corpus(f, columns=META))
            images_s, images = _timed(lambda f=root / layout, s=sample: read_images(f, s))
            assert len(images) == len(sample) and meta.num_rows == n, (layout, len(images), meta.num_rows)
            k = scale if layout == "before" else 1.0
            results.append(
                {
                    "layout": layout,
                    "shards": all_before if layout == "before" else -(-rows // shard_rows),
                    "metadata_s": meta_s * k,
                    "images_s": images_s * k,
                    "note": f"timed on {timed_before:,} of {all_before:,} shards, scaled x{k:.1f}" if k > 1 else "",
                }
            )
    base = results[0]
    print(f"corpus of {rows:,} rows (16x16 PNG images) on {where}; {min(wanted, rows):,} images read by id")
    print(f"{'layout':8s} {'shards':>8s} {'metadata read s':>16s} {'1,000 images s':>15s}")
    for r in results:
        r["metadata_ratio"] = base["metadata_s"] / r["metadata_s"]
        r["images_ratio"] = base["images_s"] / r["images_s"]
        print(
            f"{r['layout']:8s} {r['shards']:8,d} {r['metadata_s']:16.2f} {r['images_s']:15.2f}"
            + (f"  ({r['note']})" if r["note"] else "")
        )
    after = results[-1]
    print(
        f"after vs before: metadata read {after['metadata_ratio']:.0f}x faster, "
        f"images by id {after['images_ratio']:.0f}x faster"
    )
    return results
