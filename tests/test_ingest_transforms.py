"""Pre-processing numbers checked against hand-computed values; readers on pydicom's own files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medisyn.ingest.readers import Rejected, read_dicom, read_image
from medisyn.ingest.transforms import crop_box, percentile_clip, resize_center_crop, resize_center_crop_info, window_ct

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # ship inside the package; no download


def test_window_ct_hand_values():
    # width 700, level 100: [-250, 450] -> [0, 255]; 100 HU is the middle (127.5 rounds to 128)
    hu = np.array([-1000, -250, 100, 450, 1000, 275])
    np.testing.assert_array_equal(window_ct(hu), [0, 0, 128, 255, 255, 191])  # 275: 525*255/700 = 191.25
    assert window_ct(hu).dtype == np.uint8
    np.testing.assert_array_equal(window_ct(np.array([-160, 40, 240]), width=400, level=40), [0, 128, 255])


def test_percentile_clip_hand_values():
    x = np.arange(1001)  # 0.5th percentile = 5, 99.5th = 995
    y = percentile_clip(x)
    assert y.dtype == np.uint8
    assert (y[0], y[5], y[104], y[500], y[995], y[1000]) == (0, 0, 26, 128, 255, 255)  # 99*255/990 = 25.5 -> 26
    hot = np.zeros((100, 100))
    hot[:, :50] = 100
    hot[0, 0] = 1e6  # one hot outlier does not wash out the image
    assert percentile_clip(hot)[50, 75] == 0 and percentile_clip(hot)[50, 25] == 255


def test_resize_center_crop_geometry():
    info = crop_box(768, 1024, 512)
    assert info.original_size == (768, 1024) and info.resized_size == (512, 683) and info.crop_top_left == (0, 85)
    ramp = np.tile(np.linspace(0, 255, 1024).astype(np.uint8), (768, 1))
    out, info = resize_center_crop_info(ramp)
    assert out.shape == (512, 512)
    assert abs(int(out[256, 256]) - 128) <= 2  # the centre stays the centre
    small = np.zeros((50, 100, 3), np.uint8)
    out, info = resize_center_crop_info(small)
    assert out.shape == (512, 512, 3) and info.resized_size == (512, 1024) and info.crop_top_left == (0, 256)


def test_resize_is_antialiased():
    checker = ((np.indices((1024, 1024)).sum(0) % 2) * 255).astype(np.uint8)
    out = resize_center_crop(checker)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 10  # aliasing would leave a strong pattern


def test_resize_rejects_non_uint8():
    with pytest.raises(ValueError, match="expects uint8"):
        resize_center_crop(np.zeros((10, 10), np.float32))


def test_ct_dicom_in_hounsfield_units_then_windowed():
    path = PYDICOM_FILES / "CT_small.dcm"
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ((img, meta),) = read_dicom(path)
    np.testing.assert_array_equal(img, window_ct(hu))
    assert meta == {"frame": 0, "frames": 1}


def test_mr_percentile_and_monochrome1_inverted(tmp_path):
    path = PYDICOM_FILES / "MR_small.dcm"
    ds = pydicom.dcmread(path)
    ((img, _),) = read_dicom(path)
    np.testing.assert_array_equal(img, percentile_clip(ds.pixel_array.astype(float)))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    ((inv, _),) = read_dicom(tmp_path / "mono1.dcm")
    np.testing.assert_array_equal(inv, 255 - img)


def test_multiframe_gives_one_image_per_frame():
    frames = read_dicom(PYDICOM_FILES / "examples_ybr_color.dcm")
    assert len(frames) == 30 and frames[0][0].shape == (240, 320, 3)
    assert [m["frame"] for _, m in frames] == list(range(30))
    (only,) = read_dicom(PYDICOM_FILES / "examples_ybr_color.dcm", frames="middle")
    assert only[1]["frame"] == 15


def test_every_pydicom_test_file_is_accepted_or_rejected_with_a_reason():
    files = sorted(PYDICOM_FILES.glob("*.dcm"))
    assert len(files) > 50
    accepted, reasons = 0, {}
    for f in files:
        try:
            images = read_dicom(f)
            assert images and all(a.dtype == np.uint8 and a.ndim in (2, 3) for a, _ in images)
            accepted += 1
        except Rejected as exc:
            reasons[f.name] = exc.reason
    assert accepted > 40
    assert reasons["MR_truncated.dcm"] == "truncated pixel data"
    assert reasons["rtplan.dcm"] == "no pixel data"
    assert reasons["JPEG2000-embedded-sequence-delimiter.dcm"].startswith("undecodable transfer syntax JPEG 2000")
    # nothing identifying in a reason: they are built from fixed phrases only
    assert all("/" not in r and "^" not in r for r in reasons.values())


def test_compressed_syntaxes_decode_with_the_declared_plugins():
    for name in ("JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        (img, _), *_ = read_dicom(PYDICOM_FILES / name)
        assert img.dtype == np.uint8 and img.std() > 0


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file (0 bytes)"),
        (b"hello, this is not a DICOM file at all\n" * 5, "not DICOM"),
    ],
)
def test_bad_dicom_bytes(tmp_path, content, reason):
    f = tmp_path / "bad.dcm"
    f.write_bytes(content)
    with pytest.raises(Rejected, match=re.escape(reason)):
        read_dicom(f)


def test_truncated_dicom_file(tmp_path):
    data = (PYDICOM_FILES / "CT_small.dcm").read_bytes()
    f = tmp_path / "cut.dcm"
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(Rejected):
        read_dicom(f)


def test_images_8_and_16_bit(tmp_path):
    from PIL import Image

    grey16 = (np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    img, _ = read_image(tmp_path / "g16.png")
    assert img.dtype == np.uint8 and img.min() == 0 and img.max() == 255
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_array_equal(read_image(tmp_path / "c.png")[0], rgb)
    (tmp_path / "bad.png").write_bytes((tmp_path / "c.png").read_bytes()[:100])
    with pytest.raises(Rejected, match="unreadable or truncated image"):
        read_image(tmp_path / "bad.png")


def _repo(**kw):
    from medisyn.ingest.config import RepositoryConfig

    base = dict(
        name="brain-mri-jpg",
        kind="image",
        path="r",
        glob="*.png",
        labels_csv="labels.csv",
        path_column="path",
        label_columns=("label",),
        patient_column="patient",
        template="Brain MRI image showing {label}.",
        specialty="radiology",
        image_type="magnetic resonance imaging",
        classes={"glioma": "glioma"},
    )
    return RepositoryConfig(**{**base, **kw})


def test_8_bit_mri_and_mammography_images_are_percentile_clipped(tmp_path):
    """The paper clips MRI and mammograms at the 0.5th-99.5th percentile: an 8-bit PNG/JPEG export
    of a low-contrast MR slice is stretched as its DICOM original would be; chest X-rays are not."""
    from PIL import Image

    rng = np.random.default_rng(0)
    low = rng.integers(100, 140, (64, 64)).astype(np.uint8)  # 40 grey levels of 256
    low[0, :3] = (0, 255, 250)  # outliers the clip ignores
    Image.fromarray(low).save(tmp_path / "mri.png")
    mri, mammo = _repo(), _repo(name="mammo", image_type="X-ray", template="Mammogram image showing {label}.")
    chest = _repo(name="cxr", image_type="X-ray", template="Frontal (AP) chest X-ray image showing {label}.")
    assert mri.intensity == mammo.intensity == "percentile" and chest.intensity == "auto"
    assert _repo(intensity="none").intensity == "none"  # an explicit choice stays

    img, _ = read_image(tmp_path / "mri.png", intensity=mri.intensity)
    np.testing.assert_array_equal(img, percentile_clip(low))
    inner = img[1:, :]
    assert inner.min() == 0 and inner.max() == 255 and inner.std() > 4 * low[1:, :].std()
    np.testing.assert_array_equal(read_image(tmp_path / "mri.png", intensity=chest.intensity)[0], low)

    Image.fromarray(np.repeat(low[..., None], 3, axis=2)).save(tmp_path / "mri.jpg", quality=95)
    as_rgb, _ = read_image(tmp_path / "mri.jpg", intensity=mri.intensity)  # grey saved as RGB: clipped as grey
    assert as_rgb.shape == (64, 64) and as_rgb[1:, :].std() > 4 * low[1:, :].std()
    colour = rng.integers(100, 140, (64, 64, 3)).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    np.testing.assert_array_equal(read_image(tmp_path / "colour.png", intensity=mri.intensity)[0], colour)


def test_8_bit_mr_dicom_is_percentile_clipped(tmp_path):
    ds = pydicom.dcmread(PYDICOM_FILES / "MR_small.dcm")
    low = (100 + ds.pixel_array.astype(np.int64) * 40 // int(ds.pixel_array.max())).astype(np.uint8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = low.tobytes()
    ds.save_as(tmp_path / "mr8.dcm")
    ((img, _),) = read_dicom(tmp_path / "mr8.dcm")
    np.testing.assert_array_equal(img, percentile_clip(low))
    assert img.max() == 255 and img.std() > 4 * low.std()
