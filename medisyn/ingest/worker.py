"""The per-task work of ingest: a unit of files in, one staging shard out (then one corpus shard).

Tasks receive typed units (:mod:`medisyn.ingest.units`) built on the driver. Every output file
is written through :mod:`medisyn.storage` (a temporary name, then renamed), so a killed task
leaves nothing half-written, on a local disk or an object store; the ``.json`` marker is
written last. Shards are written and read a row group at a time, so a task's memory is
bounded by ``ingest.row_group_rows``, not by the size of a slide. Errors are caught per file
(never per block), so one bad file costs one reject row, not its neighbours.
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from medisyn import storage
from medisyn.ingest.readers import Rejected, iter_wsi_patches, read_dicom, read_image
from medisyn.ingest.transforms import resize_center_crop_info
from medisyn.ingest.units import FinalizeJob, Item, Unit, UnitSettings
from medisyn.records import CORPUS_SCHEMA, REJECT_SCHEMA, atomic_write_table, atomic_write_text

# staging = corpus columns + what dedup needs (perceptual hash, grey thumbnail)
STAGING_SCHEMA = CORPUS_SCHEMA.append(pa.field("phash", pa.string())).append(pa.field("thumb", pa.binary()))
THUMB = 32  # side of the grey thumbnail that confirms a near duplicate


def encode_image(img: Image.Image, fmt: str, png_level: int) -> bytes:
    """Lossless bytes that ``PIL.Image.open`` reads back exactly.

    ``auto``: PNG for grey (fast: one channel) and lossless WebP (method 0) for colour,
    which encodes ~4x faster than PNG at level 1 for a smaller file; WebP has no grey mode.
    """
    buf = io.BytesIO()
    if fmt == "webp" or (fmt == "auto" and img.mode == "RGB"):
        img.save(buf, format="WEBP", lossless=True, method=0, quality=0)
    else:
        img.save(buf, format="PNG", compress_level=png_level)
    return buf.getvalue()


def _images(item: Item, s: UnitSettings):
    """(uint8 image, ref suffix) for every image of one source file; background patches as None."""
    if s.kind == "dicom":
        frames = read_dicom(
            item.path, frames=s.frames, intensity=s.intensity, window=s.window, pct=s.pct, max_pixels=s.max_pixels
        )
        for arr, meta in frames:
            yield arr, (f"#frame={meta['frame']}" if meta["frames"] > 1 else "")
    elif s.kind == "image":
        arr, _ = read_image(item.path, intensity=s.intensity, pct=s.pct, max_pixels=s.max_pixels)
        yield arr, ""
    else:
        for arr, meta in iter_wsi_patches(
            item.path,
            level=s.wsi_level,
            patch=s.wsi_patch_size,
            overlap=s.wsi_overlap,
            min_tissue=s.wsi_tissue_fraction,
        ):
            yield arr, f"#level={meta['level']},x={meta['x']},y={meta['y']}"


def _row(item: Item, s: UnitSettings, arr: np.ndarray, suffix: str) -> dict:
    square, info = resize_center_crop_info(arr, s.size)
    pil = Image.fromarray(square)
    thumb = pil.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX)
    return {
        "id": hashlib.sha256(square.tobytes() + str(square.shape).encode()).hexdigest()[:32],
        "image": encode_image(pil, s.image_format, s.png_compress_level),
        "caption": item.caption,
        "specialty": s.specialty,
        "image_type": s.image_type,
        "labels": list(item.labels),
        "patient_id": item.patient,
        "split": item.split,
        "source": item.repo,
        "source_ref": item.ref + suffix,
        "series": item.series,
        "original_size": list(info.original_size),
        "crop_top_left": list(info.crop_top_left),
        "phash": str(imagehash.phash(thumb)),  # pHash resizes to 32x32 itself: give it the thumbnail
        "thumb": thumb.tobytes(),
    }


def process_unit(row: dict) -> dict:
    """Ray Data ``map`` function. Row: ``{"unit": Unit}``.

    Writes ``<dir>/<id>.parquet`` (accepted rows), ``<id>.rejects.parquet`` and, last,
    ``<id>.json`` (counts). Returns the counts.
    """
    started = time.perf_counter()
    unit: Unit = row["unit"]
    s, out, uid = unit.settings, storage.path(unit.dir), unit.id
    rejects: list[dict] = []
    counts = {"unit": uid, "files": len(unit.items), "accepted": 0, "rejected": 0, "background": 0}
    buffer: list[dict] = []
    with storage.parquet_writer(out / f"{uid}.parquet", STAGING_SCHEMA) as writer:
        for item in unit.items:
            try:
                for arr, suffix in _images(item, s):
                    if arr is None:
                        counts["background"] += 1
                        continue
                    try:
                        buffer.append(_row(item, s, arr, suffix))
                        counts["accepted"] += 1
                    except Exception as exc:  # one bad frame or patch: reject it, keep the rest
                        rejects.append(
                            {
                                "source_ref": item.ref + suffix,
                                "series": item.series,
                                "stage": "transform",
                                "reason": f"transform failed ({type(exc).__name__})",
                            }
                        )
                    if len(buffer) >= s.row_group_rows:
                        writer.write_table(pa.Table.from_pylist(buffer, STAGING_SCHEMA))
                        buffer = []
            except Rejected as exc:
                rejects.append({"source_ref": item.ref, "stage": "read", "reason": exc.reason})
            except Exception as exc:
                rejects.append(
                    {"source_ref": item.ref, "stage": "read", "reason": f"unexpected read error ({type(exc).__name__})"}
                )
        if buffer:
            writer.write_table(pa.Table.from_pylist(buffer, STAGING_SCHEMA))
    counts["rejected"] = len(rejects)
    counts["seconds"] = time.perf_counter() - started
    atomic_write_table(pa.Table.from_pylist(rejects, REJECT_SCHEMA), out / f"{uid}.rejects.parquet")
    atomic_write_text(json.dumps(counts), out / f"{uid}.json")
    return counts


def finalize_unit(row: dict) -> dict:
    """Ray Data ``map`` function: a staging shard minus duplicates becomes a corpus shard.

    Row: ``{"job": FinalizeJob}``. Writes ``corpus/<id>.parquet`` and ``rejects/<id>.parquet``
    (read rejects + duplicates). The staging shard is copied one row group at a time (one
    slide's shard can hold 20,000 patches, ~8 GB), so the corpus shard keeps its row groups.
    """
    job: FinalizeJob = row["job"]
    uid, dropped = job.id, job.dropped
    staged = storage.parquet_file(storage.path(job.staging) / f"{uid}.parquet")
    kept, duplicates = 0, []
    with storage.parquet_writer(storage.path(job.corpus) / f"{uid}.parquet", CORPUS_SCHEMA) as writer:
        for g in range(staged.num_row_groups):
            # one thread: a row group's column chunks decoded in turn, so the peak does not depend on timing
            group = staged.read_row_group(g, columns=CORPUS_SCHEMA.names, use_threads=False)
            refs = group.column("source_ref").to_pylist()
            keep = np.array([r not in dropped for r in refs], dtype=bool)
            duplicates += [r for r in refs if r in dropped]
            if keep.any():
                writer.write_table(group.filter(pa.array(keep)).cast(CORPUS_SCHEMA))
                kept += int(keep.sum())
            del group  # before the next read: at most one row group is held
    rejects = storage.read_table(storage.path(job.staging) / f"{uid}.rejects.parquet").to_pylist()
    rejects += [
        {"source_ref": r, "stage": "dedup", "reason": f"{dropped[r][0]} of {dropped[r][1]}"} for r in duplicates
    ]
    atomic_write_table(pa.Table.from_pylist(rejects, REJECT_SCHEMA), storage.path(job.rejects) / f"{uid}.parquet")
    return {"unit": uid, "corpus": kept, "duplicates": len(duplicates)}
