"""The records every stage passes on: vocabularies, schemas, corpus reads and atomic writes.

This is the bottom of the code base (DESIGN §9): it imports no stage and no config, and takes
paths, not a ``RunConfig``, so ingest writes and every later stage (cache, select, generate,
the audits, the report) reads the same contract through the same functions.

A corpus is a folder of parquet shards (``corpus/part-*.parquet``) with :data:`CORPUS_SCHEMA`
and one index (``corpus/_index/<digest>.parquet``, :data:`INDEX_SCHEMA`: every column but the
image, plus where the row lives), both listed in ``_shards.json``. Metadata reads answer from the
index (one file, whatever the number of shards); image reads open only the shards holding the
wanted rows, once each. A folder without an index (an older corpus) is read by scanning its
shards. Shards are read in sorted path order and rows in file order (the index keeps that order),
so a seeded sample of the corpus is the same on every machine. Files whose name starts with ``.``
are temporary writes; names starting with ``_`` are not shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medisyn import storage
from medisyn.storage import path as store_path

# The paper's six specialties and ten image types (DESIGN §2); every image type belongs to one
# specialty, except endoscopy (surgery and gastroenterology).
SPECIALTIES = ("radiology", "dermatology", "pathology", "ophthalmology", "surgery", "gastroenterology")
IMAGE_TYPES = (
    "computed tomography",
    "X-ray",
    "magnetic resonance imaging",
    "ultrasound",
    "dermoscopy",
    "clinical images",
    "microscopy",
    "optical coherence tomography",
    "fundoscopy",
    "endoscopy",
)
SPLITS = ("train", "val", "test")

CORPUS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # hash of the 512² pixels
        ("image", pa.binary()),  # lossless image bytes (PNG grey, WebP colour): PIL.Image.open reads them
        ("caption", pa.string()),
        ("specialty", pa.string()),  # one of SPECIALTIES
        ("image_type", pa.string()),  # one of IMAGE_TYPES
        ("labels", pa.list_(pa.string())),  # caption phrases
        ("patient_id", pa.string()),  # salted hash, never the source value
        ("split", pa.string()),  # one of SPLITS
        ("source", pa.string()),  # repository name
        ("source_ref", pa.string()),  # repo/<hash>[#frame=i | #level=l,x=..,y=..]
        ("series", pa.string()),  # repo/<hash> of the source file's folder: a CT/MR series' slices share it
        ("original_size", pa.list_(pa.int32())),  # (height, width) before resizing
        ("crop_top_left", pa.list_(pa.int32())),  # (top, left) of the crop after resizing
    ]
)
# the corpus index: every corpus column but the image, and where the row is (shard name, row group, row in the shard)
INDEX_SCHEMA = pa.schema(
    [f for f in CORPUS_SCHEMA if f.name != "image"]
    + [pa.field("shard", pa.string()), pa.field("row_group", pa.int32()), pa.field("row", pa.int32())]
)
REJECT_SCHEMA = pa.schema([("source_ref", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # pure function of (set, prompt, index)
        ("file", pa.string()),  # <id>.png beside the manifest
        ("prompt", pa.string()),
        ("specialty", pa.string()),
        ("image_type", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("seed", pa.int64()),
        ("index", pa.int64()),  # the image's index under its prompt
        ("checkpoint", pa.string()),
        ("guidance_scale", pa.float64()),
        ("steps", pa.int64()),
        ("scheduler", pa.string()),
        ("original_size", pa.list_(pa.int32())),  # (height, width) the image was conditioned on
        ("bytes", pa.int64()),  # the file's size as written: a rerun remakes a file that differs
        ("sha256", pa.string()),  # of the file's bytes, as written
        # RMS of eps_cond - eps_uncond over the first generate.gap_steps steps (infer.guidance); null: unguided
        ("guidance_gap", pa.float64()),
    ]
)


# --- atomic writes: a killed task or a retried actor never leaves a half-written file ---
# (they go through medisyn.storage, so they work the same on a local disk and an object store)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    storage.write_bytes(data, path)


def atomic_write_text(text: str, path: str | Path) -> None:
    storage.write_bytes(text.encode(), path)


def atomic_write_table(table: pa.Table, path: str | Path) -> None:
    storage.write_table(table, path)


def remove_partial_writes(folder: str | Path) -> int:
    """Delete temporary files a killed writer left in ``folder``; returns how many."""
    stale = list(store_path(folder).glob(".*.tmp"))
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


# --- reading shard folders ---


SHARD_LIST = "_shards.json"  # written last by the stage that owns a folder: the shards that are current
INDEX_DIR = "_index"  # corpus/_index/<digest>.parquet: named by its content, listed in _shards.json


def _listing(folder) -> dict | None:
    """The folder's ``_shards.json`` (None when it has none)."""
    record = store_path(folder) / SHARD_LIST
    return json.loads(record.read_text()) if record.is_file() else None


def shard_files(folder: str | Path) -> list[Path]:
    """The parquet shards of a folder (corpus, rejects, latents), in sorted path order.

    A folder with a ``_shards.json`` holds exactly the shards it lists: a stage writes its new
    shards beside the old ones and publishes them by rewriting that list, atomically, only when
    the run has succeeded, so a failed or refused run leaves the previous result in force."""
    folder = store_path(folder)
    listing = _listing(folder)
    if listing is not None:
        return [folder / name for name in sorted(listing["shards"])]
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))


def index_file(folder: str | Path):
    """The folder's corpus index (``_index/<digest>.parquet``), or None for a folder without one."""
    listing = _listing(folder)
    return store_path(folder) / listing["index"] if listing and listing.get("index") else None


def publish_shards(folder: str | Path, names: list[str], index: str | None = None) -> None:
    """Make ``names`` (and the corpus ``index``, a path under the folder) the folder's current
    shards (see :func:`shard_files`), then delete the rest. A list that has not changed is not
    rewritten, so a rerun that changes nothing leaves the folder as it was."""
    folder = store_path(folder)
    text = json.dumps({"shards": sorted(names)} | ({"index": index} if index else {}), indent=0)
    record = folder / SHARD_LIST
    if not (record.is_file() and record.read_text() == text):
        atomic_write_text(text, record)
    for f in folder.glob("*.parquet"):
        if f.name not in names:
            f.unlink()
    for f in (folder / INDEX_DIR).glob("*.parquet") if (folder / INDEX_DIR).is_dir() else []:
        if f"{INDEX_DIR}/{f.name}" != index:
            f.unlink()


def read_shards(folder: str | Path, columns: list[str] | None = None, filter=None) -> pa.Table:
    """All shards of ``folder`` as one table, with an optional row filter.

    ``filter`` is a pyarrow compute expression (``pc.field("split") == "train"``). A corpus with
    an index answers from it: the index alone for metadata columns, plus one open per shard that
    holds a selected row when ``image`` is asked for. Otherwise shards are read one by one and
    rows dropped per shard, so only the selected rows are ever held at once. Raises
    FileNotFoundError naming the folder when it holds no shard.
    """
    index = index_file(folder)
    if index is not None:
        return _read_by_index(folder, index, columns, filter)
    files = shard_files(folder)
    if not files:
        raise FileNotFoundError(f"no parquet shards in {folder}")
    tables = [storage.read_table(f, columns=columns, filters=filter) for f in files]
    return pa.concat_tables(tables)


def _read_by_index(folder, index, columns: list[str] | None, filter) -> pa.Table:
    """Rows of an indexed corpus: metadata from the index, image bytes from the rows' shards."""
    columns = list(CORPUS_SCHEMA.names if columns is None else columns)
    if "image" not in columns:
        return storage.read_table(index, columns=columns, filters=filter)
    meta = [c for c in columns if c != "image"]
    located = storage.read_table(index, columns=list(dict.fromkeys(["shard", "row", *meta])), filters=filter)
    images = _images_at(folder, located.column("shard").to_pylist(), located.column("row").to_pylist())
    fields = [CORPUS_SCHEMA.field(c) for c in columns]
    arrays = [pa.array(images, pa.binary()) if c == "image" else located.column(c) for c in columns]
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _images_at(folder, shards: list[str], rows: list[int]) -> list[bytes]:
    """Image bytes of (shard name, row) pairs, in their order: one open per shard, up to 16 shards
    at a time (on an object store each open is a few requests' latency, not bandwidth)."""
    from concurrent.futures import ThreadPoolExecutor

    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(shards):
        by_shard.setdefault(shard, []).append(i)

    def take(item):
        shard, at = item
        return at, _take_rows(store_path(folder) / shard, [rows[i] for i in at], ["image"])

    out: list = [None] * len(rows)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(by_shard)))) as pool:
        for at, picked in pool.map(take, by_shard.items()):
            for i, data in zip(at, picked.column("image").to_pylist(), strict=True):
                out[i] = data
    return out


def read_corpus(
    corpus: str | Path,
    columns: list[str] | None = None,
    split: str | None = None,
    ids: set[str] | list[str] | None = None,
    where: pc.Expression | None = None,
) -> pa.Table:
    """Rows of the corpus folder, optionally one split, the given image ids and/or rows matching
    a pyarrow expression (``where``), in shard order.

    Read columns only what you need: ``image`` is the only large one (and the only one that
    opens shards of an indexed corpus).
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    filter = where
    if split is not None:
        filter = pc.field("split") == split if filter is None else filter & (pc.field("split") == split)
    if ids is not None:
        by_id = pc.field("id").isin(sorted(ids))
        filter = by_id if filter is None else filter & by_id
    try:
        return read_shards(corpus, columns, filter)
    except FileNotFoundError:
        raise FileNotFoundError(f"no corpus shards in {corpus}; run `medisyn ingest` first") from None


def sample_corpus(corpus: str | Path, n: int, seed: int, split: str = "train", columns=None) -> list[dict]:
    """``n`` rows of one split drawn without replacement by a seeded RNG, in corpus order.

    The same corpus and seed give the same rows on every machine (shards are read in sorted
    order). Default columns: id, caption, specialty, image_type, labels.
    """
    columns = list(columns or ["id", "caption", "specialty", "image_type", "labels"])
    rows = read_corpus(corpus, columns=columns, split=split).to_pylist()
    rng = np.random.default_rng(seed)
    return [rows[i] for i in sorted(rng.choice(len(rows), size=min(n, len(rows)), replace=False))]


def median_original_sizes(corpus: str | Path, split: str = "train") -> dict[str, list[int]]:
    """``{image_type: [height, width]}``: the median original size of each image type's images,
    and under ``"*"`` of all of them (for prompts that name no image type).

    What generation and FID images are conditioned on (SDXL's ``original_size``), as training
    conditioned each image on its own original size; stored with the exported model."""
    table = read_corpus(corpus, columns=["image_type", "original_size"], split=split)
    sizes: dict[str, list] = {}
    for t, size in zip(table.column("image_type").to_pylist(), table.column("original_size").to_pylist(), strict=True):
        sizes.setdefault(t, []).append(size)
        sizes.setdefault("*", []).append(size)
    return {t: [int(x) for x in np.median(np.asarray(v), axis=0).round()] for t, v in sorted(sizes.items())}


def conditioning_size(sizes: dict[str, list[int]], image_type: str, default: int) -> tuple[int, int]:
    """The recorded size for an image type (else the overall median, else ``default`` square)."""
    size = sizes.get(image_type) or sizes.get("*") or [default, default]
    return int(size[0]), int(size[1])


def corpus_index(corpus: str | Path) -> dict[str, tuple[str, int]]:
    """``{id: (shard path, row)}``: where each corpus image lives, from the index (or, for a
    corpus without one, from every shard's id column)."""
    index = index_file(corpus)
    if index is not None:
        t = storage.read_table(index, columns=["id", "shard", "row"])
        uris = {name: storage.uri(store_path(corpus) / name) for name in set(t.column("shard").to_pylist())}
        return {
            i: (uris[s], r) for i, s, r in zip(*(t.column(c).to_pylist() for c in ("id", "shard", "row")), strict=True)
        }
    out = {}
    for shard in shard_files(corpus):
        for row, image_id in enumerate(storage.read_table(shard, columns=["id"]).column("id").to_pylist()):
            out[image_id] = (storage.uri(shard), row)
    return out


def _take_rows(shard, rows: list[int], columns: list[str]) -> pa.Table:
    """The given rows of one shard, in that order, reading only the row groups that hold them."""
    pf = storage.parquet_file(shard)
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
    group_of = {r: int(np.searchsorted(starts, r, side="right")) - 1 for r in rows}
    groups = sorted(set(group_of.values()))
    first, at = {}, 0  # each selected group's first row in the table read below
    for g in groups:
        first[g], at = at, at + int(starts[g + 1] - starts[g])
    table = pf.read_row_groups(groups, columns=columns)
    return table.take([first[group_of[r]] + r - int(starts[group_of[r]]) for r in rows])


def read_rows(shard: str | Path, rows: list[int]) -> dict[str, bytes]:
    """``{id: image bytes}`` of the given rows of a corpus shard, reading only the row groups
    that hold them (a shard's other images are never read)."""
    picked = _take_rows(shard, rows, ["id", "image"])
    return dict(zip(picked.column("id").to_pylist(), picked.column("image").to_pylist(), strict=True))


def read_images(corpus: str | Path, ids: set[str] | list[str]) -> dict[str, bytes]:
    """``{id: image bytes}`` for the given ids, reading only the row groups that hold them (a filter
    on ``id`` would read them all): the index says where they are, and each shard holding one is
    opened once. A corpus without an index has every shard's id column scanned instead."""
    wanted = set(ids)
    index = index_file(corpus)
    if index is not None:
        t = storage.read_table(index, columns=["id", "shard", "row"], filters=pc.field("id").isin(sorted(wanted)))
        images = _images_at(corpus, t.column("shard").to_pylist(), t.column("row").to_pylist())
        return dict(zip(t.column("id").to_pylist(), images, strict=True))
    out = {}
    for shard in shard_files(corpus):
        shard_ids = storage.read_table(shard, columns=["id"]).column("id").to_pylist()
        rows = [row for row, image_id in enumerate(shard_ids) if image_id in wanted]
        if rows:
            out.update(read_rows(shard, rows))
    return out


def decode_rgb(data: bytes, size: tuple[int, int] | None = None, resample: str = "LANCZOS") -> np.ndarray:
    """Stored image bytes -> uint8 RGB array, resized to ``size`` (width, height) when given."""
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    if size and im.size != tuple(size):
        im = im.resize(tuple(size), getattr(Image.Resampling, resample))
    return np.asarray(im)


def read_manifest(set_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A synthetic set's ``manifest.parquet`` (:data:`MANIFEST_SCHEMA`)."""
    path = store_path(set_dir) / "manifest.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}; run `medisyn generate` for this set first")
    have = storage.parquet_file(path).schema_arrow.names
    missing = [c for c in (columns or MANIFEST_SCHEMA.names) if c not in have and c in MANIFEST_SCHEMA.names]
    table = storage.read_table(path, columns=[c for c in columns if c in have] if columns else None)
    for name in missing:  # a column added since the set was made (guidance_gap) reads as null
        field = MANIFEST_SCHEMA.field(name)
        table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(columns) if columns else table


# --- one run of a stage per run directory ---


class StageBusy(RuntimeError):
    """Another process is running this stage on this run directory."""


@contextlib.contextmanager
def stage_lock(run_dir: str | Path, stage: str):
    """Hold ``<run_dir>/.locks/<stage>.lock`` (an exclusive ``flock``) while a stage runs, so two
    runs of one stage on one run directory never both do the work: the second stops at once
    with :class:`StageBusy` naming the holder. The kernel drops the lock if the holder dies.

    An object store has no locks: there this holds nothing, and two runs of one stage are kept
    apart by whoever submits them (one job submission id per stage and run)."""
    import fcntl

    if storage.is_remote(run_dir):
        yield
        return
    folder = Path(store_path(run_dir).path) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / f"{stage}.lock", "a+")  # noqa: SIM115 - held for the block's duration
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise StageBusy(
                f"stage {stage!r} is already running on {run_dir} ({holder}); wait for it to finish or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
    finally:
        handle.close()


def sweep_partial_writes(root: str | Path, before: float) -> int:
    """Delete ``.*.tmp`` files under ``root`` last written before ``before`` (a stage's start):
    what killed writers of earlier runs left. Called when a stage completes; returns how many."""
    n = 0
    for f in store_path(root).rglob(".*.tmp"):
        try:
            if f.is_file() and _mtime(f) < before:
                f.unlink()
                n += 1
        except FileNotFoundError:
            pass  # another writer renamed it meanwhile
    return n


def _mtime(p) -> float:
    """Last-modified time in seconds on any filesystem (object stores report it as a date)."""
    if not storage.is_remote(p):
        return p.stat().st_mtime
    modified = p.fs.modified(p.path)
    return modified.timestamp()


# --- what a resumable training run was started from ---

RUN_INPUTS = "medisyn-inputs.json"


def run_inputs_differ(folder: str | Path, inputs: dict) -> list[str]:
    """Keys whose value differs from the record ``folder/medisyn-inputs.json`` (none when the
    folder holds no run yet, or was started from these inputs); records them when none differ.

    Ray Train resumes whatever snapshot its storage folder holds: without this check a run
    over another corpus or other settings would silently continue (or return) the old one."""
    folder = store_path(folder)
    record = folder / RUN_INPUTS
    if record.is_file():
        have = json.loads(record.read_text())
        differ = sorted(k for k in set(have) | set(inputs) if have.get(k) != inputs.get(k))
        return differ  # the same inputs: the record stands as written
    if folder.is_dir() and any(folder.iterdir()):
        return ["(a run started before its inputs were recorded)"]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(inputs, indent=2, sort_keys=True, default=str), record)
    return []


# --- what an audit was computed from ---


def corpus_identity(corpus: str | Path) -> str:
    """A digest of the corpus shards' names and sizes: a re-ingest that changes any shard changes it
    (cheap at 1M images: one listing, no reads)."""
    import hashlib

    listing = sorted(storage.sizes(store_path(corpus)).items())
    shards = [(n, s) for n, s in listing if n.endswith(".parquet") and not n.startswith(".")]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


def set_identity(set_dir: str | Path) -> str:
    """A digest of a synthetic set's images (manifest ids and content digests): a set made again
    with the same pixels keeps its identity, one with any other image does not."""
    import hashlib

    m = read_manifest(set_dir, ["id", "file", "sha256"])
    sizes = None
    pairs = []
    for i, f, h in zip(*(m.column(c).to_pylist() for c in ("id", "file", "sha256")), strict=True):
        if h is None:  # a set made by other tools records no digests: its files' sizes stand in
            sizes = storage.sizes(store_path(set_dir)) if sizes is None else sizes
            h = f"{f}: {sizes.get(f)} bytes"
        pairs.append((i, h))
    pairs.sort()
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]


def finished_with(record: str | Path, inputs: dict, key: str = "inputs") -> dict | None:
    """The JSON ``record`` a stage wrote when it finished, when its ``key`` holds these ``inputs``
    (compared as JSON: tuples and lists alike); else None.

    A resubmitted pipeline passes every finished stage this way instead of redoing hours of work."""
    record = store_path(record)
    if not record.is_file():
        return None
    done = json.loads(record.read_text())
    return done if done.get(key) == json.loads(json.dumps(inputs, default=str)) else None


# how many train images carry one caption, in bins: the ingest summary's `captions` histogram and the
# memorization audit's `by_caption_share` use the same edges (duplicated captions drive copying)
CAPTION_SHARE_BINS = ((1, 1, "1"), (2, 4, "2-4"), (5, 16, "5-16"), (17, 64, "17-64"), (65, None, "65+"))


def caption_share_bin(n: int) -> str:
    """The bin ("1", "2-4", "5-16", "17-64", "65+") of a caption that ``n`` >= 1 train images carry."""
    return next(name for lo, hi, name in CAPTION_SHARE_BINS if n >= lo and (hi is None or n <= hi))
