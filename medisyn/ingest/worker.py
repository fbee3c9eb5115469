"""The per-task work of ingest: a unit of files in, one staging shard out (compacted by ingest.compact).

Tasks receive typed units (:mod:`medisyn.ingest.units`) built on the driver. Every output file
is written through :mod:`medisyn.storage` (a temporary name, then renamed), so a killed task
leaves nothing half-written, on a local disk or an object store; the ``.json`` marker is
written last. Shards are written and read a row group at a time, so a task's memory is
bounded by ``ingest.row_group_rows``, not by the size of a slide. Content errors are caught
per file (never per block), so one bad file costs one reject row, not its neighbours. A file
that cannot be fetched or opened at all (missing, an unmounted repository, an I/O or
object-store error) fails the whole unit instead (:class:`SourceUnreadable`): no marker is
written, so a rerun reads its files again rather than keeping them as rejects.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import time
from pathlib import PurePosixPath

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from medisyn import storage
from medisyn.images import encode_image
from medisyn.ingest.readers import Rejected, io_error, iter_wsi_patches, read_dicom, read_image
from medisyn.ingest.transforms import resize_center_crop_info
from medisyn.ingest.units import Item, Unit, UnitSettings
from medisyn.records import CORPUS_SCHEMA, REJECT_SCHEMA, atomic_write_table, atomic_write_text

# staging = corpus columns + what dedup needs (perceptual hash, grey thumbnail)
STAGING_SCHEMA = CORPUS_SCHEMA.append(pa.field("phash", pa.string())).append(pa.field("thumb", pa.binary()))
THUMB = 32  # side of the grey thumbnail that confirms a near duplicate


class SourceUnreadable(RuntimeError):
    """A source file that could not be fetched or opened: its unit fails and writes no marker. The
    message names the repository, the file's ``source_ref`` and the node, never a path."""


def _unreadable(item: Item, exc: BaseException) -> SourceUnreadable:
    code = errno.errorcode.get(exc.errno, "") if isinstance(exc, OSError) and exc.errno else ""
    return SourceUnreadable(
        f"repository {item.repo!r}: source {item.ref} could not be read on node {os.uname().nodename} "
        f"({type(exc).__name__}{' ' + code if code else ''}); its unit wrote nothing and is read again by the next "
        "run. Is the repository mounted, or its bucket readable, on every node?"
    )


@contextlib.contextmanager
def _source(item: Item):
    """A local path with the bytes of the item's file for the block: a local file as it is, an object
    (``s3://``) downloaded to node-local disk for this file only. Missing, unmounted, no permission, an
    object-store error: :class:`SourceUnreadable` here, before any reader, so no such file is a reject."""
    with contextlib.ExitStack() as stack:
        try:
            local = stack.enter_context(storage.local_file(item.path, PurePosixPath(item.path).suffix))
            with open(local, "rb"):
                pass
        except Exception as exc:
            raise _unreadable(item, exc) from None
        yield local


def _images(item: Item, s: UnitSettings, path: str | os.PathLike | None = None):
    """(uint8 image, ref suffix) for every image of one source file (read from ``path``, by default
    ``item.path``); background patches as None."""
    path = item.path if path is None else path
    if s.kind == "dicom":
        frames = read_dicom(
            path, frames=s.frames, intensity=s.intensity, window=s.window, pct=s.pct, max_pixels=s.max_pixels
        )
        for arr, meta in frames:
            yield arr, (f"#frame={meta['frame']}" if meta["frames"] > 1 else "")
    elif s.kind == "image":
        arr, _ = read_image(path, intensity=s.intensity, pct=s.pct, max_pixels=s.max_pixels)
        yield arr, ""
    else:
        for arr, meta in iter_wsi_patches(
            path,
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
            with _source(item) as local:
                try:
                    for arr, suffix in _images(item, s, local):
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
                    if io_error(exc):  # the file system failed mid-read (EIO, a stale NFS handle): not the file
                        raise _unreadable(item, exc) from None
                    reason = f"unexpected read error ({type(exc).__name__})"
                    rejects.append({"source_ref": item.ref, "stage": "read", "reason": reason})
        if buffer:
            writer.write_table(pa.Table.from_pylist(buffer, STAGING_SCHEMA))
    counts["rejected"] = len(rejects)
    counts["seconds"] = time.perf_counter() - started
    atomic_write_table(pa.Table.from_pylist(rejects, REJECT_SCHEMA), out / f"{uid}.rejects.parquet")
    atomic_write_text(json.dumps(counts), out / f"{uid}.json")
    return counts
