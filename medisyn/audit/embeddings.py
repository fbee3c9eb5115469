"""Image embeddings for the audits: computed by a Ray Data actor pool, stored as parquet parts.

A set of embeddings is a folder of ``part-*.parquet`` files (``id``, ``embedding``: unit-length
float32). Each batch the actors return is written as its own part, atomically, as it arrives,
so the driver never holds more than one batch, an interrupted run keeps every finished part,
and a rerun embeds only the ids no part holds yet. Readers stream the parts: a search reads
one part at a time (its shard of keys), a lookup keeps only the ids it asked for.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from medisyn import storage
from medisyn.config import RunConfig
from medisyn.records import atomic_write_table, remove_partial_writes
from medisyn.storage import path as store_path

EMBEDDING_SCHEMA = pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32()))])


class Embedder:
    """Ray Data callable class: the embedder loads once per actor; each call embeds a batch.

    Batch in: ``id``, ``image`` (encoded bytes). Batch out: ``id``, ``embedding`` (unit length)."""

    def __init__(self, embedder: str):
        import torch

        from medisyn.models import load_embedder

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model, self.preprocess = load_embedder(embedder)
        self.model = model.to(self.device)

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        torch = self.torch
        x = torch.stack([self.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch["image"]])
        with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            e = self.model.encode_image(x.to(self.device), normalize=True)
        return {"id": batch["id"], "embedding": list(e.float().cpu().numpy())}


def embeddings_dir(cfg: RunConfig, name: str) -> UPath:
    return cfg.run_path / "audit" / "memorization" / "embeddings" / name


def parts(folder: UPath) -> list[UPath]:
    return sorted(p for p in store_path(folder).glob("part-*.parquet") if not p.name.startswith("."))


def stored_ids(folder: UPath) -> set[str]:
    """Ids with an embedding in ``folder`` (reads the id column only)."""
    return {i for p in parts(folder) for i in storage.read_table(p, columns=["id"]).column("id").to_pylist()}


def embed(cfg: RunConfig, name: str, ids: list[str], source, batch_rows: int = 4096) -> UPath:
    """Embed the ``ids`` no part of ``embeddings/<name>/`` holds yet; returns the folder.

    ``source(todo)`` builds the Ray Dataset (``id``, ``image`` bytes) of the ids to embed, so
    images are read by Ray Data tasks on the cluster, never by the driver."""
    import ray

    from medisyn.raytools import ensure_ray, gpus_available

    folder = embeddings_dir(cfg, name)
    folder.mkdir(parents=True, exist_ok=True)
    remove_partial_writes(folder)
    have = stored_ids(folder)
    todo = sorted(set(ids) - have)
    if todo:
        ensure_ray()
        m = cfg.audit_memorization
        use_gpu = gpus_available(cfg.train.use_gpu)
        ds = source(todo).map_batches(
            Embedder,
            fn_constructor_args=(m.embedder,),
            batch_size=m.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=m.num_actors),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        )
        for batch in ds.iter_batches(batch_size=batch_rows, batch_format="numpy"):
            table = pa.table(
                {
                    "id": [str(i) for i in batch["id"]],
                    "embedding": [np.asarray(e, np.float32) for e in batch["embedding"]],
                },
                schema=EMBEDDING_SCHEMA,
            )
            atomic_write_table(table, folder / f"part-{uuid.uuid4().hex}.parquet")
            have.update(table.column("id").to_pylist())
    missing = set(ids) - have
    if missing:
        raise RuntimeError(f"audit-memorization: {len(missing)} images of {name} could not be embedded")
    return folder


def _read(part: UPath, ids: set[str] | None) -> pa.Table:
    table = storage.read_table(part)
    if ids is not None:
        table = table.filter(pc.is_in(table.column("id"), pa.array(sorted(ids), pa.string())))
    return table


def _matrix(table: pa.Table) -> np.ndarray:
    values = table.column("embedding").combine_chunks()
    if len(values) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1).astype(np.float32, copy=False)


def read_embeddings(folder: UPath, ids) -> dict[str, np.ndarray]:
    """``{id: embedding}`` for the given ids only (the parts are read one at a time)."""
    wanted, out = set(ids), {}
    for part in parts(folder):
        table = _read(part, wanted)
        out.update(zip(table.column("id").to_pylist(), _matrix(table), strict=True))
    return out


def embedding_shards(folder: UPath, ids: set[str]) -> Iterator[tuple[list[str], np.ndarray]]:
    """The embeddings of ``ids`` one part at a time: (ids, [n, d]) — a search's shards of keys."""
    for part in parts(folder):
        table = _read(part, ids)
        if table.num_rows:
            yield table.column("id").to_pylist(), _matrix(table)


def corpus_source(corpus: UPath):
    """Ray Dataset of corpus images by id (read from the shards by Ray Data)."""

    def build(todo: list[str]):
        import ray

        from medisyn.raytools import keep_ids
        from medisyn.records import shard_files

        ds = ray.data.read_parquet([storage.uri(f) for f in shard_files(corpus)], columns=["id", "image"])
        return keep_ids(ds, todo)

    return build


def files_source(folder: UPath):
    """Ray Dataset of a synthetic set's ``<id>.png`` files by id."""

    def build(todo: list[str]):
        import ray

        ds = ray.data.read_binary_files([storage.uri(folder / f"{i}.png") for i in todo], include_paths=True)
        return ds.map(lambda r: {"id": r["path"].rsplit("/", 1)[-1].removesuffix(".png"), "image": r["bytes"]})

    return build
