"""The storage layer: one API for local and object-store run directories, and the checks that
keep a multi-node run off node-local paths."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_diffusers_files_keeps_what_from_pretrained_loads():
    names = [
        "model_index.json",
        "sd_xl_base_1.0.safetensors",  # a single-file checkpoint beside the pipeline: not loaded
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "unet/model.onnx",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/flax_model.msgpack",
        "tokenizer/vocab.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",  # only .bin weights: kept, from_pretrained loads them
        "vae/diffusion_pytorch_model.ckpt",
    ]
    assert storage.diffusers_files(names) == [
        "model_index.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.ckpt",
    ]


def _copy_in_a_process(folder: str, log: str, barrier, out) -> None:
    """One of several processes of a node asking for the same model folder at once; every download
    it makes is counted in ``log``."""
    import time

    from medisyn import storage

    real = storage._download

    def counted(fs, pairs):
        with open(log, "a") as f:
            f.write(f"{len(pairs)}\n")
        time.sleep(0.3)  # a download takes a while: the others ask meanwhile
        return real(fs, pairs)

    storage._download = counted
    barrier.wait()
    out.put(str(storage.cached_copy(folder, storage.diffusers_files)))


def test_eight_processes_download_a_model_folder_once(s3_server, tmp_path, monkeypatch):
    """Eight workers of one node loading one model share one download (a file lock), of only the files
    from_pretrained reads, into the cache folder MEDISYN_CACHE_DIR names."""
    import multiprocessing

    monkeypatch.setenv("MEDISYN_CACHE_DIR", str(tmp_path / "nvme"))
    model = storage.path("s3://medisyn-test/cache-test/model")
    files = {
        "model_index.json": b"{}",
        "unet/config.json": b"{}",
        "unet/diffusion_pytorch_model.safetensors": b"w" * 64,
        "unet/diffusion_pytorch_model.fp16.safetensors": b"h" * 32,
        "unet/diffusion_pytorch_model.bin": b"b" * 64,
    }
    for name, data in files.items():
        storage.write_bytes(data, model / name)
    # fresh processes (a fork of this one would copy Ray's threads), forked from one server that imported these once
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["medisyn.storage", "s3fs", __name__])
    barrier, out, log = ctx.Barrier(8), ctx.Queue(), tmp_path / "downloads.log"
    procs = [ctx.Process(target=_copy_in_a_process, args=(str(model), str(log), barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    paths = {out.get(timeout=120) for _ in procs}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert log.read_text().split() == ["3"]  # one download, of 3 files
    (local,) = paths
    assert local.startswith(str(tmp_path / "nvme"))
    got = sorted(f.relative_to(local).as_posix() for f in Path(local).rglob("*") if f.is_file())
    assert got == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    storage.remove_tree(model)


def test_every_node_must_read_every_source_repository(tmp_path):
    from medisyn.raytools import check_sources, visible_sources

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "labels.csv").write_text("path\n")
    sources = {"a": (str(tmp_path / "a"), str(tmp_path / "a/labels.csv"))}
    sources["b"] = (str(tmp_path / "b"), str(tmp_path / "b/labels.csv"))  # not mounted here
    assert visible_sources(sources) == ["a"]
    check_sources(sources, nodes=[])  # one node: the driver lists them itself
    check_sources(sources, nodes=["n1", "n2"], sees=lambda nodes, s: [list(s)] * len(nodes))
    with pytest.raises(ConfigError, match=r"node node-b… cannot read repository 'b' .*1 of 3 nodes cannot"):
        check_sources(sources, nodes=["node-a", "node-b"], sees=lambda nodes, s: [["a", "b"], ["a"]])


@pytest.mark.ray
def test_the_source_probe_runs_on_each_node(ray_cluster, tmp_path):
    from medisyn.raytools import check_sources

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "labels.csv").write_text("path\n")
    here = ray_cluster.get_runtime_context().get_node_id()
    sources = {"a": (str(tmp_path / "a"), str(tmp_path / "a/labels.csv"))}
    check_sources(sources, nodes=[here])  # a task pinned to the node sees it
    with pytest.raises(ConfigError, match=f"node {here[:12]}… cannot read repository 'gone'"):
        check_sources(sources | {"gone": (str(tmp_path / "gone"), str(tmp_path / "gone/x.csv"))}, nodes=[here])
