"""MATLAB (v7.3 through h5py, v5 through scipy) and HDF5 row readers: orientation, fields, rejects, chunked reads."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from medisyn.ingest.arrays import hdf5_rows, mat_fields, read_hdf5_rows, read_mat
from medisyn.ingest.readers import Rejected
from medisyn.phantoms.formats import write_mat_v5, write_mat_v73

FIELDS = {"label": "cjdata/label", "pid": "cjdata/PID"}


def _marked() -> np.ndarray:
    """A 40x64 int16 image (wider than tall) with one bright pixel at row 3, column 50: top right."""
    img = np.zeros((40, 64), dtype=np.int16)
    img[3, 50] = 900
    return img


@pytest.mark.parametrize("label", [1, 2, 3])
def test_mat_v73_image_in_matlab_orientation_and_fields(tmp_path, label):
    path = tmp_path / "1.mat"
    write_mat_v73(path, _marked(), label, "MR-100360", mask=_marked() > 0)
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"  # a real v7.3 header in the user block
    with h5py.File(path, "r") as fh:  # what MATLAB writes: column-major, so h5py sees it transposed
        assert fh["cjdata/image"].shape == (64, 40)
        assert fh["cjdata/label"].shape == (1, 1) and fh["cjdata/label"].dtype == np.float64
        assert fh["cjdata/PID"].shape == (9, 1) and fh["cjdata/PID"].dtype == np.uint16
    image, fields = read_mat(path, "cjdata/image", FIELDS)
    assert image.shape == (40, 64) and image.dtype == np.int16
    assert [tuple(p) for p in np.argwhere(image)] == [(3, 50)]  # where imshow would put it
    assert fields == {"label": str(label), "pid": "MR-100360"}
    assert mat_fields(path, FIELDS) == fields
    raw, _ = read_mat(path, "cjdata/image", {}, transpose=False)
    assert raw.shape == (64, 40)  # transpose=False: as stored (a row-major HDF5 written from Python)


def test_mat_v5_read_the_same_way(tmp_path):
    path = tmp_path / "2.mat"
    write_mat_v5(path, _marked(), 3, "MR-100360")
    assert path.read_bytes()[:19] == b"MATLAB 5.0 MAT-file"
    image, fields = read_mat(path, "cjdata/image", FIELDS)
    assert image.shape == (40, 64) and [tuple(p) for p in np.argwhere(image)] == [(3, 50)]
    assert fields == {"label": "3", "pid": "MR-100360"}
    assert mat_fields(path, {"label": "cjdata/label"}) == {"label": "3"}


def test_mat_rejects_with_fixed_reasons(tmp_path):
    text = tmp_path / "notes.mat"
    text.write_text("MATLAB? no, a text file with the patient's name")
    with pytest.raises(Rejected, match="^not a MATLAB file$"):
        read_mat(text, "cjdata/image", FIELDS)
    empty = tmp_path / "empty.mat"
    empty.write_bytes(b"")
    with pytest.raises(Rejected, match="empty file"):
        mat_fields(empty, FIELDS)
    nodata = tmp_path / "3.mat"
    with h5py.File(nodata, "w", userblock_size=512) as fh:
        fh.create_dataset("cjdata/label", data=np.ones((1, 1)))
    with pytest.raises(Rejected, match="^no field cjdata/image in the MATLAB file$"):
        read_mat(nodata, "cjdata/image", FIELDS)
    with pytest.raises(Rejected, match="^no field cjdata/PID in the MATLAB file$"):
        mat_fields(nodata, FIELDS)
    v5 = tmp_path / "4.mat"
    write_mat_v5(v5, _marked(), 1, "x")
    with pytest.raises(Rejected, match="^no field cjdata/tumorMask in the MATLAB file$"):
        read_mat(v5, "cjdata/tumorMask", {})
    truncated = tmp_path / "5.mat"
    write_mat_v73(truncated, _marked(), 1, "MR-1")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(Rejected) as info:
        read_mat(truncated, "cjdata/image", FIELDS)
    assert "MR-1" not in info.value.reason and str(tmp_path) not in info.value.reason


def test_hdf5_rows_read_contiguous_runs_in_chunks(tmp_path, monkeypatch):
    import medisyn.ingest.arrays as arrays

    path = tmp_path / "camelyonpatch_level_2_split_valid_x.h5"
    x = np.arange(40 * 96 * 96 * 3, dtype=np.uint32).astype(np.uint8).reshape(40, 96, 96, 3)
    with h5py.File(path, "w") as fh:
        fh.create_dataset("x", data=x, chunks=(8, 96, 96, 3))
    assert hdf5_rows(path, "x") == 40
    asked = []
    original = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        asked.append(key)
        return original(self, key, *args, **kwargs)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    monkeypatch.setattr(arrays, "_ROW_BYTES", 5 * 96 * 96 * 3)  # at most 5 rows per read
    rows = [*range(3, 15), 30, 31, 39]
    got = list(read_hdf5_rows(path, "x", rows[::-1]))
    assert [i for i, _ in got] == rows
    assert all(np.array_equal(a, x[i]) for i, a in got)
    assert asked == [slice(3, 8), slice(8, 13), slice(13, 15), slice(30, 32), slice(39, 40)]
    with pytest.raises(Rejected, match="^row 40 outside the dataset's 40 rows$"):
        list(read_hdf5_rows(path, "x", [39, 40]))
    with pytest.raises(Rejected, match="^no dataset y in the HDF5 file$"):
        hdf5_rows(path, "y")
    plain = tmp_path / "meta.csv"
    plain.write_text(",coord_y,coord_x\n")
    with pytest.raises(Rejected, match="^not an HDF5 file$"):
        hdf5_rows(plain, "x")
