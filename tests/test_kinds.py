"""Sources that are not image files (issue #35): the reader specs of the description language, their
elements at listing (a video's sampled frames, an HDF5 file's rows, a .mat file's fields, a volume's
mask, a slide's outlines), and one Ray ingest of a small mixed set with its rejects, left-out counts,
near-duplicate policy and a resume after a stop midway."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

from medisyn.configtools import ConfigError
from medisyn.ingest.config import IngestConfig
from medisyn.ingest.describe import parse_entry
from medisyn.ingest.listing import source_ref
from medisyn.ingest.steps import list_entry

CFG = IngestConfig()
DEMO = Path(__file__).resolve().parents[1] / "jobs/configs/demo.yaml"
PHASES = {"Preparation": "preparation", "Dissection": "dissection"}

VIDEO = {
    "name": "cholec",
    "specialty": "surgery",
    "image_type": "endoscopy",
    "reader": "video",
    "files": {"glob": "videos/*.mp4", "regex": r"video(?P<video>\d+)\.mp4$"},
    "video": {
        "annotations": "phase_annotations/video{video}-phase.txt",
        "columns": ["Frame", "Phase"],
        "frame": "Frame",
        "fps": 25,
        "every": 25,
    },
    "group": {"field": "video", "kind": "video"},
    "label": {"field": "Phase", "classes": PHASES},
    "caption": "A laparoscopic image during {label}.",
}
PCAM = {
    "name": "pcam",
    "specialty": "pathology",
    "image_type": "microscopy",
    "reader": "hdf5",
    "files": {"glob": "*_x.h5", "key": "{index}"},
    "hdf5": {"dataset": "x"},
    "tables": [
        {"file": "meta.csv", "columns": ["index", "tumour"], "aliases": {"index": ["Unnamed: 0"]}, "key": "{index}"}
    ],
    "label": {"field": "tumour", "classes": {"1": "metastasis", "0": "no metastasis"}},
    "caption": "A lymph node patch with {label}.",
}
MAT = {
    "name": "figshare",
    "specialty": "radiology",
    "image_type": "magnetic resonance imaging",
    "reader": "mat",
    "files": {"glob": "*.mat"},
    "mat": {"image": "cjdata/image", "fields": {"label": "cjdata/label", "pid": "cjdata/PID"}},
    "group": {"field": "pid"},
    "label": {"field": "label", "classes": {"1": "meningioma", "3": "pituitary tumour"}},
    "caption": "A brain MRI showing {label}.",
}
NIFTI = {
    "name": "msd",
    "specialty": "radiology",
    "image_type": "magnetic resonance imaging",
    "reader": "nifti",
    "files": {"glob": "imagesTr/*.nii.gz"},
    "volume": {"axis": 2, "every": 1, "keep": [0.0, 1.0], "mask": "labelsTr/{name}"},
    "tables": [{"file": "labels.csv", "columns": ["file", "dx"], "key": "imagesTr/{file}"}],
    "label": {"field": "dx", "classes": {"glioma": "glioma"}},
    "caption": "A brain MRI showing {label}.",
}
SLIDES = {
    "name": "camelyon",
    "specialty": "pathology",
    "image_type": "microscopy",
    "reader": "wsi",
    "files": {"glob": "images/*.tif"},
    "wsi": {"level": 1, "patch_size": 64, "tissue_fraction": 0.5},
    "tables": [{"file": "reference.csv", "columns": ["image", "class"], "key": "images/{image}.tif"}],
    "label": {"field": "class", "classes": {"Tumor": "metastasis", "Normal": "no metastasis"}},
    "lesions": {
        "annotations": "annotations/{stem}.xml",
        "positive": "metastasis",
        "negative": "no metastasis",
        "per_slide": 0,
    },
    "caption": "A lymph node with {label}.",
}


def parsed(raw: dict, **over) -> object:
    raw = copy.deepcopy(raw) | over
    return parse_entry({k: v for k, v in raw.items() if v is not None}, "t.yaml: sources[0]")


def phase_file(path: Path, frames: range, phase=lambda f: "Preparation" if f < 40 else "Dissection") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("Frame\tPhase\n" + "".join(f"{f}\t{phase(f)}\n" for f in frames))


def videos(root: Path) -> Path:
    """video01: 60 frames at 25 fps, annotated 0..79 (frame 75 past its end); video02 at 30 fps;
    video03 cut in half; video04 without its annotation file."""
    from medisyn.phantoms.formats import write_test_video

    (root / "videos").mkdir(parents=True)
    write_test_video(root / "videos/video01.mp4", 60, 25, seed=1)
    write_test_video(root / "videos/video02.mp4", 30, 30, seed=2)
    write_test_video(root / "videos/video03.mp4", 60, 25, seed=3)
    data = (root / "videos/video03.mp4").read_bytes()
    (root / "videos/video03.mp4").write_bytes(data[: len(data) // 2])
    write_test_video(root / "videos/video04.mp4", 30, 25, seed=4)
    phase_file(root / "phase_annotations/video01-phase.txt", range(80))
    phase_file(root / "phase_annotations/video02-phase.txt", range(30))
    phase_file(root / "phase_annotations/video03-phase.txt", range(60))
    return root


# ----------------------------------------------------------------------------- the language


def test_reader_specs_are_checked_naming_entry_and_field():
    assert parsed(VIDEO).video.every == 25
    cases = [
        (dict(reader="image"), r"source 'cholec'.video: only for reader 'video'"),
        (dict(video=None), r"source 'cholec'.video: reader 'video' needs it"),
        (dict(video=VIDEO["video"] | {"frame": "Time"}), r"video.frame: column 'Time' is not a field"),
        (dict(video=VIDEO["video"] | {"annotations": "{nope}.txt"}), r"video.annotations: field 'nope'"),
        (dict(video=VIDEO["video"] | {"fps": 0}), r"video: fps must be > 0"),
        (dict(label={"field": "phase", "classes": PHASES}), r"label.field: field 'phase' is not a field"),
    ]
    for over, message in cases:
        with pytest.raises(ConfigError, match=message):
            parsed(VIDEO, **over)
    with pytest.raises(ConfigError, match=r"lesions.positive: 'tumour' is not a phrase"):
        parsed(SLIDES, lesions=SLIDES["lesions"] | {"positive": "tumour"})
    with pytest.raises(ConfigError, match=r"source 'msd'.lesions: only for reader 'wsi'"):
        parsed(NIFTI, lesions=SLIDES["lesions"])
    masked = SLIDES["lesions"] | {"annotations": None, "masks": "masks/{stem}_mask.tif"}
    assert parsed(SLIDES, lesions={k: v for k, v in masked.items() if v is not None}).lesions.masks
    for both in (SLIDES["lesions"] | {"masks": "m/{stem}.tif"}, {k: v for k, v in masked.items() if k != "masks"}):
        with pytest.raises(ConfigError, match=r"lesions: give exactly one of annotations .ASAP XML. and masks"):
            parsed(SLIDES, lesions={k: v for k, v in both.items() if v is not None})
    with pytest.raises(ConfigError, match=r"wsi.magnification: in \[0, 100\]"):
        parsed(SLIDES, wsi=SLIDES["wsi"] | {"magnification": -40})
    from medisyn.ingest.catalog import reading

    assert dict(reading(parsed(SLIDES, wsi=SLIDES["wsi"] | {"magnification": 40})).settings)["wsi_magnification"] == 40
    assert "wsi_magnification" not in dict(reading(parsed(SLIDES)).settings)
    with pytest.raises(ConfigError, match=r"volume: axis 0-2"):
        parsed(NIFTI, volume={"axis": 3})
    assert parsed(SLIDES).phrases() == {"metastasis", "no metastasis"}


def test_video_listing_gives_one_element_per_sampled_annotated_frame(tmp_path):
    """Frames % every == 0 of the annotation become elements with the row's fields; the others are
    counted as left out; a video without its annotation file is a reject with the reason."""
    root = videos(tmp_path)
    out = list_entry(parsed(VIDEO), root, CFG)
    got = {(it.ref, it.index, it.caption) for it in out.items}
    want = {
        (
            source_ref("cholec", f"videos/video{v}.mp4#{f}", CFG.split_salt),
            f,
            "A laparoscopic image during " + ("preparation" if f < 40 else "dissection") + ".",
        )
        for v, frames in (("01", (0, 25, 50, 75)), ("02", (0, 25)), ("03", (0, 25, 50)))
        for f in frames
    }
    assert got == want
    assert out.left_out == {"video.every: annotated frame between samples (every 25)": 80 + 30 + 60 - 9}
    assert out.rejects == [
        {
            "source_ref": source_ref("cholec", "videos/video04.mp4", CFG.split_salt),
            "stage": "listing",
            "reason": "no annotation file for this video (video.annotations)",
        }
    ]
    series = {it.series for it in out.items if "video01" in out.source_map[it.ref]}
    assert series == {source_ref("cholec", "videos/video01.mp4", CFG.split_salt)}  # a video's frames share it
    assert len({it.patient for it in out.items}) == 3  # the group: the video id

    from medisyn.ingest.catalog import reading
    from medisyn.ingest.check import Mismatch, open_sample

    first = next(it for it in out.items if it.index == 25 and "video01" in out.source_map[it.ref])
    open_sample(first, reading(parsed(VIDEO)), CFG)  # `sources check` opens a sampled frame
    wrong_rate = next(it for it in out.items if "video02" in out.source_map[it.ref])
    with pytest.raises(Mismatch, match=r"does not open with the video reader \(video frame rate 30"):
        open_sample(wrong_rate, reading(parsed(VIDEO)), CFG)


def test_hdf5_rows_mat_fields_masks_and_outlines_at_listing(tmp_path):
    import h5py

    from medisyn.phantoms.formats import write_mat_v5, write_mat_v73

    with h5py.File(tmp_path / "train_x.h5", "w") as h:
        h["x"] = np.zeros((3, 16, 16, 3), np.uint8)
    (tmp_path / "meta.csv").write_text(",tumour\n0,1\n1,0\n2,1\n")
    out = list_entry(parsed(PCAM), tmp_path, CFG)
    assert [(it.index, it.labels) for it in out.items] == [
        (0, ("metastasis",)),
        (1, ("no metastasis",)),
        (2, ("metastasis",)),
    ]
    assert out.items[1].ref == source_ref("pcam", "train_x.h5#1", CFG.split_salt)

    mats = tmp_path / "mat"
    mats.mkdir()
    write_mat_v73(mats / "1.mat", np.ones((16, 16), np.int16), 1, "100360")
    write_mat_v5(mats / "2.mat", np.ones((16, 16), np.int16), 3, "100361")
    (mats / "3.mat").write_bytes(b"not a matlab file at all")
    out = list_entry(parsed(MAT), mats, CFG)
    assert [it.labels for it in out.items] == [("meningioma",), ("pituitary tumour",)]
    assert [r["reason"] for r in out.rejects] == ["not a MATLAB file"]

    vol = tmp_path / "vol"
    for rel in ("imagesTr/a.nii.gz", "imagesTr/b.nii.gz", "labelsTr/a.nii.gz"):
        (vol / rel).parent.mkdir(parents=True, exist_ok=True)
        (vol / rel).write_bytes(b"")
    (vol / "labels.csv").write_text("file,dx\na.nii.gz,glioma\nb.nii.gz,glioma\n")
    out = list_entry(parsed(NIFTI), vol, CFG)
    assert [Path(it.annotation).relative_to(vol).as_posix() for it in out.items] == ["labelsTr/a.nii.gz"]
    assert [r["reason"] for r in out.rejects] == ["no mask file for this volume (volume.mask)"]

    sl = tmp_path / "sl"
    for rel in ("images/t1.tif", "images/t2.tif", "images/n1.tif", "annotations/t1.xml"):
        (sl / rel).parent.mkdir(parents=True, exist_ok=True)
        (sl / rel).write_bytes(b"")
    (sl / "reference.csv").write_text("image,class\nt1,Tumor\nt2,Tumor\nn1,Normal\n")
    out = list_entry(parsed(SLIDES), sl, CFG)
    by = {Path(out.source_map[it.ref]).stem: it for it in out.items}
    assert set(by) == {"t1", "n1"} and by["n1"].annotation == "" and not by["n1"].alternatives
    assert [(c, t) for c, _, t in by["t1"].alternatives] == [
        ("positive", "A lymph node with metastasis."),
        ("negative", "A lymph node with no metastasis."),
    ]
    assert [r["reason"] for r in out.rejects] == ["no lesion annotation file for this slide (lesions.annotations)"]


def test_near_duplicates_are_not_sought_within_one_video():
    """A static scene: a video's consecutive frames are kept; the same frame in another video, or a
    plain image, is a near duplicate; exact copies go everywhere."""
    from medisyn.ingest.dedup import find_exact_duplicates, find_near_duplicates

    refs = ["v/a#0", "v/a#1", "v/a#2", "v/b#0", "x/img"]
    hashes = ["ffff000000000000", "ffff000000000001", "ffff000000000003", "ffff000000000001", "ffff000000000003"]
    thumbs = [bytes([10] * 4), bytes([10] * 4), bytes([10] * 4), bytes([10] * 4), bytes([10] * 4)]
    series = ["a", "a", "a", "b", ""]
    got = find_near_duplicates(refs, hashes, 4, thumbs, 0.01, series=series)
    assert got == {"v/b#0": ("near duplicate", "v/a#0"), "x/img": ("near duplicate", "v/a#0")}
    assert set(find_near_duplicates(refs, hashes, 4, thumbs, 0.01)) == {"v/a#1", "v/a#2", "v/b#0", "x/img"}
    assert set(find_exact_duplicates(refs, ["p", "p", "q", "r", "s"])) == {"v/a#1"}  # within a video too


# ----------------------------------------------------------------------------- one Ray ingest


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A small mixed set: videos, a PCam-like h5, two .mat files, a NIfTI with a mask, a slide with outlines."""
    import h5py

    from medisyn.phantoms import pathology
    from medisyn.phantoms.formats import write_asap, write_mat_v5, write_mat_v73, write_nifti

    root = tmp_path_factory.mktemp("kinds")
    videos(root / "cholec")
    rng = np.random.default_rng(0)
    (root / "pcam").mkdir()
    with h5py.File(root / "pcam/train_x.h5", "w") as h:
        h["x"] = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    (root / "pcam/meta.csv").write_text(",tumour\n0,1\n1,0\n2,1\n")
    (root / "figshare").mkdir()
    write_mat_v73(root / "figshare/1.mat", rng.integers(0, 4000, (32, 32)).astype(np.int16), 1, "100360")
    write_mat_v5(root / "figshare/2.mat", rng.integers(0, 4000, (32, 32)).astype(np.int16), 3, "100361")
    vol = rng.integers(0, 1000, (16, 16, 6)).astype(np.int16)
    mask = np.zeros_like(vol)
    mask[4:8, 4:8, 2:4] = 1  # slices 2 and 3 of 6
    (root / "msd/imagesTr").mkdir(parents=True)
    (root / "msd/labelsTr").mkdir(parents=True)
    write_nifti(root / "msd/imagesTr/a.nii.gz", vol, np.eye(4))
    write_nifti(root / "msd/labelsTr/a.nii.gz", mask, np.eye(4))
    (root / "msd/labels.csv").write_text("file,dx\na.nii.gz,glioma\n")
    img = np.empty((1024, 1024, 3), np.uint8)
    img[:] = (235, 160, 210)
    img[256:768, 256:672] = (110, 50, 150)
    img[:, :128] = (245, 245, 245)
    (root / "camelyon/images").mkdir(parents=True)
    (root / "camelyon/annotations").mkdir()
    pathology.write_slide(pathology.pyramid(img, 2), root / "camelyon/images/t1.tif")
    write_asap(root / "camelyon/annotations/t1.xml", [[(256, 256), (672, 256), (672, 768), (256, 768)]])
    (root / "camelyon/reference.csv").write_text("image,class\nt1,Tumor\n")
    catalog = root / "kinds.yaml"
    catalog.write_text(yaml.safe_dump({"sources": [VIDEO, PCAM, MAT, NIFTI, SLIDES]}))
    return root, catalog


def _run(root: Path, catalog: Path, run_dir: Path):
    from medisyn.config import load_config
    from medisyn.ingest.pipeline import run as ingest

    cfg = load_config(
        DEMO,
        [
            f"run_dir={run_dir}",
            "ingest.repositories_file=",
            f"ingest.sources={catalog}",
            f"ingest.sources_root={root}",
            "ingest.source_entries=[]",  # the demo's names the paper catalog's entries
            "ingest.source_settings={}",
            "ingest.elements_per_task=2",
            "ingest.size=64",
        ],
    )
    return ingest(cfg)


def test_one_ingest_of_every_kind_and_a_resume(ray_cluster, mixed, tmp_path, monkeypatch):
    from medisyn.ingest import pipeline
    from medisyn.records import read_corpus, read_shards

    root, catalog = mixed
    summary = _run(root, catalog, tmp_path / "a")
    corpus = read_corpus(tmp_path / "a/corpus", ["id", "source", "source_ref", "caption"]).to_pandas()
    rejects = read_shards(tmp_path / "a/rejects", ["source_ref", "stage", "reason"]).to_pandas()
    by_source = corpus.groupby("source").size().to_dict()
    # video01: frames 0, 25, 50 (75 is past its end); pcam 3 rows; figshare 2; msd slices 2, 3; the slide's patches
    assert (by_source["cholec"], by_source["pcam"], by_source["figshare"], by_source["msd"]) == (3, 3, 2, 2)
    video = corpus[corpus["source"] == "cholec"]
    ref = {source_ref("cholec", f"videos/video01.mp4#{f}", CFG.split_salt): f for f in (0, 25, 50)}
    assert set(video["source_ref"]) == set(ref)
    for r, cap in zip(video["source_ref"], video["caption"], strict=True):  # the caption of its own frame
        assert cap == f"A laparoscopic image during {'preparation' if ref[r] < 40 else 'dissection'}."
    reason = dict(zip(rejects["source_ref"], rejects["reason"], strict=True))
    assert reason[source_ref("cholec", "videos/video01.mp4#75", CFG.split_salt)] == "annotation past the video's end"
    for f in (0, 25):
        assert (
            "does not match the annotation's 25" in reason[source_ref("cholec", f"videos/video02.mp4#{f}", "medisyn")]
        )
    cut = [reason.get(source_ref("cholec", f"videos/video03.mp4#{f}", CFG.split_salt)) for f in (0, 25, 50)]
    assert any(cut) and all(r is None or "video" in r or "decoded" in r for r in cut)  # rejected, not guessed
    slide = corpus[corpus["source"] == "camelyon"]
    assert set(slide["caption"]) == {"A lymph node with metastasis.", "A lymph node with no metastasis."}
    left = summary["left_out"]
    assert left["msd"] == {"volume.mask: slice without a mask voxel": 4}
    assert left["camelyon"].get("lesions: tumour fraction between thresholds", 0) > 0
    assert left["cholec"] == {"video.every: annotated frame between samples (every 25)": 80 + 30 + 60 - 9}

    # a stop midway: half the units written, then the run dies; the rerun reads only the rest
    real = pipeline._read_units
    seen: list[list[str]] = []

    def stop_midway(units, max_tasks):
        seen.append([u.id for u in units])
        real(units[: len(units) // 2], max_tasks)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pipeline, "_read_units", stop_midway)
    with pytest.raises(KeyboardInterrupt):
        _run(root, catalog, tmp_path / "b")
    monkeypatch.setattr(pipeline, "_read_units", lambda units, m: (seen.append([u.id for u in units]), real(units, m)))
    _run(root, catalog, tmp_path / "b")
    assert seen[1] == seen[0][len(seen[0]) // 2 :]  # finished units are not read again
    again = read_corpus(tmp_path / "b/corpus", ["id"]).to_pandas()
    assert sorted(again["id"]) == sorted(corpus["id"])


def test_units_cut_a_file_s_elements_by_elements_per_task_and_hash_the_reader_settings(tmp_path):
    """A long video is many units of consecutive frames, never two videos in one; the annotation's fps
    (like every reader setting) is part of the unit id."""
    from medisyn import storage
    from medisyn.config import load_config
    from medisyn.ingest.catalog import reading
    from medisyn.ingest.pipeline import plan_units

    out = list_entry(parsed(VIDEO), videos(tmp_path / "v"), CFG)
    cfg = load_config(DEMO, [f"run_dir={tmp_path / 'run'}", "ingest.elements_per_task=2"])
    units = plan_units(reading(parsed(VIDEO)), out.items, cfg, storage.path(tmp_path))
    assert [[it.index for it in u.items] for u in units] == [[0, 25], [50, 75], [0, 25], [0, 25], [50]]
    assert all(len({it.path for it in u.items}) == 1 for u in units)
    other = plan_units(
        reading(parsed(VIDEO, video=VIDEO["video"] | {"fps": 30})), out.items, cfg, storage.path(tmp_path)
    )
    assert not {u.id for u in units} & {u.id for u in other}
    with pytest.raises(ConfigError, match="elements_per_task"):
        load_config(DEMO, ["ingest.elements_per_task=0"])


def test_volume_channel_picks_the_4d_file_s_volume(tmp_path):
    """`volume.channel` reaches the reader (MSD Task01 is 4-D: FLAIR, T1w, t1gd, T2w) and the unit id."""
    from collections import Counter

    import numpy as np

    from medisyn import storage
    from medisyn.config import load_config
    from medisyn.ingest.catalog import reading
    from medisyn.ingest.pipeline import plan_units
    from medisyn.ingest.units import Item
    from medisyn.ingest.worker import _volume
    from medisyn.phantoms.formats import write_nifti

    vol = np.zeros((16, 16, 3, 2), np.float32)
    vol[2:6, 2:6, :, 0] = 100.0  # channel 0: a block top-left-ish; channel 1: one bottom-right
    vol[10:14, 10:14, :, 1] = 100.0
    write_nifti(tmp_path / "v.nii.gz", vol, np.eye(4))
    cfg = load_config(DEMO, [f"run_dir={tmp_path / 'run'}"])
    item = Item("msd/0", str(tmp_path / "v.nii.gz"), "msd", "p", "train", ("glioma",), "c")
    slices = {}
    for channel in (0, 1):
        entry = parsed(NIFTI, volume={"axis": 2, "mask": "", "channel": channel})
        (unit,) = plan_units(reading(entry), [item], cfg, storage.path(tmp_path))
        slices[channel] = [arr for arr, _ in _volume(item, unit.settings, item.path, Counter())]
        slices[f"id{channel}"] = unit.id
    assert len(slices[0]) == len(slices[1]) == 3 and not np.array_equal(slices[0][0], slices[1][0])
    assert slices["id0"] != slices["id1"]
    with pytest.raises(ConfigError, match=r"volume.channel: -1 must be >= 0"):
        parsed(NIFTI, volume={"channel": -1})
