"""Readers: a source file in, ``(uint8 pixels, metadata)`` out, or a :class:`Rejected` with a reason.

Every failure a real repository throws at us (truncated, empty, not DICOM, no pixel data, a
transfer syntax without a decoder, a slide OpenSlide cannot open) becomes ``Rejected`` with
a fixed, human reason. An error of the file system rather than of the file (missing, no
permission, an I/O error: an ``OSError`` with an ``errno``) is raised as it is: the worker
fails its unit on it instead of rejecting a file that may be fine. Reasons and metadata are
built by this module only — never from a header value or an exception text that could carry
a path or a patient's name — because they end up in the rejects table and in logs.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medisyn.ingest.identifiers import caption_holds_name
from medisyn.ingest.transforms import minmax_uint8, percentile_clip, window_ct


class Rejected(Exception):
    """A file (or frame) that cannot become a training image, with the reason why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def io_error(exc: BaseException) -> bool:
    """True for an error of the file system (``errno`` set: ENOENT, EACCES, EIO, ESTALE), which
    says nothing about the file's content; decoders raise ``OSError`` without one for bad bytes."""
    return isinstance(exc, OSError) and exc.errno is not None


def _check_size(path: Path) -> None:
    if path.stat().st_size == 0:
        raise Rejected("empty file (0 bytes)")


def _to_uint8(
    arr: np.ndarray,
    policy: str,
    *,
    ct: bool,
    window: tuple[float, float],
    pct: tuple[float, float],
    clip: bool = False,
) -> np.ndarray:
    """``auto``: CT window for CT; percentile clip for MR and mammography (``clip``, 8-bit too) and
    for any other grey image above 8 bits; other 8-bit images as they are."""
    if policy == "auto":
        policy = "ct_window" if ct else ("none" if arr.dtype == np.uint8 and not clip else "percentile")
    if policy == "ct_window":
        return window_ct(arr, width=window[0], level=window[1])
    if policy == "percentile":
        return percentile_clip(arr, lo=pct[0], hi=pct[1])
    if policy == "minmax":
        return minmax_uint8(arr)
    if arr.dtype != np.uint8:
        return minmax_uint8(arr)
    return arr


# ----------------------------------------------------------------------------- DICOM


def _read_dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_size(path)
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no preamble/file meta: common in old archives; accept only if it really is an image
    except Exception as exc:
        if io_error(exc):
            raise
        raise Rejected(f"corrupt DICOM header ({type(exc).__name__})") from None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        if io_error(exc):
            raise
        raise Rejected("not DICOM") from None
    if not any(tag in ds for tag in ("SOPClassUID", "Modality", "StudyInstanceUID", "PixelData")):
        raise Rejected("not DICOM")
    if "PixelData" not in ds:
        raise Rejected("no pixel data")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian
            if implicit
            else pydicom.uid.ExplicitVRLittleEndian
            if little
            else pydicom.uid.ExplicitVRBigEndian
        )
    return ds


def _decode(ds) -> np.ndarray:
    from pydicom.uid import UID

    ts = UID(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        if ts.is_compressed:
            raise Rejected(f"undecodable transfer syntax {ts.name} ({type(exc).__name__})") from None
        raise Rejected(f"corrupt pixel data ({type(exc).__name__})") from None
    except ValueError as exc:
        if "less than expected" in str(exc) or "truncat" in str(exc).lower():
            raise Rejected("truncated pixel data") from None
        raise Rejected(f"corrupt pixel data ({type(exc).__name__})") from None
    except AttributeError as exc:
        raise Rejected(f"incomplete image attributes ({type(exc).__name__})") from None
    except Exception as exc:
        raise Rejected(f"corrupt pixel data ({type(exc).__name__})") from None


def read_dicom(
    path: str | Path,
    *,
    frames: str = "all",
    intensity: str = "auto",
    window: tuple[float, float] = (700, 100),
    pct: tuple[float, float] = (0.5, 99.5),
    max_pixels: int = 100_000_000,
    caption: str = "",
) -> list[tuple[np.ndarray, dict]]:
    """All selected frames of a DICOM file as uint8 HxW (grey) or HxWx3 (colour) arrays.

    CT: stored values → Hounsfield units (modality LUT: RescaleSlope/Intercept) → window.
    MR, mammography and other >8-bit grey: percentile clip. MONOCHROME1 is inverted after
    scaling so that bright always means dense. Metadata holds only the frame index. A file whose
    PatientName or ReferringPhysicianName has a token (>= 3 letters) that is a word of ``caption`` (the
    item's) is a reject, named by the rule only: the caption would tie a person's name to the image.
    """
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    ds = _read_dataset(path)
    if caption and caption_holds_name(ds, caption):
        raise Rejected("caption holds a DICOM name token")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise Rejected("no pixel data")
    try:  # from the header, before a decode that could need gigabytes (a deflated file can be tiny)
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise Rejected("incomplete image attributes (no Rows or Columns)") from None
    if pixels > max_pixels:
        raise Rejected(f"too many pixels ({pixels:,} > ingest.max_pixels {max_pixels:,})")
    arr = _decode(ds)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    colour = arr.ndim == (4 if n_frames > 1 else 3)
    if n_frames == 1:
        arr = arr[None]
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr, colour = apply_color_lut(arr, ds), True
        arr = (arr >> 8).astype(np.uint8) if arr.dtype != np.uint8 else arr
    index = {"all": range(n_frames), "first": [0], "middle": [n_frames // 2]}[frames]
    modality = str(ds.get("Modality", "")).upper()
    ct, clip = modality == "CT", modality in ("MR", "MG")  # MR, mammography: clipped even when stored in 8 bits
    out = []
    for i in index:
        frame = arr[i]
        if colour:
            if frame.dtype != np.uint8:
                frame = minmax_uint8(frame)
        else:
            values = apply_modality_lut(frame, ds) if ("RescaleSlope" in ds or "ModalityLUTSequence" in ds) else frame
            frame = _to_uint8(np.asarray(values), intensity, ct=ct, window=window, pct=pct, clip=clip)
            if photometric == "MONOCHROME1":
                frame = 255 - frame
        if frame.size == 0 or min(frame.shape[:2]) < 8:
            raise Rejected(f"image too small ({frame.shape[0]}x{frame.shape[1]})")
        out.append((np.ascontiguousarray(frame), {"frame": i, "frames": n_frames}))
    return out


# ----------------------------------------------------------------------------- PNG / JPEG / TIFF


def read_image(
    path: str | Path, *, intensity: str = "auto", pct: tuple[float, float] = (0.5, 99.5), max_pixels: int = 100_000_000
) -> tuple[np.ndarray, dict]:
    """8- or 16-bit, grey or RGB(A)/palette photographs and scans, as uint8 grey or RGB.

    ``percentile``/``minmax`` rescale grey images of any depth (MRI and mammography repositories
    default to ``percentile``); a grey scan saved as RGB (common for MRI JPEGs) is rescaled as grey.
    """
    path = Path(path)
    _check_size(path)
    try:
        with Image.open(path) as im:  # lazy: the size is known before any pixel is decoded
            if im.width * im.height * getattr(im, "n_frames", 1) > max_pixels:
                raise Rejected(f"too many pixels ({im.width * im.height:,} > ingest.max_pixels {max_pixels:,})")
            im.load()
            mode = im.mode
            if mode in ("RGB", "L"):
                arr = np.asarray(im)
            elif mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im).astype(np.float64 if mode == "F" else np.int64)
            elif mode in ("1", "P", "LA", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                arr = np.asarray(im.convert("L" if mode in ("1", "LA") else "RGB"))
            else:
                raise Rejected(f"unsupported pixel mode {mode}")
    except Rejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if io_error(exc):
            raise
        raise Rejected(f"unreadable or truncated image ({type(exc).__name__})") from None
    if arr.ndim == 3 and intensity in ("percentile", "minmax") and _grey_as_rgb(arr):
        arr = arr.mean(axis=2, dtype=np.float32)  # channels equal up to JPEG rounding: one grey image
    if arr.ndim == 2 and (arr.dtype != np.uint8 or intensity in ("percentile", "minmax")):
        arr = _to_uint8(arr, intensity, ct=False, window=(700, 100), pct=pct)
    if min(arr.shape[:2]) < 8:
        raise Rejected(f"image too small ({arr.shape[0]}x{arr.shape[1]})")
    return np.ascontiguousarray(arr), {}


def _grey_as_rgb(arr: np.ndarray, tolerance: int = 2) -> bool:
    """True when an RGB image's channels agree within ``tolerance`` everywhere (grey content)."""
    a = arr.astype(np.int16)
    return bool(np.abs(a[..., 1:] - a[..., :1]).max() <= tolerance)


# ----------------------------------------------------------------------------- whole-slide images


def tissue_mask(thumbnail: Image.Image, saturation: int = 20, brightness: int = 235) -> np.ndarray:
    """True where the thumbnail shows stained tissue: coloured (HSV saturation) and not white glass."""
    hsv = np.asarray(thumbnail.convert("RGB").convert("HSV"))
    grey = np.asarray(thumbnail.convert("L"))
    return (hsv[..., 1] > saturation) & (grey < brightness)


def iter_wsi_patches(
    path: str | Path,
    *,
    level: int = 0,
    patch: int = 512,
    overlap: float = 0.0,
    min_tissue: float = 0.5,
    want: Callable[[dict], bool] | None = None,
) -> Iterator[tuple[np.ndarray | None, dict]]:
    """Grid patches of one slide at ``level``: ``(rgb, meta)`` for tissue, ``(None, meta)`` for background.

    The stride is ``patch × (1 − overlap)``, so neighbours share at most ``overlap`` of a
    side (the paper: ≤ 10%). Each slide is opened in the calling task only: an OpenSlide
    handle that hit an error stays broken, so one bad slide must not be shared. ``meta`` also
    gives the patch's level-0 box (``x0``, ``y0``, ``size0``), where lesion outlines live; a
    tissue patch for which ``want(meta)`` is False comes as ``(None, meta)`` without reading
    its pixels (patches the lesion labels leave out or a cap drops cost no I/O).
    """
    import openslide

    path = Path(path)
    _check_size(path)
    with open_slide(path) as slide:
        yield from _patches(slide, openslide.OpenSlideError, level, patch, overlap, min_tissue, want)


@contextlib.contextmanager
def open_slide(path: str | Path):
    """An OpenSlide handle, closed after the block; a file OpenSlide cannot open is a reject, an I/O
    error of the file system is raised as it is."""
    import openslide

    try:
        slide = openslide.OpenSlide(str(path))
    except (openslide.OpenSlideError, openslide.OpenSlideUnsupportedFormatError, OSError) as exc:
        if io_error(exc):
            raise
        raise Rejected(f"unreadable slide ({type(exc).__name__})") from None
    try:
        yield slide
    finally:
        slide.close()


def _patches(slide, slide_error, level, patch, overlap, min_tissue, want):
    try:
        level = min(level, slide.level_count - 1)
        width, height = slide.level_dimensions[level]
        down = slide.level_downsamples[level]
        stride = max(1, int(round(patch * (1.0 - overlap))))
        if width < patch or height < patch:
            raise Rejected(f"slide smaller than one {patch}px patch at level {level}")
        thumb_scale = max(width, height) / 1024.0
        thumb = slide.get_thumbnail((max(1, int(width / thumb_scale)), max(1, int(height / thumb_scale))))
        mask = tissue_mask(thumb)
        sy, sx = mask.shape[0] / height, mask.shape[1] / width
        for y in range(0, height - patch + 1, stride):
            for x in range(0, width - patch + 1, stride):
                x0, y0 = int(x * down), int(y * down)
                meta = {"level": level, "x": x, "y": y, "size": patch, "x0": x0, "y0": y0, "size0": patch * down}
                m = mask[
                    int(y * sy) : max(int(y * sy) + 1, int((y + patch) * sy)),
                    int(x * sx) : max(int(x * sx) + 1, int((x + patch) * sx)),
                ]
                if m.mean() < min_tissue or (want is not None and not want(meta)):
                    yield None, meta
                    continue
                region = slide.read_region((x0, y0), level, (patch, patch))
                rgb = Image.new("RGB", region.size, (255, 255, 255))
                rgb.paste(region, mask=region.getchannel("A"))
                yield np.asarray(rgb), meta
    except slide_error as exc:
        raise Rejected(f"unreadable slide region ({type(exc).__name__})") from None
