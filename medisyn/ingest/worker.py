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
from collections import Counter
from pathlib import PurePosixPath

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image

from medisyn import storage
from medisyn.images import encode_image
from medisyn.ingest.readers import Rejected, _to_uint8, io_error, iter_wsi_patches, read_dicom, read_image
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
def _source(item: Item, path: str = ""):
    """A local path with the bytes of the item's file (or of ``path``, its mask or outlines) for the block: a
    local file as it is, an object (``s3://``) downloaded to node-local disk for this file only. Missing,
    unmounted, no permission, an object-store error: :class:`SourceUnreadable` here, before any reader, so no
    such file is a reject."""
    path = path or item.path
    with contextlib.ExitStack() as stack:
        try:
            local = stack.enter_context(storage.local_file(path, PurePosixPath(path).suffix))
            with open(local, "rb"):
                pass
        except Exception as exc:
            raise _unreadable(item, exc) from None
        yield local


def _pixels(arr: np.ndarray, s: UnitSettings) -> np.ndarray:
    """An array read from a container (a .mat image, an HDF5 row) as uint8 grey or RGB, by the unit's
    intensity rule (MRI: the paper's percentile clip)."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2 and (arr.dtype != np.uint8 or s.intensity in ("percentile", "minmax")):
        return _to_uint8(arr, s.intensity, ct=False, window=s.window, pct=s.pct, clip=True)
    if arr.ndim == 3 and arr.dtype != np.uint8:
        return _to_uint8(arr, "minmax", ct=False, window=s.window, pct=s.pct)
    if arr.ndim not in (2, 3):
        raise Rejected(f"not an image array ({arr.ndim} dimensions)")
    return np.ascontiguousarray(arr)


def _wsi_level(path, s: UnitSettings) -> int:
    """``wsi_level``, or with ``wsi_magnification`` the slide's level at that magnification (a slide that
    states neither objective power nor resolution, or has no such level: a reject)."""
    if s.wsi_magnification <= 0:
        return s.wsi_level
    from medisyn.ingest.lesions import level_for_magnification

    return level_for_magnification(path, s.wsi_magnification)


def _slide(item: Item, s: UnitSettings, path, left: Counter):
    """A slide's patches; with lesion outlines each tissue patch is captioned by its tumour fraction
    (``item.alternatives``), in-between and capped patches are counted in ``left`` and not read."""
    from medisyn.ingest.lesions import iter_labelled_patches, read_asap, read_tumour_mask, slide_dimensions

    lesions = None
    if item.annotation:
        with _source(item, item.annotation) as local:
            lesions = read_tumour_mask(local, slide_dimensions(path)) if s.lesion_masks else read_asap(local)
    captions = {cls: (labels, text) for cls, labels, text in item.alternatives}
    patches = iter_labelled_patches(
        path,
        lesions,
        level=_wsi_level(path, s),
        patch=s.wsi_patch_size,
        overlap=s.wsi_overlap,
        min_tissue=s.wsi_tissue_fraction,
        tumour_min=s.tumour_min,
        normal_max=s.normal_max,
        slide_positive=bool(item.alternatives),
        per_slide=s.per_slide,
        seed=s.seed,
    )
    for arr, meta in patches:
        suffix = f"#level={meta['level']},x={meta['x']},y={meta['y']}"
        if arr is None and "left_out" in meta:
            left[f"lesions: {meta['left_out']}"] += 1
            continue
        yield item, arr, suffix, captions.get(meta.get("label"))


def _images(item: Item, s: UnitSettings, path: str | os.PathLike | None = None, left: Counter | None = None):
    """(uint8 image, ref suffix) for every image of one source file (read from ``path``, by default
    ``item.path``); background patches as None. ``left`` counts what a reader's rule leaves out."""
    path = item.path if path is None else path
    left = Counter() if left is None else left
    if s.kind == "dicom":
        frames = read_dicom(
            path,
            frames=s.frames,
            intensity=s.intensity,
            window=s.window,
            pct=s.pct,
            max_pixels=s.max_pixels,
            caption=item.caption,
        )
        for arr, meta in frames:
            yield arr, (f"#frame={meta['frame']}" if meta["frames"] > 1 else "")
    elif s.kind == "image":
        arr, _ = read_image(path, intensity=s.intensity, pct=s.pct, max_pixels=s.max_pixels)
        yield arr, ""
    elif s.kind == "mat":
        from medisyn.ingest.arrays import read_mat

        arr, _ = read_mat(path, s.mat_image, {}, s.mat_transpose, max_pixels=s.max_pixels)
        yield _pixels(arr, s), ""
    elif s.kind == "nifti":
        yield from _volume(item, s, path, left)
    else:
        for arr, meta in iter_wsi_patches(
            path,
            level=_wsi_level(path, s),
            patch=s.wsi_patch_size,
            overlap=s.wsi_overlap,
            min_tissue=s.wsi_tissue_fraction,
        ):
            yield arr, f"#level={meta['level']},x={meta['x']},y={meta['y']}"


def _volume(item: Item, s: UnitSettings, path, left: Counter):
    from medisyn.ingest.volumes import read_volume

    with contextlib.ExitStack() as stack:
        mask = stack.enter_context(_source(item, item.annotation)) if item.annotation else None
        first = True
        for arr, meta in read_volume(
            path,
            axis=s.volume_axis,
            every=s.volume_every,
            keep=s.volume_keep,
            channel=s.volume_channel,
            mask_path=mask,
            intensity=s.intensity,
            window=s.window,
            pct=s.pct,
            max_pixels=s.max_pixels,
        ):
            if first and meta["left_out"]:
                left["volume.mask: slice without a mask voxel"] += meta["left_out"]
            first = False
            yield arr, f"#slice={meta['slice']}"


def _elements(group: list[Item], s: UnitSettings, path):
    """(item, image or Rejected) for the elements of one file: a video's frames in one sequential decode,
    an HDF5 file's rows in contiguous reads."""
    by_index = {it.index: it for it in group}
    if s.kind == "video":
        from medisyn.ingest.video import read_frames

        found = read_frames(path, sorted(by_index), s.video_fps)
    else:
        from medisyn.ingest.arrays import read_hdf5_rows

        found = read_hdf5_rows(path, s.hdf5_dataset, sorted(by_index))
    for index, arr in found:
        if not isinstance(arr, Rejected):
            try:
                arr = _pixels(arr, s)
            except Rejected as exc:
                arr = exc
        yield by_index[index], arr


def _file_images(group: list[Item], s: UnitSettings, path, left: Counter):
    """(item, image | None | Rejected, ref suffix, (labels, caption) or None) for one source file."""
    if group[0].index >= 0:
        for item, arr in _elements(group, s, path):
            yield item, arr, "", None
    elif s.kind == "wsi" and (group[0].annotation or group[0].alternatives or s.per_slide or s.lesions):
        yield from _slide(group[0], s, path, left)
    else:
        for arr, suffix in _images(group[0], s, path, left):
            yield group[0], arr, suffix, None


def _row(item: Item, s: UnitSettings, arr: np.ndarray, suffix: str, caption=None) -> dict:
    labels, text = caption if caption is not None else (item.labels, item.caption)
    square, info = resize_center_crop_info(arr, s.size)
    pil = Image.fromarray(square)
    thumb = pil.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX)
    return {
        "id": hashlib.sha256(square.tobytes() + str(square.shape).encode()).hexdigest()[:32],
        "image": encode_image(pil, s.image_format, s.png_compress_level),
        "caption": text,
        "specialty": s.specialty,
        "image_type": s.image_type,
        "labels": list(labels),
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
    left: Counter = Counter()
    groups: dict[str, list[Item]] = {}  # a video's (an HDF5 file's) elements: one read per file
    for item in unit.items:
        groups.setdefault(item.path if item.index >= 0 else item.ref, []).append(item)

    def reject(item: Item, suffix: str, stage: str, reason: str) -> None:
        rejects.append({"source_ref": item.ref + suffix, "series": item.series, "stage": stage, "reason": reason})

    with storage.parquet_writer(out / f"{uid}.parquet", STAGING_SCHEMA) as writer:
        for group in groups.values():
            done: set[str] = set()
            with _source(group[0]) as local:
                try:
                    for item, arr, suffix, caption in _file_images(group, s, local, left):
                        done.add(item.ref)
                        if isinstance(arr, Rejected):
                            reject(item, suffix, "read", arr.reason)
                            continue
                        if arr is None:
                            counts["background"] += 1
                            continue
                        try:
                            buffer.append(_row(item, s, arr, suffix, caption))
                            counts["accepted"] += 1
                        except Exception as exc:  # one bad frame or patch: reject it, keep the rest
                            reject(item, suffix, "transform", f"transform failed ({type(exc).__name__})")
                        if len(buffer) >= s.row_group_rows:
                            writer.write_table(pa.Table.from_pylist(buffer, STAGING_SCHEMA))
                            buffer = []
                except Exception as exc:
                    if not isinstance(exc, Rejected) and io_error(exc):  # the file system failed mid-read
                        raise _unreadable(group[0], exc) from None
                    why = exc.reason if isinstance(exc, Rejected) else f"unexpected read error ({type(exc).__name__})"
                    for item in group:  # a whole file (a video, an HDF5 file): each element not yet read
                        if item.ref not in done or item.index < 0:
                            reject(item, "", "read", why)
        if buffer:
            writer.write_table(pa.Table.from_pylist(buffer, STAGING_SCHEMA))
    counts["left_out"] = dict(sorted(left.items()))
    counts["rejected"] = len(rejects)
    counts["seconds"] = time.perf_counter() - started
    atomic_write_table(pa.Table.from_pylist(rejects, REJECT_SCHEMA), out / f"{uid}.rejects.parquet")
    atomic_write_text(json.dumps(counts), out / f"{uid}.json")
    return counts
