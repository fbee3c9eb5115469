"""Readers of arrays inside containers: MATLAB files (one image and its fields each) and HDF5 row arrays.

MATLAB v7.3 files are HDF5 (h5py); v5/v7 files (a 128-byte ``MATLAB 5.0 MAT-file`` header) are read
by ``scipy.io.loadmat`` with the same field paths (``cjdata/label``), so a repository saved in the old
format is read, not rejected. HDF5 stores MATLAB arrays column-major: with ``transpose`` (default) an
array's axes are reversed, which gives the image MATLAB's ``imshow`` shows; loadmat already returns
MATLAB's orientation, so ``transpose`` concerns HDF5 storage only. A plain HDF5 file (no MATLAB
header) holding the named datasets is read as v7.3 too. Reasons are fixed phrases and the field
paths of the description: never a path, a field's value or an exception text.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from medisyn.ingest.readers import Rejected, io_error

_V5_MAGIC = b"MATLAB 5.0 MAT-file"
_ROW_BYTES = 16 << 20  # one h5py read of contiguous rows moves at most this much (PCam: ~600 rows)


def _kind(path: Path) -> str:
    """``v73`` (HDF5), ``v5`` (MATLAB 5.0 header: v5, v6 and v7) or a Rejected."""
    import h5py

    if path.stat().st_size == 0:
        raise Rejected("empty file (0 bytes)")
    with open(path, "rb") as fh:
        head = fh.read(128)
    if h5py.is_hdf5(str(path)):
        return "v73"
    if head.startswith(_V5_MAGIC) and len(head) == 128 and head[126:128] in (b"IM", b"MI"):
        return "v5"
    raise Rejected("not a MATLAB file")


def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as exc:
        if io_error(exc):
            raise
        raise Rejected(f"unreadable HDF5 file ({type(exc).__name__})") from None


def _text(arr: np.ndarray) -> str:
    return "".join(map(chr, np.asarray(arr).ravel().tolist())).rstrip("\x00")


def _number(value, field: str) -> str:
    arr = np.asarray(value)
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype.kind == "b"):
        raise Rejected(f"field {field} is not a number or text")
    v = arr.ravel()[0].item()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _h5_node(fh, field: str):
    try:
        node = fh[field]
    except (KeyError, ValueError):
        raise Rejected(f"no field {field} in the MATLAB file") from None
    if not hasattr(node, "dtype"):
        raise Rejected(f"field {field} is not an array")
    return node


def _h5_field(fh, field: str) -> str:
    node = _h5_node(fh, field)
    cls = node.attrs.get("MATLAB_class", b"")
    cls = cls.decode() if isinstance(cls, bytes) else str(cls)
    if node.attrs.get("MATLAB_empty", 0):
        return ""
    if cls == "char" or (not cls and node.dtype == np.uint16):
        # MATLAB char arrays are UTF-16 code units stored column-major: (N, 1) for a row of text
        return _text(node[()].T)
    return _number(node[()], field)


def _v5_vars(path: Path, names: set[str]) -> dict:
    from scipy.io import loadmat

    try:
        return loadmat(path, variable_names=sorted(names), simplify_cells=True)
    except Exception as exc:
        if io_error(exc):
            raise
        raise Rejected(f"unreadable MATLAB v5 file ({type(exc).__name__})") from None


def _v5_get(data: dict, field: str):
    node = data
    for part in field.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise Rejected(f"no field {field} in the MATLAB file")
        node = node[part]
    return node


def _v5_field(data: dict, field: str) -> str:
    value = _v5_get(data, field)
    if isinstance(value, str):
        return value
    arr = np.asarray(value)
    if arr.dtype.kind == "U":
        return "".join(arr.ravel().tolist())
    if arr.size == 0:
        return ""
    return _number(arr, field)


def mat_fields(path: str | Path, fields: Mapping[str, str]) -> dict[str, str]:
    """The named fields of a MATLAB file as text (``{"label": "1", "pid": "100360"}``), no image read:
    for listing. A numeric scalar gives its shortest form (1.0 -> "1"); a char array its text."""
    path = Path(path)
    if _kind(path) == "v5":
        data = _v5_vars(path, {f.split("/")[0] for f in fields.values()})
        return {name: _v5_field(data, f) for name, f in fields.items()}
    with _open_h5(path) as fh:
        return {name: _h5_field(fh, f) for name, f in fields.items()}


def _check_image(arr_shape: tuple[int, ...], dtype: np.dtype, image: str, max_pixels: int) -> None:
    if len(arr_shape) not in (2, 3) or (len(arr_shape) == 3 and arr_shape[2] != 3):
        raise Rejected(f"field {image} is not a 2-D image (shape {tuple(arr_shape)})")
    if not (np.issubdtype(dtype, np.number) or dtype.kind == "b") or dtype.kind == "c":
        raise Rejected(f"field {image} is not a numeric image")
    pixels = int(np.prod(arr_shape))
    if pixels > max_pixels:
        raise Rejected(f"too many pixels ({pixels:,} > ingest.max_pixels {max_pixels:,})")


def read_mat(
    path: str | Path,
    image: str,
    fields: Mapping[str, str],
    transpose: bool = True,
    *,
    max_pixels: int = 100_000_000,
) -> tuple[np.ndarray, dict[str, str]]:
    """The image at ``image`` (its stored dtype, HxW or HxWx3, MATLAB's orientation) and the fields.

    Intensity is the caller's (the paper clips MRI at the 0.5/99.5 percentiles: readers._to_uint8).
    """
    path = Path(path)
    if _kind(path) == "v5":
        data = _v5_vars(path, {f.split("/")[0] for f in [image, *fields.values()]})
        arr = np.asarray(_v5_get(data, image))
        _check_image(arr.shape, arr.dtype, image, max_pixels)
        return np.ascontiguousarray(arr), {name: _v5_field(data, f) for name, f in fields.items()}
    with _open_h5(path) as fh:
        node = _h5_node(fh, image)
        _check_image(node.shape if not transpose else node.shape[::-1], node.dtype, image, max_pixels)
        try:
            arr = node[()]
        except OSError as exc:
            if io_error(exc):
                raise
            raise Rejected(f"unreadable image data ({type(exc).__name__})") from None
        values = {name: _h5_field(fh, f) for name, f in fields.items()}
    if transpose:
        arr = arr.T  # all axes reversed: (W, H) -> (H, W); (3, W, H) -> (H, W, 3)
    if min(arr.shape[:2]) < 8:
        raise Rejected(f"image too small ({arr.shape[0]}x{arr.shape[1]})")
    return np.ascontiguousarray(arr), values


# ----------------------------------------------------------------------------- HDF5 row arrays


def _dataset(fh, dataset: str):
    try:
        node = fh[dataset]
    except (KeyError, ValueError):
        raise Rejected(f"no dataset {dataset} in the HDF5 file") from None
    if not hasattr(node, "dtype") or not node.shape:
        raise Rejected(f"{dataset} is not an array of rows")
    return node


def _open_rows(path: Path):
    import h5py

    if path.stat().st_size == 0:
        raise Rejected("empty file (0 bytes)")
    if not h5py.is_hdf5(str(path)):
        raise Rejected("not an HDF5 file")
    return _open_h5(path)


def hdf5_rows(path: str | Path, dataset: str) -> int:
    """Rows (the first dimension) of ``dataset``, from its metadata only: for listing."""
    with _open_rows(Path(path)) as fh:
        return int(_dataset(fh, dataset).shape[0])


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted unique rows as half-open runs of consecutive indices."""
    runs: list[tuple[int, int]] = []
    for r in sorted(set(int(r) for r in rows)):
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def read_hdf5_rows(path: str | Path, dataset: str, rows: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """``(row, array)`` for each wanted row, in increasing order, each run of consecutive rows read as
    slices of at most 16 MiB (one h5py call per slice, never one per row). A row past the end: Rejected."""
    path = Path(path)
    with _open_rows(path) as fh:
        node = _dataset(fh, dataset)
        n = node.shape[0]
        row_bytes = max(1, int(np.prod(node.shape[1:], dtype=np.int64)) * node.dtype.itemsize)
        step = max(1, _ROW_BYTES // row_bytes)
        for start, stop in _runs(rows):
            if start < 0 or stop > n:
                raise Rejected(f"row {stop - 1 if stop > n else start} outside the dataset's {n} rows")
            for lo in range(start, stop, step):
                hi = min(stop, lo + step)
                try:
                    block = node[lo:hi]
                except OSError as exc:
                    if io_error(exc):
                        raise
                    raise Rejected(f"unreadable rows ({type(exc).__name__})") from None
                for i in range(hi - lo):
                    yield lo + i, block[i]


# ----------------------------------------------------------------------------- writers (replicas, tests)
