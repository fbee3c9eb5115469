"""The shared records: corpus reads by split and id in a fixed order, seeded samples, atomic writes."""

from __future__ import annotations

import pyarrow as pa
import pytest

from medisyn.records import (
    CORPUS_SCHEMA,
    INDEX_SCHEMA,
    REJECT_SCHEMA,
    atomic_write_bytes,
    atomic_write_table,
    corpus_index,
    index_file,
    median_original_sizes,
    publish_shards,
    read_corpus,
    read_images,
    read_manifest,
    read_shards,
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


# --- a compacted corpus with its index (what ingest's finalize writes), read without Ray ---


def _staging_shard(folder, uid: str, n: int) -> list[str]:
    """A unit's staging shard (row groups of 4 rows, as ingest writes them) and empty read rejects."""
    from medisyn import storage
    from medisyn.ingest.worker import STAGING_SCHEMA

    rows = [r | {"phash": "0" * 16, "thumb": b"", "series": r["source_ref"]} for r in _rows(uid, n)]
    with storage.parquet_writer(folder / f"{uid}.parquet", STAGING_SCHEMA) as writer:
        for start in range(0, n, 4):
            writer.write_table(pa.Table.from_pylist(rows[start : start + 4], STAGING_SCHEMA))
    atomic_write_table(pa.Table.from_pylist([], REJECT_SCHEMA), folder / f"{uid}.rejects.parquet")
    return [r["source_ref"] for r in rows]


def _compacted(root, shard_rows: int = 6, row_group_rows: int = 4):
    """Units u1 (10 rows), u2 (7 rows, 2 dropped), u3 (2 rows, both dropped) compacted as ingest does:
    returns (the kept ids in corpus order, the dropped refs)."""
    from medisyn.ingest.compact import CompactJob, compact_shard, plan_shards, shard_name

    staging, corpus, rejects = root / "staging", root / "corpus", root / "rejects"
    refs = {uid: _staging_shard(staging, uid, n) for uid, n in (("u1", 10), ("u2", 7), ("u3", 2))}
    dropped = {"u1": {}, "u2": {refs["u2"][1]: ("exact duplicate", "x"), refs["u2"][4]: ("near duplicate", "y")}}
    dropped["u3"] = {r: ("exact duplicate", "z") for r in refs["u3"]}
    kept = [(uid, len(refs[uid]) - len(dropped[uid])) for uid in ("u1", "u2", "u3")]
    pieces, names = [], []
    for i, slices in enumerate(plan_shards(kept, shard_rows)):
        units = {uid: dropped[uid] for uid, _, _ in slices}
        name = shard_name(i, slices, units, row_group_rows)
        job = CompactJob(name, str(staging), str(corpus), str(rejects), tuple(slices), units, row_group_rows)
        pieces.append(compact_shard(job))
        names.append(name)
    atomic_write_table(pa.concat_tables(pieces), corpus / "_index" / "abc.parquet")
    publish_shards(corpus, names, "_index/abc.parquet")
    publish_shards(rejects, names)
    ids = [f"u1{i:03d}" for i in range(10)] + [f"u2{i:03d}" for i in range(7) if i not in (1, 4)]
    return ids, {r for d in dropped.values() for r in d}


def test_compaction_packs_units_into_shards_with_an_index_that_points_at_each_row(tmp_path):
    import math

    from medisyn import storage

    ids, dropped = _compacted(tmp_path)
    shards = shard_files(tmp_path / "corpus")
    assert len(shards) == math.ceil(len(ids) / 6) == 3  # not one per unit
    assert [p.name[:11] for p in shards] == ["part-00000-", "part-00001-", "part-00002-"]
    got = [i for p in shards for i in storage.read_table(p, columns=["id"]).column("id").to_pylist()]
    assert got == ids  # the same rows as one shard per unit, in unit then row order, duplicates dropped
    for p in shards:
        meta = storage.parquet_file(p).metadata
        assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] in ([4, 2], [3])
    rejects = read_shards(tmp_path / "rejects", ["source_ref", "stage"]).to_pylist()
    assert {r["source_ref"] for r in rejects} == dropped and {r["stage"] for r in rejects} == {"dedup"}
    index = storage.read_table(index_file(tmp_path / "corpus"))
    assert index.schema.equals(INDEX_SCHEMA) and index.column("id").to_pylist() == ids
    for r in index.to_pylist():
        pf = storage.parquet_file(tmp_path / "corpus" / r["shard"])
        first = sum(pf.metadata.row_group(g).num_rows for g in range(r["row_group"]))
        row = pf.read_row_group(r["row_group"], columns=["id", "caption", "split"]).slice(r["row"] - first, 1)
        assert row.to_pylist() == [{k: r[k] for k in ("id", "caption", "split")}]


def test_plan_cuts_rows_into_shards_and_keeps_units_with_nothing_kept():
    from medisyn.ingest.compact import plan_shards

    assert plan_shards([("a", 5), ("b", 0), ("c", 4)], 3) == [
        [("a", 0, 3)],
        [("a", 3, 5), ("b", 0, 0), ("c", 0, 1)],
        [("c", 1, 4)],
    ]
    assert plan_shards([("a", 3), ("b", 0)], 3) == [[("a", 0, 3), ("b", 0, 0)]]  # a trailing empty unit joins the last


@pytest.fixture()
def opens(monkeypatch):
    """The parquet files records opens (footers and tables), by name."""
    from medisyn import storage

    seen: list[str] = []
    parquet_file, read_table = storage.parquet_file, storage.read_table

    def spy_file(p):
        seen.append(storage.path(p).name)
        return parquet_file(p)

    def spy_table(p, **kwargs):
        seen.append(storage.path(p).name)
        return read_table(p, **kwargs)

    monkeypatch.setattr(storage, "parquet_file", spy_file)
    monkeypatch.setattr(storage, "read_table", spy_table)
    return seen


def test_indexed_metadata_reads_open_no_shard_and_image_reads_only_theirs(tmp_path, opens):
    ids, _ = _compacted(tmp_path)
    corpus = tmp_path / "corpus"
    shards = [p.name for p in shard_files(corpus)]
    opens.clear()
    assert read_corpus(corpus, ["id"]).column("id").to_pylist() == ids
    train = read_corpus(corpus, ["id", "labels"], split="train")
    assert sample_corpus(corpus, 3, seed=0) and median_original_sizes(corpus) == {"X-ray": [512, 512], "*": [512, 512]}
    assert set(corpus_index(corpus)) == set(ids) and train.num_rows == sum(int(i[2:]) % 4 < 2 for i in ids)
    assert opens and set(opens) == {"abc.parquet"}  # the index only, however many shards
    opens.clear()
    assert read_images(corpus, ["u2005", "u2006", "nope"]) == {"u2005": b"pixels of u25", "u2006": b"pixels of u26"}
    assert [o for o in opens if o != "abc.parquet"] == [shards[2]]  # the one shard holding them, opened once
    opens.clear()
    picked = read_corpus(corpus, ["image", "id"], ids=["u1000", "u2006"])
    assert picked.column_names == ["image", "id"] and picked.column("id").to_pylist() == ["u1000", "u2006"]
    assert picked.column("image").to_pylist() == [b"pixels of u10", b"pixels of u26"]
    assert sorted(o for o in opens if o != "abc.parquet") == [shards[0], shards[2]]


def test_a_corpus_without_an_index_reads_the_same(tmp_path):
    ids, _ = _compacted(tmp_path)
    corpus = tmp_path / "corpus"
    indexed = read_corpus(corpus)
    (corpus / "_shards.json").unlink()  # as an older ingest left it: shards only
    assert index_file(corpus) is None and [p.name[:5] for p in shard_files(corpus)] == ["part-"] * 3
    assert read_corpus(corpus).equals(indexed) and read_corpus(corpus, ["id"]).column("id").to_pylist() == ids
    assert read_images(corpus, ["u1003"]) == {"u1003": b"pixels of u13"}
    assert sample_corpus(corpus, 3, seed=0) == sample_corpus(tmp_path / "corpus", 3, seed=0)
