"""Compacting a staging shard into a corpus shard holds a row group at a time, never the shard: one
whole-slide image can give 20,000 patches (~8 GB encoded) in a single staging shard."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from medisyn import storage
from medisyn.ingest.worker import STAGING_SCHEMA
from medisyn.records import CORPUS_SCHEMA, REJECT_SCHEMA

ROWS, GROUP, IMAGE_BYTES = 2000, 64, 100_000  # ~200 MB of incompressible image bytes in 32 row groups
SHARD_BYTES = ROWS * IMAGE_BYTES
# Streaming: pyarrow peak ~38 MiB (a row group of 6 MiB read, filtered and encoded), resident
# growth ~31 MiB. Reading the whole table then filtering it: ~405 MiB and ~452 MiB, twice the shard.
BOUND = 48 * 2**20
UID = "wsi-slide-0123456789abcdef"

# Runs compact_shard in a fresh interpreter, once on a one-row-group shard (which pages in the
# code and libraries), then on the slide's shard, whose peaks are measured: pyarrow's pool peak
# (the image bytes live there, unseen by tracemalloc) and the growth of the resident high-water
# mark (VmHWM, per process image: getrusage's ru_maxrss would carry over the forking pytest
# process's peak).
MEASURE = """
import json, sys
import pyarrow as pa
from medisyn.ingest.compact import CompactJob, compact_shard
def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
warm, spec = json.loads(sys.argv[1])
def job(spec):
    dropped = {uid: {k: tuple(v) for k, v in d.items()} for uid, d in spec.pop("dropped").items()}
    slices = tuple(map(tuple, spec.pop("slices")))
    return CompactJob(**spec, slices=slices, dropped=dropped)
compact_shard(job(warm))
rss = hwm()
result = compact_shard(job(spec)).num_rows
print(json.dumps({
    "arrow_peak": pa.default_memory_pool().max_memory(),  # this interpreter's peak: either call's
    "rss_growth": hwm() - rss,
    "pool": pa.default_memory_pool().backend_name,
    "result": result,
}))
"""


def _image(i: int) -> bytes:
    return np.random.default_rng(i).bytes(IMAGE_BYTES)


def _staging_shard(staging, uid: str = UID, n: int = ROWS) -> list[str]:
    """A slide's staging shard written as ingest writes it (row groups of GROUP rows); returns its refs."""
    refs = []
    with storage.parquet_writer(staging / f"{uid}.parquet", STAGING_SCHEMA) as writer:
        for start in range(0, n, GROUP):
            rows = []
            for i in range(start, min(start + GROUP, n)):
                ref = f"slides/0123456789abcdef#level=0,x={512 * (i % 50)},y={512 * (i // 50)}"
                refs.append(ref)
                rows.append(
                    {
                        "id": f"{i:032x}",
                        "image": _image(i),
                        "caption": "Histopathological lymph node image showing metastasis.",
                        "specialty": "pathology",
                        "image_type": "microscopy",
                        "labels": ["metastasis"],
                        "patient_id": "p",
                        "split": "train",
                        "source": "slides",
                        "source_ref": ref,
                        "series": "slides/0123456789abcdef",
                        "original_size": [512, 512],
                        "crop_top_left": [0, 0],
                        "phash": "0" * 16,
                        "thumb": bytes(32 * 32),
                    }
                )
            writer.write_table(pa.Table.from_pylist(rows, STAGING_SCHEMA))
    storage.write_table(pa.Table.from_pylist([], REJECT_SCHEMA), staging / f"{uid}.rejects.parquet")
    return refs


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmHWM from /proc")
def test_finalizing_a_slide_shard_streams_row_groups(tmp_path):
    root = storage.path(tmp_path)
    refs = _staging_shard(root / "staging")
    _staging_shard(root / "staging", "warm-up", GROUP)
    assert storage.path(root / "staging" / f"{UID}.parquet").stat().st_size > 0.95 * SHARD_BYTES
    dropped = {ref: ("near duplicate", refs[i - 1]) for i, ref in enumerate(refs) if i % 7 == 3}
    folders = {k: storage.uri(root / k) for k in ("staging", "corpus", "rejects")}
    kept = [i for i, ref in enumerate(refs) if ref not in dropped]
    specs = [
        {"name": "w.parquet", **folders, "row_group_rows": GROUP, "slices": [["warm-up", 0, GROUP]], "dropped": {}},
        {
            "name": "s.parquet",
            **folders,
            "row_group_rows": GROUP,
            "slices": [[UID, 0, len(kept)]],
            "dropped": {UID: dropped},
        },
    ]
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(specs)], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"compaction of a {SHARD_BYTES / 2**20:.0f} MiB shard: {measured}")
    assert measured["arrow_peak"] < BOUND, measured
    assert measured["rss_growth"] < BOUND + 16 * 2**20, measured  # a little slack for the interpreter's own heap
    assert measured["result"] == ROWS - len(dropped)  # index rows: one per row kept

    shard = storage.parquet_file(root / "corpus" / "s.parquet")
    assert shard.schema_arrow.equals(CORPUS_SCHEMA, check_metadata=False)  # no phash, no thumbnail
    assert max(shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)) <= GROUP
    ids = storage.read_table(root / "corpus" / "s.parquet", columns=["id"]).column("id").to_pylist()
    assert ids == [f"{i:032x}" for i in kept]  # exactly the rows not dropped, in order
    last = shard.read_row_group(shard.num_row_groups - 1, columns=["id", "image"]).to_pylist()
    assert all(r["image"] == _image(int(r["id"], 16)) for r in last)
    rejects = storage.read_table(root / "rejects" / "s.parquet").to_pylist()
    assert [r["source_ref"] for r in rejects] == [ref for ref in refs if ref in dropped]
    assert rejects[0] == {"source_ref": refs[3], "stage": "dedup", "reason": f"near duplicate of {refs[2]}"}
