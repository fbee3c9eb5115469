"""Write DICOM files (explicit VR little endian, with file meta) carrying a
planted identifying header, so the ingest stage's de-identification is tested
against real PHI-bearing fields (all containing PLANTED_MARKER or the MRN)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from .common import PLANTED_INSTITUTION, PLANTED_PATIENT_NAME, GenContext

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
MAMMO_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


def patient_header(ctx: GenContext, p: int) -> dict:
    """Identifying attributes for patient `p` (deterministic from the seed)."""
    r = ctx.patient_rng(p)
    by, bm, bd = int(r.integers(1940, 2000)), int(r.integers(1, 13)), int(r.integers(1, 29))
    sy, sm, sd = int(r.integers(2015, 2024)), int(r.integers(1, 13)), int(r.integers(1, 29))
    return {
        "PatientName": f"{PLANTED_PATIENT_NAME}^{p:04d}",
        "PatientID": ctx.patient_id(p),
        "PatientBirthDate": f"{by:04d}{bm:02d}{bd:02d}",
        "PatientSex": "F" if r.random() < 0.5 else "M",
        "PatientAge": f"{sy - by:03d}Y",
        "StudyDate": f"{sy:04d}{sm:02d}{sd:02d}",
        "StudyTime": f"{int(r.integers(7, 19)):02d}{int(r.integers(0, 60)):02d}00",
        "InstitutionName": PLANTED_INSTITUTION,
        "ReferringPhysicianName": "LEAKCANARY^REFERRING^DR",
        "AccessionNumber": f"A{int(r.integers(10**8, 10**9))}",
        "StudyInstanceUID": ctx.uid("study", p),
        "StudyID": f"{p + 1}",
    }


def new_dataset(
    ctx: GenContext, p: int, sop_class: str, sop_instance: str, modality: str, series_uid: str, **attrs
) -> FileDataset:
    """Empty image dataset with file meta, patient/study/series attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.Manufacturer = "MEDISYN PHANTOM"
    for k, v in patient_header(ctx, p).items():
        setattr(ds, k, v)
    ds.SeriesDate = ds.StudyDate
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def set_pixels(
    ds: FileDataset, arr: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None
) -> None:
    """Attach greyscale pixel data: (rows, cols) or (frames, rows, cols)."""
    if arr.ndim == 3:
        ds.NumberOfFrames = arr.shape[0]
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    data = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes()
    if len(data) % 2:
        data += b"\0"
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"


def save(ds: FileDataset, path: Path) -> None:
    """Write as a conformant Part 10 file (preamble + file meta)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
