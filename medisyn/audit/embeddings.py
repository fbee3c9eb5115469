"""Image embeddings for the audits: computed by a Ray Data actor pool, stored as parquet parts.

A set of embeddings is a folder with one subfolder per (specialty, image type) — the groups the
memorization search compares within — of ``part-*.parquet`` files (``id``, ``embedding``:
unit-length float32). CPU tasks decode and preprocess the images; the actors (a GPU each where
there are GPUs) only run the embedder. The driver buffers what the actors return per group and
writes a group's part, atomically, once it holds ``batch_rows`` rows (and every group's rest at
the end), so an interrupted run keeps every finished part and a rerun embeds only the ids no part
of their group holds yet. Readers stream the parts of one group: a search task reads its group's
train keys and queries, not the whole store (≈ 2 GB at 1M × 512 float32).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
import uuid
from collections import defaultdict
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


def group_name(specialty: str | None, image_type: str | None) -> str:
    """The subfolder of one (specialty, image type): readable, and unique by its digest."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{specialty}--{image_type}".lower()).strip("-")[:48]
    return f"{slug}-{hashlib.sha256(json.dumps([specialty, image_type]).encode()).hexdigest()[:8]}"


def preprocess_images(batch: dict, preprocess) -> dict:
    """Ray Data CPU stage before the embedder actors: ``image`` (encoded bytes) → ``pixels``, the
    embedder's own preprocessing (decode, resize, crop, normalise: float32 N×3×S×S)."""
    from PIL import Image

    pixels = [np.asarray(preprocess(Image.open(io.BytesIO(b)).convert("RGB")), np.float32) for b in batch["image"]]
    return {"id": batch["id"], "pixels": np.stack(pixels)}


def _preprocess_of(embedder: str):
    from medisyn.models import load_embedder

    return load_embedder(embedder)[1]


@functools.lru_cache(maxsize=4)
def preprocess_of(embedder: str):
    """The embedder's preprocessing transform, from one Ray task (the driver loads no network)."""
    import ray

    return ray.get(ray.remote(num_cpus=1)(_preprocess_of).remote(embedder))


class Embedder:
    """Ray Data callable class: the embedder loads once per actor; each call embeds a batch.

    Batch in: ``id``, ``pixels`` (preprocessed, from :func:`preprocess_images`; the actor decodes
    nothing). Batch out: ``id``, ``embedding`` (unit length). ``preprocess`` is the embedder's own."""

    def __init__(self, embedder: str):
        import torch

        from medisyn.models import load_embedder

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model, self.preprocess = load_embedder(embedder)
        self.model = model.to(self.device)

    def __call__(self, batch: dict) -> dict:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(batch["pixels"], dtype=np.float32))
        with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.device == "cuda"):
            e = self.model.encode_image(x.to(self.device), normalize=True)
        return {"id": batch["id"], "embedding": list(e.float().cpu().numpy())}


def embeddings_dir(cfg: RunConfig, name: str) -> UPath:
    return cfg.run_path / "audit" / "memorization" / "embeddings" / name


def parts(folder: UPath, group: str | None = None) -> list[UPath]:
    """The parts of one group's subfolder, or (None) of every group's."""
    pattern = f"{group}/part-*.parquet" if group else "*/part-*.parquet"
    return sorted(p for p in store_path(folder).glob(pattern) if not p.name.startswith("."))


def stored(folder: UPath) -> dict[str, str]:
    """``{id: group}`` of the embeddings in ``folder`` (reads the id column only)."""
    return {
        i: p.parent.name for p in parts(folder) for i in storage.read_table(p, columns=["id"]).column("id").to_pylist()
    }


def stored_ids(folder: UPath) -> set[str]:
    """Ids with an embedding in ``folder``."""
    return set(stored(folder))


def _split_by_group(table: pa.Table, groups: dict[str, tuple]) -> dict[str, pa.Table]:
    keys = np.asarray([group_name(*groups[i]) if i in groups else "" for i in table.column("id").to_pylist()])
    return {g: table.filter(pa.array(keys == g)) for g in sorted(set(keys.tolist()) - {""})}


def _partition_flat_parts(folder: UPath, groups: dict[str, tuple]) -> None:
    """Parts written before the store was split by group (``<folder>/part-*.parquet``) move into
    their groups' subfolders under the same name (a rerun after a kill rewrites the same files)."""
    for flat in sorted(p for p in store_path(folder).glob("part-*.parquet") if not p.name.startswith(".")):
        for g, table in _split_by_group(storage.read_table(flat), groups).items():
            atomic_write_table(table, folder / g / flat.name)
        flat.unlink()


def embed(cfg: RunConfig, name: str, groups: dict[str, tuple], source, batch_rows: int = 4096) -> UPath:
    """Embed the ids of ``groups`` (``{id: (specialty, image type)}``) that no part of their group in
    ``embeddings/<name>/`` holds yet; returns the folder.

    ``source(todo)`` builds the Ray Dataset (``id``, ``image`` bytes) of the ids to embed, so
    images are read by Ray Data tasks on the cluster, never by the driver."""
    from medisyn.raytools import actor_pool, ensure_ray, gpus_available

    folder = embeddings_dir(cfg, name)
    folder.mkdir(parents=True, exist_ok=True)
    _partition_flat_parts(folder, groups)
    for sub in folder.iterdir() if folder.is_dir() else []:  # an object store has no empty folders
        if sub.is_dir():
            remove_partial_writes(sub)  # writes a killed run did not finish
    have = {i for i, g in stored(folder).items() if i in groups and group_name(*groups[i]) == g}
    todo = sorted(set(groups) - have)
    if todo:
        ensure_ray()
        m = cfg.audit_memorization
        use_gpu = gpus_available(cfg.train.use_gpu)
        ds = source(todo).map_batches(
            preprocess_images, fn_kwargs={"preprocess": preprocess_of(m.embedder)}, batch_size=m.batch_size
        )
        ds = ds.map_batches(
            Embedder,
            fn_constructor_args=(m.embedder,),
            batch_size=m.batch_size,
            compute=actor_pool(m.min_actors, m.max_actors, use_gpu),
            num_gpus=1 if use_gpu else 0,
            num_cpus=0 if use_gpu else 1,
        )
        pending: dict[str, list[pa.Table]] = defaultdict(list)

        def flush(group: str) -> None:
            table = pa.concat_tables(pending.pop(group))
            atomic_write_table(table, folder / group / f"part-{uuid.uuid4().hex}.parquet")
            have.update(table.column("id").to_pylist())

        for batch in ds.iter_batches(batch_size=batch_rows, batch_format="numpy"):
            table = pa.table(
                {
                    "id": [str(i) for i in batch["id"]],
                    "embedding": [np.asarray(e, np.float32) for e in batch["embedding"]],
                },
                schema=EMBEDDING_SCHEMA,
            )
            for g, rows in _split_by_group(table, groups).items():
                pending[g].append(rows)
                if sum(t.num_rows for t in pending[g]) >= batch_rows:
                    flush(g)
        for g in sorted(pending):
            flush(g)
    missing = set(groups) - have
    if missing:
        raise RuntimeError(f"audit-memorization: {len(missing)} images of {name} could not be embedded")
    return folder


def _read(part: UPath, ids: pa.Array | None) -> pa.Table:
    table = storage.read_table(part)
    if ids is not None:
        table = table.filter(pc.is_in(table.column("id"), value_set=ids))
    return table


def _id_set(ids) -> pa.Array:
    """The ids as one arrow array, built once per reader (not once per part)."""
    return pa.array(list(ids), pa.string())


def _matrix(table: pa.Table) -> np.ndarray:
    values = table.column("embedding").combine_chunks()
    if len(values) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), -1).astype(np.float32, copy=False)


def read_embeddings(folder: UPath, ids, group: str | None = None) -> dict[str, np.ndarray]:
    """``{id: embedding}`` for the given ids only (of one group's parts when given; read one at a time)."""
    wanted, out = _id_set(set(ids)), {}
    for part in parts(folder, group):
        table = _read(part, wanted)
        out.update(zip(table.column("id").to_pylist(), _matrix(table), strict=True))
    return out


def embedding_shards(folder: UPath, ids, group: str | None = None) -> Iterator[tuple[list[str], np.ndarray]]:
    """The embeddings of ``ids`` one part of ``group`` at a time: (ids, [n, d]) — a search's shards of keys."""
    wanted = _id_set(set(ids))
    for part in parts(folder, group):
        table = _read(part, wanted)
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
