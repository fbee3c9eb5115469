"""Writers of the file formats the replicas ship (MP4/AVI, MATLAB v7.3/v5, ASAP XML, NIfTI).

The ingest readers' tests and the replicas (medisyn.phantoms.replicas) need the same writers; the
phantoms sit below ingest (tests/test_architecture.py), so the writers live here and ingest's tests
import them from here: the readers (medisyn.ingest.video, arrays, lesions, volumes) hold no writer.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = [
    "frame_number",
    "numbered_frame",
    "write_asap",
    "write_mat_v5",
    "write_mat_v73",
    "write_nifti",
    "write_test_video",
]


# ----------------------------------------------------------------------------- test videos

BIT_ROWS, BIT_COLS, GRID_ROWS = 2, 8, 6  # the index is written as 16 bits in the top 2 of 6 rows of 8 cells


def write_test_video(
    path: str | Path,
    frames: int,
    fps: float,
    size: tuple[int, int] = (64, 48),
    codec: str | None = None,
    gop: int = 12,
    seed: int = 0,
    bframes: int = 0,
    drop: Collection[int] = (),
) -> Path:
    """Encode ``frames`` frames whose pixels spell their own index (:func:`frame_number` reads it back).

    Each frame is a grid of 8 × 6 uniform cells: the top two rows hold the index in 16 bits
    (dark/bright cells that survive lossy coding), the rest a seeded colour pattern so two
    videos with different ``seed`` share no frame. ``size`` (width, height) should be a
    multiple of (64, 48) so cells align with the codec's 8-pixel blocks. ``codec`` defaults to
    libx264 (MP4/MKV) when FFmpeg has it, else mpeg4 (always for AVI); ``gop`` is the keyframe
    interval, so a seek into the middle lands on a keyframe before the wanted frame. Indices in
    ``drop`` are left out with their timestamps kept (a gap; MP4/MKV: AVI has no timestamps).
    """
    import av

    path = Path(path)
    if codec is None:
        codec = "libx264" if path.suffix.lower() != ".avi" and "libx264" in av.codecs_available else "mpeg4"
    width, height = size
    with av.open(str(path), "w") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        stream.codec_context.max_b_frames = bframes
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast", "bf": str(bframes), "keyint": str(gop)}
        else:
            stream.codec_context.bit_rate = 2_000_000  # ample for 64×48: cells stay within a few grey levels
        for i in range(frames):
            if i in drop:
                continue
            frame = av.VideoFrame.from_ndarray(numbered_frame(i, size, seed), format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def numbered_frame(index: int, size: tuple[int, int] = (64, 48), seed: int = 0) -> np.ndarray:
    """The RGB picture :func:`write_test_video` encodes as frame ``index``."""
    if not 0 <= index < 2 ** (BIT_ROWS * BIT_COLS):
        raise ValueError(f"a test frame index is 0..{2 ** (BIT_ROWS * BIT_COLS) - 1}")
    width, height = size
    rng = np.random.default_rng(seed)
    cells = rng.integers(48, 208, size=(GRID_ROWS, BIT_COLS, 3), dtype=np.uint8)
    bits = [(index >> (BIT_ROWS * BIT_COLS - 1 - b)) & 1 for b in range(BIT_ROWS * BIT_COLS)]
    cells[:BIT_ROWS] = (np.array(bits, np.uint8).reshape(BIT_ROWS, BIT_COLS, 1) * 192 + 32).repeat(3, axis=2)
    ys = np.arange(height) * GRID_ROWS // height
    xs = np.arange(width) * BIT_COLS // width
    return cells[ys[:, None], xs[None, :]]


# ----------------------------------------------------------------------------- MATLAB files


def frame_number(rgb: np.ndarray) -> int:
    """The index a decoded test frame spells (each bit cell's centre, thresholded at mid-grey)."""
    height, width = rgb.shape[:2]
    grey = rgb.astype(np.float32).mean(axis=2)
    index = 0
    for r in range(BIT_ROWS):
        for c in range(BIT_COLS):
            y0, y1 = r * height // GRID_ROWS, (r + 1) * height // GRID_ROWS
            x0, x1 = c * width // BIT_COLS, (c + 1) * width // BIT_COLS
            qy, qx = (y1 - y0) // 4, (x1 - x0) // 4
            index = (index << 1) | int(grey[y0 + qy : y1 - qy, x0 + qx : x1 - qx].mean() > 128)
    return index


def _matlab_header(version: str) -> bytes:
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(0))
    text = f"MATLAB {version} MAT-file, Platform: GLNXA64, Created on: {stamp} HDF5 schema 1.00 .".encode()
    return text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"


def write_mat_v73(path: str | Path, image: np.ndarray, label: int, pid: str, mask: np.ndarray | None = None) -> None:
    """A figshare-like MATLAB v7.3 file: HDF5 behind MATLAB's 512-byte header, struct ``cjdata`` with
    ``image`` (stored transposed, as MATLAB does), ``label`` (1,1) double, ``PID`` (N,1) uint16 char
    codes and ``tumorMask``/``tumorBorder`` when a mask is given."""
    import h5py

    def put(group, name: str, arr: np.ndarray, cls: str) -> None:
        ds = group.create_dataset(name, data=arr)
        ds.attrs["MATLAB_class"] = np.bytes_(cls)
        if cls == "char":
            ds.attrs["MATLAB_int_decode"] = np.int32(2)

    image = np.asarray(image)
    with h5py.File(path, "w", userblock_size=512) as fh:
        group = fh.create_group("cjdata")
        group.attrs["MATLAB_class"] = np.bytes_("struct")
        cls = {"float64": "double", "float32": "single", "bool": "logical"}.get(image.dtype.name, image.dtype.name)
        put(group, "image", np.ascontiguousarray(image.T), cls)
        put(group, "label", np.full((1, 1), float(label)), "double")
        put(group, "PID", np.array([[ord(c)] for c in pid], dtype=np.uint16), "char")
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            put(group, "tumorMask", np.ascontiguousarray(mask.T), "uint8")
            ys, xs = np.nonzero(mask)
            border = np.stack([xs[:8] + 1, ys[:8] + 1], axis=1).ravel().astype(np.float64)[None]
            put(group, "tumorBorder", border, "double")
    with open(path, "r+b") as fh:  # h5py leaves the user block zeroed: MATLAB's header goes there
        fh.write(_matlab_header("7.3"))


def write_mat_v5(path: str | Path, image: np.ndarray, label: int, pid: str, mask: np.ndarray | None = None) -> None:
    """The same struct in the old (v5) MATLAB format, through scipy.io.savemat."""
    from scipy.io import savemat

    cjdata = {"image": np.asarray(image), "label": np.full((1, 1), float(label)), "PID": pid}
    if mask is not None:
        cjdata["tumorMask"] = np.asarray(mask, dtype=np.uint8)
    savemat(path, {"cjdata": cjdata}, format="5")


# ----------------------------------------------------------------------------- ASAP XML

Polygon = Sequence[Sequence[float]]


def write_asap(path: str | Path, tumour_polygons: Iterable[Polygon], holes: Iterable[Polygon] = ()) -> None:
    """An ASAP XML file as CAMELYON16 ships it: tumour in group ``_0``, holes in ``_2``, level-0 floats."""
    root = ET.Element("ASAP_Annotations")
    annotations = ET.SubElement(root, "Annotations")
    colours = {"_0": "#F4FA58", "_2": "#64FE2E"}
    n = 0
    for group, polygons in (("_0", tumour_polygons), ("_2", holes)):
        for poly in polygons:
            a = ET.SubElement(
                annotations,
                "Annotation",
                Name=f"Annotation {n}",
                Type="Polygon",
                PartOfGroup=group,
                Color=colours[group],
            )
            coords = ET.SubElement(a, "Coordinates")
            for k, (x, y) in enumerate(poly):
                ET.SubElement(coords, "Coordinate", Order=str(k), X=repr(float(x)), Y=repr(float(y)))
            n += 1
    groups = ET.SubElement(root, "AnnotationGroups")
    for group, colour in colours.items():
        g = ET.SubElement(groups, "Group", Name=group, PartOfGroup="None", Color=colour)
        ET.SubElement(g, "Attributes")
    ET.indent(root)
    ET.ElementTree(root).write(Path(path), encoding="utf-8", xml_declaration=True)


# ----------------------------------------------------------------------------- NIfTI


def write_nifti(path: str | Path, volume: np.ndarray, affine: np.ndarray) -> None:
    """A NIfTI-1 file (``.nii`` or ``.nii.gz``) of ``volume`` on ``affine`` (qform and sform both set)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(volume), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(path))
