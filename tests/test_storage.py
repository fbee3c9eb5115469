"""The storage layer: one API for local and object-store run directories, and the checks that
keep a multi-node run off node-local paths."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from medisyn import storage
from medisyn.configtools import ConfigError
from medisyn.raytools import check_run_dir


def test_paths_local_absolute_uris_untouched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.path("runs/a").path == str(tmp_path / "runs/a") and not storage.is_remote("runs/a")
    assert storage.uri("s3://bucket/run/x") == "s3://bucket/run/x" and storage.is_remote("s3://bucket/run")
    assert storage.uri(storage.path("s3://bucket/run") / "corpus") == "s3://bucket/run/corpus"
    assert storage.uri("file:///data/run") == "/data/run"


def test_local_writes_are_whole_or_absent(tmp_path):
    table = pa.table({"a": [1, 2, 3]})
    with pytest.raises(RuntimeError), storage.parquet_writer(tmp_path / "t.parquet", table.schema) as w:
        w.write_table(table)
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary
    storage.write_table(table, tmp_path / "t.parquet")
    assert storage.read_table(tmp_path / "t.parquet").equals(table) and storage.parquet_is_whole(tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) - 20])
    assert not storage.parquet_is_whole(tmp_path / "t.parquet")


def test_the_same_calls_on_an_s3_server(s3_server, tmp_path):
    root = storage.path("s3://medisyn-test/storage-test")
    table = pa.table({"id": ["a", "b"], "x": [1.0, 2.0]})
    storage.write_table(table, root / "t.parquet")
    assert storage.read_table(root / "t.parquet").equals(table)
    assert storage.parquet_file(root / "t.parquet").metadata.num_rows == 2
    with pytest.raises(RuntimeError), storage.parquet_writer(root / "u.parquet", table.schema) as w:
        w.write_table(table)
        raise RuntimeError("killed mid-write")
    assert not (root / "u.parquet").exists() and not list(root.glob(".*.tmp"))
    storage.write_bytes(b"12345", root / "f.bin")
    assert storage.sizes(root) == {"t.parquet": (root / "t.parquet").stat().st_size, "f.bin": 5}
    assert storage.stat_ns(root / "f.bin")[0] == 5
    local = tmp_path / "model"
    (local / "unet").mkdir(parents=True)
    (local / "unet" / "w.bin").write_bytes(b"w" * 100)
    (local / "record.json").write_text("{}")
    storage.upload_dir(local, root / "model", last="record.json")
    with storage.local_dir(root / "model") as d:
        assert (d / "unet" / "w.bin").read_bytes() == b"w" * 100 and (d / "record.json").exists()
    with storage.cached_dir(root / "model") as d:
        first = d
    with storage.cached_dir(root / "model") as d:
        assert d == first and (d / "unet" / "w.bin").exists()  # downloaded once per node
    np.save(tmp_path / "a.npy", np.arange(5))
    storage.write_bytes((tmp_path / "a.npy").read_bytes(), root / "a.npy")
    assert np.load(storage.cached_file(root / "a.npy"), mmap_mode="r").tolist() == [0, 1, 2, 3, 4]
    storage.remove_tree(root)
    assert not root.exists()


def test_multi_node_runs_refuse_relative_and_unshared_run_dirs(tmp_path):
    check_run_dir("runs/x", nodes=[])  # one node: anything goes
    check_run_dir("s3://bucket/run", nodes=["n1", "n2"])  # a URI is shared by construction
    with pytest.raises(ConfigError, match="relative"):
        check_run_dir("runs/x", nodes=["n1"])
    seen = []
    check_run_dir(str(tmp_path / "run"), nodes=["n1"], sees=lambda n, p: seen.append(p) or os.path.exists(p))
    assert seen and not os.path.exists(seen[0])  # the probe was visible, then removed
    with pytest.raises(ConfigError, match="not shared: 1 of 3 nodes.*node-b"):
        check_run_dir(str(tmp_path / "run"), nodes=["node-a", "node-b"], sees=lambda n, p: n == "node-a")


@pytest.mark.ray
def test_keep_ids_is_a_semi_join(ray_cluster):
    from medisyn.raytools import keep_ids

    ds = ray_cluster.data.from_items([{"id": f"{i:032x}", "v": i} for i in range(500)])
    wanted = {f"{i:032x}" for i in range(0, 500, 7)}
    assert sorted(r["v"] for r in keep_ids(ds, wanted).take_all()) == list(range(0, 500, 7))
    assert len(keep_ids(ds, wanted, drop=True).take_all()) == 500 - len(wanted)
    assert keep_ids(ds, set()).count() == 0 and keep_ids(ds, set(), drop=True).count() == 500
