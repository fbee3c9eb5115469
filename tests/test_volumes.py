"""NIfTI volumes: orientation (an asymmetric phantom under several affines, nibabel's own files), slice rules,
the mask rule with its counts, intensity, rejects."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medisyn.ingest.readers import Rejected
from medisyn.ingest.transforms import percentile_clip, window_ct
from medisyn.ingest.volumes import read_volume
from medisyn.phantoms.formats import write_nifti

NIB_DATA = Path(nib.__file__).parent / "tests" / "data"
X, Y, Z = 20, 24, 16  # RAS+ voxel grid of the phantom


def _phantom() -> np.ndarray:
    """A RAS+ volume (x to the right, y anterior, z superior) with a bright block in the patient's
    left-anterior-superior corner (low x, high y, high z) on a faint ramp."""
    vol = (np.arange(X)[:, None, None] + 2 * np.arange(Y)[None, :, None] + 3 * np.arange(Z)[None, None, :]).astype(
        np.int16
    )
    vol[0:3, Y - 3 :, Z - 3 :] = 1000
    return vol


def _slices(path, **kw) -> dict[int, np.ndarray]:
    return {meta["slice"]: pixels for pixels, meta in read_volume(path, **kw)}


def _bright(pixels: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    rows, cols = np.nonzero(pixels == 255)
    return (rows.min(), rows.max()), (cols.min(), cols.max())


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    """The same anatomy stored three ways: RAS, LPS (x and y flipped) and with its axes permuted (z, y, x)."""
    root = tmp_path_factory.mktemp("nifti")
    vol = _phantom()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps[:3, 3] = [X - 1, Y - 1, 0]  # world position of voxel 0: the same physical points as the RAS file
    zyx = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [2, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # 2 mm slices
    ras = np.diag([1.0, 1.0, 2.0, 1.0])
    files = {"ras": (vol, ras), "lps": (vol[::-1, ::-1, :], lps @ ras), "zyx": (vol.transpose(2, 1, 0), zyx)}
    out = {}
    for name, (data, affine) in files.items():
        out[name] = root / f"{name}.nii.gz"
        write_nifti(out[name], np.ascontiguousarray(data), affine)
    return out


@pytest.mark.parametrize("stored", ["lps", "zyx"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_any_affine_gives_the_ras_slices(phantoms, stored, axis):
    reference = _slices(phantoms["ras"], axis=axis)
    other = _slices(phantoms[stored], axis=axis)
    assert reference.keys() == other.keys() == set(range(_phantom().shape[axis]))
    assert all(np.array_equal(reference[k], other[k]) for k in reference)


def test_marker_lands_where_a_radiologist_expects_it(phantoms):
    for stored in ("ras", "lps", "zyx"):
        axial = _slices(phantoms[stored], axis=2)[Z - 1]  # from the feet: anterior up, patient's left on the right
        assert axial.shape == (Y, X) and _bright(axial) == ((0, 2), (X - 3, X - 1))
        coronal = _slices(phantoms[stored], axis=1)[Y - 1]  # from the front: superior up, left on the right
        assert coronal.shape == (Z, X) and _bright(coronal) == ((0, 2), (X - 3, X - 1))
        sagittal = _slices(phantoms[stored], axis=0)[0]  # superior up, anterior on the left
        assert sagittal.shape == (Z, Y) and _bright(sagittal) == ((0, 2), (0, 2))


def test_every_and_keep(phantoms):
    got = list(read_volume(phantoms["lps"], axis=2, every=3, keep=(0.25, 0.75)))
    assert [m["slice"] for _, m in got] == [4, 7, 10]
    assert all(m["slices"] == Z and m["left_out"] == 0 for _, m in got)
    with pytest.raises(ValueError, match="out of range"):
        list(read_volume(phantoms["ras"], axis=3))


def test_mask_rule_counts_and_rejects(phantoms, tmp_path):
    mask = np.zeros((X, Y, Z), dtype=np.uint8)
    mask[5:9, 5:9, 6:9] = 1
    lps_mask = tmp_path / "mask_lps.nii.gz"  # the mask in the other orientation: reoriented by its own affine
    write_nifti(lps_mask, np.ascontiguousarray(mask[::-1, ::-1, :]), nib.load(phantoms["lps"]).affine)
    got = list(read_volume(phantoms["ras"], axis=2, mask_path=lps_mask))
    assert [m["slice"] for _, m in got] == [6, 7, 8]
    assert {m["left_out"] for _, m in got} == {Z - 3}
    got = list(read_volume(phantoms["ras"], axis=2, every=2, mask_path=lps_mask))
    assert [m["slice"] for _, m in got] == [6, 8] and got[0][1]["left_out"] == Z // 2 - 2
    wrong = tmp_path / "small.nii.gz"
    write_nifti(wrong, np.ones((X, Y, Z - 1), dtype=np.uint8), np.eye(4))
    with pytest.raises(Rejected, match=r"^mask shape \(20, 24, 15\) differs from the volume's \(20, 24, 16\)$"):
        list(read_volume(phantoms["ras"], axis=2, mask_path=wrong))
    empty = tmp_path / "empty.nii.gz"
    write_nifti(empty, np.zeros((X, Y, Z), dtype=np.uint8), np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(Rejected, match="^no kept slice has a mask voxel$"):
        list(read_volume(phantoms["ras"], axis=2, mask_path=empty))
    shifted = tmp_path / "shifted.nii.gz"
    write_nifti(shifted, mask, np.diag([1.0, 1.0, 1.0, 1.0]))  # 1 mm slices: another grid
    with pytest.raises(Rejected, match="not aligned"):
        list(read_volume(phantoms["ras"], axis=2, mask_path=shifted))


def test_ct_window_and_percentile(tmp_path):
    hu = np.full((12, 10, 4), -1000, dtype=np.int16)  # air
    hu[2:10, 2:8] = 40  # soft tissue
    hu[5, 5] = 1000  # bone
    path = tmp_path / "ct.nii"
    write_nifti(path, hu, np.eye(4))
    pixels, _ = next(read_volume(path, axis=2, intensity="ct_window", window=(700, 100)))
    assert np.array_equal(pixels, window_ct(hu[:, :, 0].T[::-1, ::-1], width=700, level=100))
    assert set(np.unique(pixels).tolist()) == {0, 106, 255}
    clipped, _ = next(read_volume(path, axis=2))  # auto: NIfTI has no modality, so the percentile clip
    assert np.array_equal(clipped, percentile_clip(hu[:, :, 0].T[::-1, ::-1]))


def test_nibabel_files_no_one_here_wrote(tmp_path):
    anat = nib.load(NIB_DATA / "anatomical.nii")
    assert nib.aff2axcodes(anat.affine) == ("L", "A", "S")  # i runs to the patient's left: i = 0 is the right
    raw = np.asarray(anat.dataobj)
    got = _slices(NIB_DATA / "anatomical.nii", axis=2, every=5)
    assert sorted(got) == list(range(0, raw.shape[2], 5))
    for k, pixels in got.items():  # radiological axial: column 0 = patient's right = i 0; row 0 = most anterior
        assert np.array_equal(pixels, percentile_clip(raw[:, ::-1, k].T))
    four = NIB_DATA / "example4d.nii.gz"  # (128, 96, 24, 2): the documented rule, volume `channel` of axis 4
    data = np.asarray(nib.load(four).dataobj)
    first = _slices(four, axis=2, keep=(0.5, 0.55))
    second = _slices(four, axis=2, keep=(0.5, 0.55), channel=1)
    assert sorted(first) == sorted(second) == [12]
    assert np.array_equal(first[12], percentile_clip(data[:, ::-1, 12, 0].T))
    assert np.array_equal(second[12], percentile_clip(data[:, ::-1, 12, 1].T))
    with pytest.raises(Rejected, match="^volume has 2 volumes on its 4th axis; volume 2 asked$"):
        list(read_volume(four, axis=2, channel=2))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes((NIB_DATA / "example4d.nii.gz").read_bytes()[:2000])
    with pytest.raises(Rejected, match="^unreadable volume"):
        list(read_volume(broken, axis=2))
    text = tmp_path / "notes.nii"
    text.write_text("not a volume")
    with pytest.raises(Rejected, match="^unreadable volume"):
        list(read_volume(text, axis=2))
