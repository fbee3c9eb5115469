"""NIfTI volumes (nibabel) as 2-D slices displayed the radiological way, or a :class:`Rejected`.

Orientation: the volume is first reordered to the closest canonical RAS+ (``nib.as_closest_canonical``:
axis 0 runs to the patient's right, 1 to anterior, 2 to superior), whatever its stored affine (LPS,
flipped, permuted axes), so one rule displays every file: of the two in-plane axes, the later one runs
down the rows reversed and the earlier one along the columns reversed. That gives axial (axis 2) with
anterior at the top and the patient's right on the image's left; coronal (axis 1) superior at the top,
right on the left; sagittal (axis 0) superior at the top, anterior on the left. ``slice`` in the
metadata is the index along ``axis`` in that canonical order.

A 4-D file (MSD's modalities, an fMRI series) gives the 3-D volume at ``channel`` of its 4th axis
(default 0; past the end: Rejected); more dimensions, or fewer than 3, are rejected. NIfTI has no
modality: ``intensity: auto`` means the percentile clip for any non-8-bit volume (a CT entry says
``ct_window``), applied per slice as read_dicom does per frame (readers._to_uint8).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from medisyn.ingest.readers import Rejected, _to_uint8, io_error


def _load(path: Path, what: str):
    import nibabel as nib

    if path.stat().st_size == 0:
        raise Rejected(f"empty {what} file (0 bytes)")
    try:
        return nib.load(path)
    except Exception as exc:
        if io_error(exc):
            raise
        raise Rejected(f"unreadable {what} ({type(exc).__name__})") from None


def _volume(img, channel: int, what: str, max_pixels: int):
    """A 3-D image (the 4th axis indexed), canonical RAS+, with its data loaded once."""
    import nibabel as nib

    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise Rejected(f"{what} is {len(shape)}-D, not a volume")
    if len(shape) > 4:
        raise Rejected(f"{what} is {len(shape)}-D (only 3-D and 4-D volumes are read)")
    if np.prod(shape[:3], dtype=np.int64) > max_pixels:
        raise Rejected(f"too many voxels ({int(np.prod(shape[:3])):,} > ingest.max_pixels {max_pixels:,})")
    dtype = img.get_data_dtype()
    if dtype.fields is not None or not (np.issubdtype(dtype, np.number) or dtype.kind == "b"):
        raise Rejected(f"unsupported voxel type in the {what}")
    try:
        if len(img.shape) > 3:
            if len(shape) == 4 and not 0 <= channel < shape[3]:
                raise Rejected(f"{what} has {shape[3]} volumes on its 4th axis; volume {channel} asked")
            index = (slice(None),) * 3 + (channel if len(shape) == 4 else 0,) + (0,) * (len(img.shape) - 4)
            img = img.slicer[index]
        img = nib.as_closest_canonical(img)
        data = np.asanyarray(img.dataobj)
    except Rejected:
        raise
    except Exception as exc:
        if io_error(exc):
            raise
        raise Rejected(f"unreadable {what} data ({type(exc).__name__})") from None
    return data, img.affine


def display(slab: np.ndarray) -> np.ndarray:
    """A canonical slice ``[a, b]`` (a before b in RAS+ order) as the radiologist sees it."""
    return slab.T[::-1, ::-1]


def read_volume(
    path: str | Path,
    *,
    axis: int = 2,
    every: int = 1,
    keep: tuple[float, float] = (0.0, 1.0),
    mask_path: str | Path | None = None,
    intensity: str = "auto",
    window: tuple[float, float] = (700, 100),
    pct: tuple[float, float] = (0.5, 99.5),
    max_pixels: int = 100_000_000,
    channel: int = 0,
) -> Iterator[tuple[np.ndarray, dict]]:
    """Slices ``range(lo, hi, every)`` along ``axis`` with ``lo, hi = round(keep × n)``; with a mask
    volume (same grid) only those where the mask has a voxel > 0. meta: ``{"slice": k, "slices": n,
    "left_out": m}``, m the slices the mask rule dropped. No slice left: Rejected."""
    if axis not in (0, 1, 2) or every < 1 or not 0.0 <= keep[0] < keep[1] <= 1.0:
        raise ValueError(f"read_volume: axis {axis}, every {every}, keep {keep} out of range")
    data, affine = _volume(_load(Path(path), "volume"), channel, "volume", max_pixels)
    n = data.shape[axis]
    plane = [s for i, s in enumerate(data.shape) if i != axis]
    if min(plane) < 8:
        raise Rejected(f"image too small ({plane[1]}x{plane[0]})")
    wanted = list(range(int(round(keep[0] * n)), int(round(keep[1] * n)), every))
    if not wanted:
        raise Rejected(f"no slice in the kept range of {n}")
    left_out = 0
    if mask_path is not None:
        mask, mask_affine = _volume(_load(Path(mask_path), "mask"), 0, "mask", max_pixels)
        if mask.shape != data.shape:
            raise Rejected(f"mask shape {mask.shape} differs from the volume's {data.shape}")
        if not np.allclose(mask_affine, affine, atol=0.1, rtol=1e-3):
            raise Rejected("mask not aligned with the volume (affines differ)")
        other = tuple(i for i in range(3) if i != axis)
        inside = set(np.flatnonzero(np.any(mask > 0, axis=other)).tolist())
        kept = [k for k in wanted if k in inside]
        left_out = len(wanted) - len(kept)
        wanted = kept
        if not wanted:
            raise Rejected("no kept slice has a mask voxel")
    for k in wanted:
        slab = display(np.take(data, k, axis=axis))
        if slab.dtype.kind == "f" and not np.isfinite(slab).all():
            slab = np.nan_to_num(slab, nan=0.0, posinf=0.0, neginf=0.0)
        pixels = _to_uint8(np.asarray(slab), intensity, ct=False, window=window, pct=pct)
        yield np.ascontiguousarray(pixels), {"slice": k, "slices": n, "left_out": left_out}
