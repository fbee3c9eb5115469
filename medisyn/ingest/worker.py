"""The per-task work of ingest: a unit of files in, one staging shard out (then one corpus shard).

Tasks receive typed units (:mod:`medisyn.ingest.units`) built on the driver. Every output file
is written to a temporary name and renamed, so a killed task leaves nothing half-written; the
``.json`` marker is written last. Errors are caught per file (never per block), so one bad
file costs one reject row, not its neighbours.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

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
    s, out, uid = unit.settings, Path(unit.dir), unit.id
    rejects: list[dict] = []
    counts = {"unit": uid, "files": len(unit.items), "accepted": 0, "rejected": 0, "background": 0}
    tmp = out / f".{uid}.{uuid.uuid4().hex}.tmp"
    buffer: list[dict] = []
    with pq.ParquetWriter(tmp, STAGING_SCHEMA) as writer:
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
    os.replace(tmp, out / f"{uid}.parquet")
    counts["rejected"] = len(rejects)
    counts["seconds"] = time.perf_counter() - started
    atomic_write_table(pa.Table.from_pylist(rejects, REJECT_SCHEMA), out / f"{uid}.rejects.parquet")
    atomic_write_text(json.dumps(counts), out / f"{uid}.json")
    return counts


def finalize_unit(row: dict) -> dict:
    """Ray Data ``map`` function: a staging shard minus duplicates becomes a corpus shard.

    Row: ``{"job": FinalizeJob}``. Writes ``corpus/<id>.parquet`` and ``rejects/<id>.parquet``
    (read rejects + duplicates).
    """
    job: FinalizeJob = row["job"]
    uid, dropped = job.id, job.dropped
    staged = pq.read_table(Path(job.staging) / f"{uid}.parquet")
    refs = staged.column("source_ref").to_pylist()
    keep = np.array([r not in dropped for r in refs], dtype=bool)
    corpus = staged.filter(pa.array(keep)).select(CORPUS_SCHEMA.names)
    atomic_write_table(corpus, Path(job.corpus) / f"{uid}.parquet")
    rejects = pq.read_table(Path(job.staging) / f"{uid}.rejects.parquet").to_pylist()
    rejects += [
        {"source_ref": r, "stage": "dedup", "reason": f"{dropped[r][0]} of {dropped[r][1]}"}
        for r in refs
        if r in dropped
    ]
    atomic_write_table(pa.Table.from_pylist(rejects, REJECT_SCHEMA), Path(job.rejects) / f"{uid}.parquet")
    return {"unit": uid, "corpus": corpus.num_rows, "duplicates": int((~keep).sum())}
