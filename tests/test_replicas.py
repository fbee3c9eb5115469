"""Replicas of the paper's public downloads (medisyn.phantoms.replicas): the layout facts a real
user's unpacked archive has (names, verbatim headers, encodings, awkward rows), determinism, the
expectations in replicas.json, break_replica, and `medisyn phantoms --layout paper`. No Ray."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from medisyn.cli import main
from medisyn.ingest.readers import read_dicom, read_image
from medisyn.phantoms import replicas as R


def _rows(path: Path, delimiter: str = ",") -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh, delimiter=delimiter))


def _header(path: Path) -> str:
    return path.read_text(encoding="utf-8").split("\n", 1)[0]


def _names(root: Path, pattern: str) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.glob(pattern))


def test_every_supported_entry_is_written_with_its_files_listed(replica_root):
    info = json.loads((replica_root / "replicas.json").read_text())
    assert set(info["entries"]) == set(R.SUPPORTED)
    for name, e in info["entries"].items():
        on_disk = sorted(p.relative_to(replica_root / name).as_posix() for p in (replica_root / name).rglob("*"))
        assert e["files"] == [f for f in on_disk if (replica_root / name / f).is_file()], name
        assert 6 <= len(e["files"]) <= 17, name
        x = e["expect"]
        assert x["corpus"] > 0 and sum(x["classes"].values()) >= x["corpus"], name
        if "by" not in x["splits"]:  # an official split: every corpus file lands in one
            assert sum(x["splits"].values()) == x["corpus"], name
        assert e["assumes"], name


def test_radiology_layouts(replica_root):
    rs = replica_root / "rspect"
    dcm = _names(rs, "train/*/*/*.dcm")
    assert len(dcm) == 12 and all(len(part) == 12 for f in dcm for part in f[len("train/") : -4].split("/"))
    assert _header(rs / "train.csv") == ",".join(R.RSPECT_COLUMNS)
    assert _header(rs / "test.csv") == "StudyInstanceUID,SeriesInstanceUID,SOPInstanceUID"
    ds = pydicom.dcmread(rs / dcm[0])
    assert ds.Modality == "CT" and float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert sum(r[3] == "1" for r in _rows(rs / "train.csv")[1:]) == 3  # PE-positive slices

    cx = replica_root / "chexpert" / "CheXpert-v1.0-small"
    assert _header(cx / "train.csv") == ",".join(R.CHEXPERT_COLUMNS)
    rows = _rows(cx / "train.csv")[1:]
    assert all(r[0].startswith("CheXpert-v1.0-small/train/patient") for r in rows)  # Path includes the top folder
    assert (cx / "train/patient00001/study1/view1_frontal.jpg").is_file()
    lateral = [r for r in rows if r[3] == "Lateral"]
    assert lateral and lateral[0][0].endswith("view2_lateral.jpg") and lateral[0][4] == ""  # AP/PA blank
    cells = {c for r in rows for c in r[5:]}
    assert {"1.0", "0.0", "-1.0", ""} <= cells  # positive, negative, uncertain, blank (unmentioned)
    assert {c for r in _rows(cx / "valid.csv")[1:] for c in r[5:]} <= {"0.0", "1.0"}

    cb = replica_root / "cbis-ddsm"
    mass, calc = _header(cb / "mass_case_description_train_set.csv"), _header(cb / "calc_case_description_test_set.csv")
    assert "patient_id,breast_density,left or right breast" in mass and ",breast density," in calc
    full = _names(cb, "CBIS-DDSM/*/*/*full mammogram images*/1-1.dcm")
    assert full[0].startswith("CBIS-DDSM/Calc-Test_P_00038_RIGHT_MLO/") and len(full) == 7
    raw = (cb / "mass_case_description_train_set.csv").read_text()
    assert '000001.dcm\n"' in raw  # a quoted mask cell ending in an embedded newline
    masks = [r[13] for r in _rows(cb / "mass_case_description_train_set.csv")[1:]]
    assert masks[0].endswith("\n") and not masks[1].endswith("\n")
    csv_path = _rows(cb / "mass_case_description_train_set.csv")[1][11]
    assert csv_path.startswith("Mass-Training_P_00001_LEFT_CC/") and csv_path.endswith("/000000.dcm")
    assert not (cb / "CBIS-DDSM" / csv_path).exists()  # the CSV's paths are not the retriever's folders

    vd = replica_root / "vindr-mammo"
    assert _header(vd / "breast-level_annotations.csv").endswith("breast_birads,breast_density,split")
    files = _names(vd, "images/*/*.dicom")
    assert len(files) == 8 and not _names(vd, "**/*.dcm")
    photometric = {str(pydicom.dcmread(vd / f).PhotometricInterpretation) for f in files}
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    cats = [r[9] for r in _rows(vd / "finding_annotations.csv")[1:]]
    assert "['Mass', 'Skin Retraction']" in cats and "['No Finding']" in cats
    assert {r[-1] for r in _rows(vd / "breast-level_annotations.csv")[1:]} == {"training", "test"}

    bu = replica_root / "busi" / "Dataset_BUSI_with_GT"
    assert (bu / "benign" / "benign (1).png").is_file() and (bu / "benign" / "benign (1)_mask.png").is_file()
    assert (bu / "benign" / "benign (2)_mask_1.png").is_file()
    assert sorted(p.name for p in bu.iterdir()) == ["benign", "malignant", "normal"]
    assert not list(bu.rglob("*.csv"))  # labels only in folder names


def test_gastro_and_ophthalmology_layouts(replica_root):
    hk = replica_root / "hyperkvasir"
    assert _header(hk / "labeled-images/image-labels.csv") == "Video file,Organ,Finding,Classification"
    rows = _rows(hk / "labeled-images/image-labels.csv")[1:]
    for uid, organ, finding, cat in rows:  # ids without extensions; the folder holds <uuid>.jpg
        tract = "lower-gi-tract" if organ == "Lower GI" else "upper-gi-tract"
        assert (hk / "labeled-images" / tract / cat / finding / f"{uid}.jpg").is_file()
    assert len(_names(hk, "unlabeled-images/images/*.jpg")) == 2 and _names(hk, "segmented-images/masks/*.jpg")

    kv = replica_root / "kvasir-v2" / "kvasir-dataset-v2"
    assert tuple(sorted(p.name for p in kv.iterdir())) == R.KVASIR_FOLDERS

    oc = replica_root / "kermany-oct"
    names = _names(oc, "OCT2017/*/*/*.jpeg")
    assert {n.split("/")[1] for n in names} == {"train", "test", "val"}
    import re

    assert all(re.search(r"/(CNV|DME|DRUSEN|NORMAL)/\1-\d+-\d+\.jpeg$", n) for n in names)
    assert (oc / "__MACOSX/OCT2017/train/CNV/._CNV-163081-1.jpeg").is_file()
    assert "1001666" in " ".join(n for n in names if "DRUSEN" in n) and "NORMAL-1001666-1" in " ".join(names)

    ey = replica_root / "eyepacs"
    rows = _rows(ey / "trainLabels.csv")
    assert rows[0] == ["image", "level"] and rows[1] == ["10_left", "0"]
    assert {r[1] for r in rows[1:]} == {"0", "1", "2", "3", "4"}
    listed = {r[0] for r in rows[1:]}
    assert "99_left" not in listed and (ey / "train/99_left.jpeg").is_file()  # an unlabelled image
    assert all((ey / f"train/{i}.jpeg").is_file() for i in listed)

    ap = replica_root / "aptos2019"
    rows = _rows(ap / "train.csv")
    assert rows[0] == ["id_code", "diagnosis"] and rows[1] == ["000c1434d8d7", "2"]
    assert all((ap / f"train_images/{r[0]}.png").is_file() for r in rows[1:])
    assert _rows(ap / "test.csv")[0] == ["id_code"] and len(_names(ap, "test_images/*.png")) == 2


def test_dermatology_layouts(replica_root):
    isic = replica_root / "isic2019"
    truth = _rows(isic / "ISIC_2019_Training_GroundTruth.csv")
    assert truth[0] == ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]
    assert truth[1] == ["ISIC_0000000", "0.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"]
    assert all(r[1:].count("1.0") == 1 for r in truth[1:])
    meta = _rows(isic / "ISIC_2019_Training_Metadata.csv")
    assert meta[0] == ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"]
    assert any(r[3] == "" for r in meta[1:]) and sum(r[3] == "HAM_0000118" for r in meta[1:]) == 2
    assert (isic / "ISIC_2019_Training_Input/ISIC_0000022_downsampled.jpg").is_file()

    fz = replica_root / "fitzpatrick17k"
    rows = _rows(fz / "fitzpatrick17k.csv")
    assert ",".join(rows[0]) == ",".join(R.FITZ_COLUMNS)
    assert "3 Wrongly labelled" in {r[6] for r in rows[1:]} and "" in {r[6] for r in rows[1:]}
    missing = [r[0] for r in rows[1:] if not (fz / "images" / f"{r[0]}.jpg").is_file()]
    assert len(missing) == 2 and all(len(r[0]) == 32 for r in rows[1:])

    dd = replica_root / "ddi" / "ddidiversedermatologyimages"
    rows = _rows(dd / "ddi_metadata.csv")
    assert rows[0] == ["", "DDI_ID", "DDI_file", "skin_tone", "malignant", "disease"]
    assert {r[4] for r in rows[1:]} == {"True", "False"} and {r[3] for r in rows[1:]} == {"12", "34", "56"}
    assert rows[1][2] == "000001.png" and all((dd / r[2]).is_file() for r in rows[1:])


def test_every_image_decodes_with_the_ingest_readers(replica_root):
    info = json.loads((replica_root / "replicas.json").read_text())
    n = 0
    for name, e in info["entries"].items():
        for f in e["files"]:
            path = replica_root / name / f
            if "__MACOSX" in f:
                continue
            if f.endswith((".dcm", ".dicom")):
                frames = read_dicom(path)
                assert frames[0][0].dtype.name == "uint8" and frames[0][0].std() > 0, f
            elif f.endswith((".jpg", ".jpeg", ".png")):
                arr, _ = read_image(path)
                assert arr.std() > 0 or f.endswith(("_mask.png", "_mask_1.png")), f
            else:
                continue
            n += 1
    assert n > 120


def test_same_seed_same_bytes_other_seed_other_pixels(replica_root, tmp_path):
    entries = ["eyepacs", "cbis-ddsm", "figshare-brain-tumor", "cholec80"]  # .mat and MP4 headers too
    R.generate_replicas(tmp_path / "a", seed=0, entries=entries)
    R.generate_replicas(tmp_path / "b", seed=1, entries=entries)
    for name in entries:
        for f in json.loads((replica_root / "replicas.json").read_text())["entries"][name]["files"]:
            assert (tmp_path / "a" / name / f).read_bytes() == (replica_root / name / f).read_bytes(), f
    assert (tmp_path / "b/eyepacs/train/10_left.jpeg").read_bytes() != (
        tmp_path / "a/eyepacs/train/10_left.jpeg"
    ).read_bytes()
    assert (tmp_path / "b/eyepacs/trainLabels.csv").read_bytes() == (
        tmp_path / "a/eyepacs/trainLabels.csv"
    ).read_bytes()


def test_generate_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        R.generate_replicas(tmp_path, entries=["ddi"])
    with pytest.raises(ValueError, match="unknown replica entries"):
        R.generate_replicas(tmp_path / "new", entries=["dermnet"])


def test_break_replica_makes_the_three_faults(replica_root, tmp_path):
    for entry in ("eyepacs", "aptos2019", "busi"):
        shutil.copytree(replica_root / entry, tmp_path / entry)
    msg = R.break_replica(tmp_path, "eyepacs", "header")
    assert _header(tmp_path / "eyepacs/trainLabels.csv") == "image,level_renamed" and "level" in msg
    assert _rows(tmp_path / "eyepacs/trainLabels.csv")[1] == ["10_left", "0"]  # rows untouched
    R.break_replica(tmp_path, "aptos2019", "folder")
    assert not (tmp_path / "aptos2019/train_images").exists() and (tmp_path / "aptos2019/train.csv").is_file()
    R.break_replica(tmp_path, "eyepacs", "file")
    assert not (tmp_path / "eyepacs/trainLabels.csv").exists() and (tmp_path / "eyepacs/trainlabels.csv").is_file()
    with pytest.raises(ValueError, match="no label table"):
        R.break_replica(tmp_path, "busi", "header")
    with pytest.raises(ValueError, match="how must be"):
        R.break_replica(tmp_path, "busi", "typo")
    assert set(R.BREAK_TARGETS) == set(R.SUPPORTED)
    shutil.copytree(replica_root / "cholec80", tmp_path / "cholec80")  # a TAB-separated header keeps its TABs
    R.break_replica(tmp_path, "cholec80", "header")
    assert _header(tmp_path / "cholec80/cholec80/phase_annotations/video01-phase.txt") == "Frame\tPhase_renamed"


def test_cli_phantoms_layout_paper_writes_the_replicas(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, "SUPPORTED", ("aptos2019", "busi"))  # two entries keep the test cheap
    out = tmp_path / "replicas"
    assert main(["phantoms", "--layout", "paper", "--out", str(out), "--seed", "3"]) == 0
    info = json.loads((out / "replicas.json").read_text())
    assert info["seed"] == 3 and set(info["entries"]) == {"aptos2019", "busi"}
    assert (out / "aptos2019/train.csv").is_file() and (out / "busi/Dataset_BUSI_with_GT/normal").is_dir()
    assert not (out / "repositories.yaml").exists()  # not the demo layout
    assert "aptos2019" in capsys.readouterr().out


def test_ingest_through_the_shipped_catalog_gives_what_replicas_json_promises(replica_root):
    """The oracle written from the replicas' own rows meets the real listing steps and paper.yaml."""
    from collections import Counter

    from medisyn.ingest.config import IngestConfig
    from medisyn.ingest.describe import load_catalog
    from medisyn.ingest.steps import list_entry

    catalog = {e.name: e for e in load_catalog("paper")}
    info = json.loads((replica_root / "replicas.json").read_text())
    for name, e in info["entries"].items():
        x, entry = e["expect"], catalog[name]
        listed = x.get("listing", x)  # a volume's slices and a slide's patches come later, from the worker
        listing = list_entry(entry, replica_root / name, IngestConfig())
        items = listing.items
        assert len(items) == listed.get("items", x["corpus"]), name
        assert dict(Counter(p for it in items for p in it.labels)) == listed["classes"], name
        assert listing.left_out == listed["left_out"] and len(listing.rejects) == x["rejects"], name
        assert {p for it in items for p in it.labels} <= entry.phrases(), name
        splits: dict[str, set] = {}
        for it in items:
            splits.setdefault(it.patient, set()).add(it.split)
        if "by" in x["splits"]:
            assert len(splits) == x["splits"]["groups"], name
        elif "listing" not in x:
            assert dict(Counter(it.split for it in items)) == x["splits"], name
        assert all(len(s) == 1 for s in splits.values()), name  # no group in two splits
    cx = list_entry(catalog["chexpert"], replica_root / "chexpert", IngestConfig()).items
    assert {it.caption for it in cx} >= {"Frontal (AP) chest X-ray image showing pleural effusion and edema."}


def test_video_layouts(replica_root):
    """Cholec80 (MP4, 25 fps, per-frame phase files with a header) and SAR-RARP50 (AVI, 60 fps,
    headerless 10 Hz action files, one operation in two parts)."""
    import av

    ch = replica_root / "cholec80" / "cholec80"
    assert _names(ch, "videos/*.mp4") == ["videos/video01.mp4", "videos/video02.mp4"]
    lengths = {}
    for v in ("01", "02"):
        with av.open(str(ch / f"videos/video{v}.mp4")) as c:
            stream = c.streams.video[0]
            assert stream.average_rate == 25
            lengths[v] = sum(1 for _ in c.decode(stream))
        rows = _rows(ch / f"phase_annotations/video{v}-phase.txt", "\t")
        assert rows[0] == ["Frame", "Phase"] and [int(r[0]) for r in rows[1:]] == list(range(len(rows) - 1))
        assert len({r[1] for r in rows[1:]}) == 2 and {r[1] for r in rows[1:]} <= set(R.CHOLEC_PHRASES)  # a change
        assert _rows(ch / f"tool_annotations/video{v}-tool.txt", "\t")[0] == ["Frame", *R.TOOLS]
    assert len(_rows(ch / "phase_annotations/video01-phase.txt", "\t")) - 1 == lengths["01"] == 75
    assert len(_rows(ch / "phase_annotations/video02-phase.txt", "\t")) - 1 > lengths["02"]  # runs past the end

    sar = replica_root / "sar-rarp50"
    assert _names(sar, "*/video_*/video_left.avi") == [
        "test/video_41/video_left.avi",
        "train1/video_11_1/video_left.avi",
        "train1/video_11_2/video_left.avi",
    ]
    with av.open(str(sar / "test/video_41/video_left.avi")) as c:
        assert c.streams.video[0].average_rate == 60 and c.format.name == "avi"
    plain = _rows(sar / "train1/video_11_1/action_discrete.txt")
    padded = _rows(sar / "test/video_41/action_discrete.txt")
    assert plain[0] == ["0", "0"] and padded[0] == ["000000000", "5"]  # no header; one clip zero-pads
    assert all(int(f) % 6 == 0 and a in "01234567" for f, a in plain + padded)


def test_array_slide_and_volume_layouts(replica_root):
    """figshare (.mat v7.3 with MATLAB's header, a v5 copy, a non-MATLAB file), PCam (h5 + meta CSV),
    CAMELYON16 (pyramidal TIFF + ASAP XML) and MSD Task01 (4-D NIfTI, 3-D labels, dataset.json)."""
    import h5py
    import nibabel as nib
    import numpy as np
    import openslide

    fs = replica_root / "figshare-brain-tumor"
    mats = _names(fs, "**/*.mat")
    assert "cvind.mat" in mats and "brainTumorDataPublic_1-766/1.mat" in mats
    part = fs / "brainTumorDataPublic_1-766"
    assert (part / "1.mat").read_bytes().startswith(b"MATLAB 7.3 MAT-file")
    with h5py.File(part / "3.mat", "r") as fh:
        assert fh["cjdata/image"].shape == (176, 192) and fh["cjdata/image"].dtype == np.int16  # column-major
        assert fh["cjdata/label"][()].tolist() == [[2.0]] and fh["cjdata/PID"].dtype == np.uint16
        assert "".join(chr(c[0]) for c in fh["cjdata/PID"][()]) == "MR029100"
        assert set(fh["cjdata"]) == {"image", "label", "PID", "tumorBorder", "tumorMask"}
    assert (part / "5.mat").read_bytes().startswith(b"MATLAB 5.0 MAT-file")
    assert not h5py.is_hdf5(part / "6.mat") and not (part / "6.mat").read_bytes().startswith(b"MATLAB")

    pc = replica_root / "pcam"
    for name, n in (("train", 6), ("valid", 4), ("test", 4)):
        with h5py.File(pc / f"camelyonpatch_level_2_split_{name}_x.h5", "r") as fh:
            assert fh["x"].shape == (n, 96, 96, 3) and fh["x"].dtype == np.uint8
        with h5py.File(pc / f"camelyonpatch_level_2_split_{name}_y.h5", "r") as fh:
            assert fh["y"].shape == (n, 1, 1, 1)
            y = fh["y"][:, 0, 0, 0].tolist()
        meta = _rows(pc / f"camelyonpatch_level_2_split_{name}_meta.csv")
        assert ",".join(meta[0]) == ",coord_y,coord_x,tumor_patch,center_tumor_patch,wsi"
        assert [r[0] for r in meta[1:]] == [str(i) for i in range(n)] and [r[4] == "True" for r in meta[1:]] == y
    slides = {
        s: {r[5] for r in _rows(pc / f"camelyonpatch_level_2_split_{s}_meta.csv")[1:]}
        for s in ("train", "valid", "test")
    }
    assert not (slides["train"] & slides["valid"]) and not (slides["train"] & slides["test"])  # slide-disjoint

    cam = replica_root / "camelyon16" / "CAMELYON16"
    with openslide.OpenSlide(str(cam / "training/tumor/tumor_001.tif")) as slide:
        assert slide.level_count == 3 and slide.dimensions == (2048, 1536)
    assert _names(cam, "training/lesion_annotations/*.xml") == ["training/lesion_annotations/tumor_001.xml"]
    xml = (cam / "training/lesion_annotations/tumor_001.xml").read_text()
    assert "<ASAP_Annotations>" in xml and 'PartOfGroup="_0"' in xml and 'PartOfGroup="_2"' in xml
    assert _rows(cam / "testing/reference.csv") == [["test_001", "Normal"]]  # headerless

    ms = replica_root / "msd-brain-tumour" / "Task01_BrainTumour"
    img, lab = nib.load(ms / "imagesTr/BRATS_001.nii.gz"), nib.load(ms / "labelsTr/BRATS_001.nii.gz")
    assert img.shape == (48, 40, 12, 4) and lab.shape == (48, 40, 12)  # 4 modalities; labels one grid
    assert np.allclose(img.affine, lab.affine) and nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert set(np.unique(np.asarray(lab.dataobj))) == {0, 1, 2, 3}
    info = json.loads((ms / "dataset.json").read_text())
    assert info["modality"]["0"] == "FLAIR" and info["tensorImageSize"] == "4D"
    assert (ms / "imagesTr/._BRATS_001.nii.gz").read_bytes().startswith(b"\x00\x05\x16\x07")  # AppleDouble
