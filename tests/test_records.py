"""The shared records: corpus reads by split and id in a fixed order, seeded samples, atomic writes."""

from __future__ import annotations

import pyarrow as pa
import pytest

from medisyn.records import (
    CORPUS_SCHEMA,
    atomic_write_bytes,
    atomic_write_table,
    median_original_sizes,
    read_corpus,
    read_images,
    read_manifest,
    remove_partial_writes,
    sample_corpus,
    shard_files,
)


def _rows(prefix: str, n: int) -> list[dict]:
    splits = ["train", "train", "val", "test"]
    return [
        {"id": f"{prefix}{i:03d}", "image": f"pixels of {prefix}{i}".encode(), "caption": f"caption {i % 3}",
         "specialty": "radiology", "image_type": "X-ray", "labels": [f"class {i % 3}"], "patient_id": f"p{i}",
         "split": splits[i % 4], "source": prefix, "source_ref": f"{prefix}/{i:016x}", "original_size": [512, 512],
         "crop_top_left": [0, 0]}
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture()
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    # written out of name order: reads must follow sorted paths, not creation order
    atomic_write_table(pa.Table.from_pylist(_rows("b", 8), CORPUS_SCHEMA), folder / "b.parquet")
    atomic_write_table(pa.Table.from_pylist(_rows("a", 12), CORPUS_SCHEMA), folder / "a.parquet")
    (folder / ".c.parquet.1234.tmp").write_bytes(b"a half-written shard")
    return folder


def test_read_corpus_filters_by_split_and_id_in_shard_order(corpus):
    assert [p.name for p in shard_files(corpus)] == ["a.parquet", "b.parquet"]
    every = read_corpus(corpus, columns=["id", "split"])
    assert every.num_rows == 20 and every.column_names == ["id", "split"]
    train = read_corpus(corpus, columns=["id"], split="train").column("id").to_pylist()
    assert train == ["a000", "a001", "a004", "a005", "a008", "a009", "b000", "b001", "b004", "b005"]
    picked = read_corpus(corpus, columns=["id", "caption"], split="train", ids={"b005", "a001", "a002"})
    assert picked.column("id").to_pylist() == ["a001", "b005"]  # a002 is val
    assert read_images(corpus, ["b003", "a007"]) == {"a007": b"pixels of a7", "b003": b"pixels of b3"}


def test_sample_is_seeded_and_within_the_split(corpus):
    a, b = sample_corpus(corpus, 4, seed=1), sample_corpus(corpus, 4, seed=1)
    assert a == b and len(a) == 4 and set(a[0]) == {"id", "caption", "specialty", "image_type", "labels"}
    assert all(r["id"][1:] in {"000", "001", "004", "005", "008", "009"} for r in a)
    assert sample_corpus(corpus, 4, seed=2) != a
    assert len(sample_corpus(corpus, 1000, seed=0)) == 10  # never more than the split holds


def test_bad_reads_name_what_is_wrong(corpus, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'training'; expected one of train, val, test"):
        read_corpus(corpus, split="training")
    with pytest.raises(FileNotFoundError, match="no corpus shards in .*empty; run `medisyn ingest` first"):
        read_corpus(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no manifest at .*manifest.parquet; run `medisyn generate`"):
        read_manifest(tmp_path / "synthetic" / "memorization")


def test_atomic_writes_leave_no_partial_file(tmp_path):
    target = tmp_path / "x.png"
    atomic_write_bytes(b"first", target)
    atomic_write_bytes(b"second", target)
    assert target.read_bytes() == b"second" and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]
    (tmp_path / ".y.png.abc.tmp").write_bytes(b"cut short")
    assert remove_partial_writes(tmp_path) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_median_original_sizes_per_image_type_of_the_train_split(tmp_path):
    rows = _rows("a", 8)
    sizes = [[100, 200], [300, 400], [999, 999], [999, 999], [500, 600], [700, 800], [999, 999], [999, 999]]
    for r, size in zip(rows, sizes, strict=True):
        r["original_size"] = size
    rows[4]["image_type"] = rows[5]["image_type"] = "ultrasound"
    folder = tmp_path / "corpus"
    folder.mkdir()
    atomic_write_table(pa.Table.from_pylist(rows, CORPUS_SCHEMA), folder / "a.parquet")
    # train rows are i % 4 in (0, 1): X-ray 100x200 and 300x400, ultrasound 500x600 and 700x800
    assert median_original_sizes(folder) == {"X-ray": [200, 300], "ultrasound": [600, 700], "*": [400, 500]}
