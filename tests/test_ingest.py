"""Ingest end to end on the phantom repositories and on planted bad files (Ray Data, 2 CPUs).

Accounting (nothing lost), planted defects (each in rejects for the right reason), the
patient-level split, privacy (no planted header value or patient id in any output byte),
and resume (a re-run adds nothing; a lost shard is remade identically).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image

from medisyn.config import load_config
from medisyn.ingest.pipeline import run as ingest
from medisyn.phantoms import PLANTED_MARKER

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def _read_dir(folder: Path, columns=None) -> pd.DataFrame:
    frames = [pq.read_table(f, columns=columns).to_pandas() for f in sorted(folder.glob("*.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _expected_items(phantom_root: Path, cfg) -> int:
    """Images the sources hold, counted independently of ingest: frames, files, patch positions."""
    n = 0
    for f in phantom_root.rglob("*"):
        if not f.is_file() or f.suffix not in (".dcm", ".png", ".jpg", ".tiff"):
            continue
        try:
            if f.suffix == ".dcm":
                n += int(pydicom.dcmread(f, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
            elif f.suffix == ".tiff":
                with openslide.OpenSlide(f) as s:
                    w, h = s.level_dimensions[0]
                p = cfg.ingest.wsi_patch_size
                n += (w // p) * (h // p)
            else:
                n += 1
        except Exception:
            n += 1  # an unreadable file is one reject
    return n


def test_every_item_is_accounted_for(ingested, phantom_root):
    cfg, run_dir, summary = ingested
    acc = summary["accounting"]
    listing_orphans = 0  # label rows without a file would be rejects too; the phantoms have none
    assert (
        acc["corpus"] + acc["duplicates"] + acc["rejected"] + acc["background"]
        == _expected_items(phantom_root, cfg) + listing_orphans
    )
    corpus = _read_dir(run_dir / "corpus", ["id", "source_ref", "split", "patient_id", "specialty", "image_type"])
    assert len(corpus) == acc["corpus"] == summary["pairs"]["total"] > 400
    assert corpus["id"].is_unique and corpus["source_ref"].is_unique
    assert set(corpus["specialty"]) == {
        "radiology",
        "dermatology",
        "pathology",
        "ophthalmology",
        "surgery",
        "gastroenterology",
    }
    assert len(set(corpus["image_type"])) == 10
    # every listed file is in the corpus or in rejects, by its privacy-safe reference
    source_map = pq.read_table(run_dir / "private/source_map.parquet").to_pandas()
    rejects = _read_dir(run_dir / "rejects")
    seen = set(corpus["source_ref"].str.split("#").str[0]) | set(rejects["source_ref"].str.split("#").str[0])
    wsi_background_only = set()  # a slide whose patches were all background would be in neither
    assert set(source_map["source_ref"]) - seen == wsi_background_only


def test_planted_defects_are_rejected_for_their_reason(ingested, phantom_root):
    _, run_dir, summary = ingested
    planted = json.loads((phantom_root / "phantoms.json").read_text())["defects"]
    source_map = pq.read_table(run_dir / "private/source_map.parquet").to_pandas()
    ref_of = {f"{s}/{p}": r for r, s, p in source_map[["source_ref", "source", "path"]].itertuples(index=False)}
    rejects = _read_dir(run_dir / "rejects").set_index("source_ref")["reason"].to_dict()
    expected = {
        "truncated_dicom": "truncated pixel data",
        "dicom_without_pixel_data": "no pixel data",
        "duplicate_image": "exact duplicate of",
        "unknown_label": "label in column 'diagnosis' not in the classes",
        "not_a_tiff": "unreadable slide",
        "empty_file": "empty file (0 bytes)",
        "unlabelled_image": "missing label",
    }
    assert {d["kind"] for d in planted} == set(expected)
    for d in planted:
        assert expected[d["kind"]] in rejects[ref_of[d["path"]]], d
    assert summary["duplicates"] == {"exact duplicate": 1}
    assert summary["background_patches"] > 0


def test_split_is_by_patient(ingested):
    _, run_dir, summary = ingested
    corpus = _read_dir(run_dir / "corpus", ["patient_id", "split", "source"])
    assert corpus.groupby("patient_id")["split"].nunique().max() == 1
    hashed = corpus[corpus["source"] == "breast-us"]  # the one repository without an official split column
    frac = hashed.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert 0.6 < frac["train"] < 0.95
    # the official split columns are stratified: every split holds every class of the other repositories
    for name, by_split in summary["by_class"].items():
        if not name.startswith(("ultrasound", "X-ray:")):  # breast-us (hash split); chest X-ray label combinations
            assert all(by_split[s] > 0 for s in ("train", "val", "test")), (name, by_split)
    for specialty, by_split in summary["by_specialty"].items():
        assert all(by_split[s] > 0 for s in ("train", "val", "test")), (specialty, by_split)
    # the report's specialty x image type x split table adds up to the marginals
    cells = summary["by_specialty_image_type"]
    assert len(cells) == 11 and "gastroenterology / endoscopy" in cells and "surgery / endoscopy" in cells
    for specialty, by_split in summary["by_specialty"].items():
        assert by_split == {
            k: sum(c[k] for name, c in cells.items() if name.startswith(f"{specialty} /")) for k in by_split
        }


def test_corpus_records(ingested):
    _, run_dir, _ = ingested
    corpus = _read_dir(run_dir / "corpus")
    for row in corpus.sample(40, random_state=0).itertuples():
        im = Image.open(io.BytesIO(row.image))
        assert im.size == (512, 512) and im.mode in ("L", "RGB")
        assert im.format in ("PNG", "WEBP") and (im.mode == "L") == (im.format == "PNG")
        assert not {"exif", "xmp", "icc_profile", "text", "comment", "Description"} & set(im.info), (
            im.info
        )  # no metadata
        assert row.caption.endswith(".") and all(label in row.caption for label in row.labels)
        assert len(row.original_size) == 2 and len(row.crop_top_left) == 2
    cxr = corpus[corpus.source == "chest-xray"]
    assert any(" and " in c for c in cxr.caption)  # multi-label captions read naturally
    wsi = corpus[corpus.source == "lymph-node-wsi"]
    assert wsi.source_ref.str.contains("#level=0,x=").all()
    # series: a salted hash of the file's folder; a CT series' slices share one, patients never do
    ct = corpus[corpus.source == "ctpa"]
    assert ct.series.str.match(r"^ctpa/[0-9a-f]{16}$").all() and ct.series.nunique() < len(ct)
    assert (ct.groupby("series").patient_id.nunique() == 1).all()
    assert corpus.series.notna().all()


def test_no_identifier_in_any_output_byte(ingested, phantom_root, capfd):
    _, run_dir, _ = ingested
    patient_ids = set()
    for csv in phantom_root.rglob("*.csv"):
        table = pd.read_csv(csv, dtype=str)
        patient_ids |= set(table["patient_id"].dropna())
    needles = [PLANTED_MARKER.encode(), b"GENERAL HOSPITAL"] + [p.encode() for p in patient_ids]
    assert len(needles) > 100
    outputs = [f for f in run_dir.rglob("*") if f.is_file() and "private" not in f.parts]
    assert len(outputs) > 40
    for f in outputs:
        data = f.read_bytes()
        for needle in needles:
            assert needle not in data, (f.name, needle)
    out, err = capfd.readouterr()
    for needle in needles:
        assert needle.decode() not in out + err


def test_rerun_resumes_without_duplicating(ingested):
    cfg, run_dir, summary = ingested
    before = {f.name: f.read_bytes() for f in (run_dir / "corpus").glob("*.parquet")}
    victim = sorted(before)[3]
    (run_dir / "corpus" / victim).unlink()  # a lost corpus shard
    (run_dir / "ingest/staging" / victim.replace(".parquet", ".json")).unlink()  # and its unit unfinished
    again = ingest(cfg)
    after = {f.name: f.read_bytes() for f in (run_dir / "corpus").glob("*.parquet")}
    assert set(after) == set(before)

    def ids(blob):
        return pq.read_table(io.BytesIO(blob), columns=["id"]).column("id").to_pylist()

    assert ids(after[victim]) == ids(before[victim])
    assert again["accounting"] == summary["accounting"]

    # outputs cut short after a finished run: a staging shard (its marker says done) and a
    # corpus shard (its fingerprint is current) are both redone, whole and equal, not trusted
    staged, final = sorted(before)[1], sorted(before)[5]
    for f in (run_dir / "ingest/staging" / staged, run_dir / "corpus" / final):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    third = ingest(cfg)
    after = {f.name: f.read_bytes() for f in (run_dir / "corpus").glob("*.parquet")}
    assert set(after) == set(before) and third["accounting"] == summary["accounting"]
    for name in (staged, final):
        assert ids(after[name]) == ids(before[name])


def _write_bad_repos(root: Path) -> Path:
    """Three tiny repositories of files that must all be rejected, and one good image."""
    data = (Path(pydicom.__file__).parent / "data/test_files/CT_small.dcm").read_bytes()
    d = root / "bad-dicom"
    d.mkdir(parents=True)
    (d / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (d / "zero.dcm").write_bytes(b"")
    (d / "text.dcm").write_text("patient notes, definitely not DICOM\n" * 20)
    ds = pydicom.dcmread(Path(pydicom.__file__).parent / "data/test_files/CT_small.dcm")
    del ds.PixelData
    ds.save_as(d / "nopixels.dcm")
    pd.DataFrame(
        {
            "path": ["truncated.dcm", "zero.dcm", "text.dcm", "nopixels.dcm"],
            "pid": ["a", "b", "c", "d"],
            "label": ["1"] * 4,
        }
    ).to_csv(d / "labels.csv", index=False)
    i = root / "bad-images"
    i.mkdir()
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(i / "good.png")
    (i / "corrupt.png").write_bytes((i / "good.png").read_bytes()[:60])
    pd.DataFrame({"path": ["good.png", "corrupt.png"], "pid": ["e", "f"], "label": ["1", "1"]}).to_csv(
        i / "labels.csv", index=False
    )
    w = root / "bad-slides"
    w.mkdir()
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(w / "flat.tiff")  # a plain (untiled) TIFF: not a slide
    (w / "garbage.tiff").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    pd.DataFrame({"path": ["flat.tiff", "garbage.tiff"], "pid": ["g", "h"], "label": ["1", "1"]}).to_csv(
        w / "labels.csv", index=False
    )
    common = dict(
        path_column="path",
        label_columns=["label"],
        patient_column="pid",
        labels_csv="labels.csv",
        classes={"1": "a finding"},
        template="Test image showing {label}.",
    )
    repos = [
        dict(
            name="bad-dicom",
            kind="dicom",
            path="bad-dicom",
            glob="*.dcm",
            specialty="radiology",
            image_type="computed tomography",
            **common,
        ),
        dict(
            name="bad-images",
            kind="image",
            path="bad-images",
            glob="*.png",
            specialty="dermatology",
            image_type="dermoscopy",
            **common,
        ),
        dict(
            name="bad-slides",
            kind="wsi",
            path="bad-slides",
            glob="*.tiff",
            specialty="pathology",
            image_type="microscopy",
            **common,
        ),
    ]
    import yaml

    (root / "repositories.yaml").write_text(yaml.safe_dump({"repositories": repos}))
    return root / "repositories.yaml"


def test_bad_files_all_land_in_rejects(ray_cluster, tmp_path):
    repos_file = _write_bad_repos(tmp_path / "src")
    cfg = load_config(
        ROOT / "jobs/configs/demo.yaml", [f"run_dir={tmp_path / 'run'}", f"ingest.repositories_file={repos_file}"]
    )
    summary = ingest(cfg)
    rejects = _read_dir(tmp_path / "run/rejects")
    source_map = pq.read_table(tmp_path / "run/private/source_map.parquet").to_pandas().set_index("source_ref")["path"]
    reasons = {source_map[r]: why for r, why in zip(rejects.source_ref, rejects.reason, strict=True)}
    assert reasons["truncated.dcm"] == "truncated pixel data"
    assert reasons["zero.dcm"] == "empty file (0 bytes)"
    assert reasons["text.dcm"] == "not DICOM"
    assert reasons["nopixels.dcm"] == "no pixel data"
    assert reasons["corrupt.png"].startswith("unreadable or truncated image")
    assert reasons["garbage.tiff"].startswith("unreadable slide")
    assert reasons["flat.tiff"].startswith("unreadable slide")
    assert summary["pairs"]["total"] == 1 and summary["accounting"]["rejected"] == 7


def test_an_all_rejecting_rerun_keeps_the_previous_corpus(ray_cluster, phantom_root, tmp_path):
    """The corpus a stage publishes stays in force until a rerun succeeds (issue: `ingest.size=0`
    rejected every image and deleted the previous corpus)."""
    import yaml

    from medisyn.configtools import ConfigError
    from medisyn.records import SHARD_LIST, read_corpus, shard_files

    doc = yaml.safe_load((phantom_root / "repositories.yaml").read_text())
    (repo,) = [dict(r, path=str(phantom_root / r["path"])) for r in doc["repositories"] if r["name"] == "brain-mri"]
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump({"repositories": [repo]}))
    bad.write_text(yaml.safe_dump({"repositories": [dict(repo, glob="*/*.nothing")]}))  # every label row unmatched
    run_dir = tmp_path / "run"
    first = ingest(
        load_config(ROOT / "jobs/configs/demo.yaml", [f"run_dir={run_dir}", f"ingest.repositories_file={good}"])
    )
    shards, rows = shard_files(run_dir / "corpus"), read_corpus(run_dir / "corpus", ["id"]).num_rows
    assert (run_dir / "corpus" / SHARD_LIST).is_file() and rows == first["pairs"]["total"] > 0
    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [f"run_dir={run_dir}", f"ingest.repositories_file={bad}"])
    with pytest.raises(
        ConfigError, match=r"every image was rejected .*no such file matches.*previous corpus \(\d+ shards\) is kept"
    ):
        ingest(cfg)
    assert shard_files(run_dir / "corpus") == shards and read_corpus(run_dir / "corpus", ["id"]).num_rows == rows


def test_sources_above_max_pixels_are_rejected_from_their_header(phantom_root, tmp_path):
    """A tiny deflated DICOM or PNG can decode to gigabytes: the header decides, before any decode."""
    import numpy as np
    import pydicom

    from medisyn.ingest.readers import Rejected, read_dicom, read_image
    from medisyn.ingest.units import Item
    from medisyn.ingest.worker import _images

    ct = sorted((phantom_root / "ctpa").rglob("*.dcm"))[5]
    header = pydicom.dcmread(ct, stop_before_pixels=True)
    n = int(header.Rows) * int(header.Columns)
    assert read_dicom(ct, max_pixels=n)  # at the limit: read
    with pytest.raises(Rejected, match=rf"too many pixels \({n:,} > ingest.max_pixels {n - 1:,}\)"):
        read_dicom(ct, max_pixels=n - 1)
    png = tmp_path / "big.png"
    Image.fromarray(np.zeros((400, 300), np.uint16)).save(png)
    assert read_image(png, max_pixels=120_000)[0].shape == (400, 300)
    with pytest.raises(Rejected, match=r"too many pixels \(120,000 > ingest.max_pixels 119,999\)"):
        read_image(png, max_pixels=119_999)
    # the config value reaches the worker through the unit settings
    from medisyn.ingest.listing import load_repositories
    from medisyn.ingest.pipeline import _settings

    cfg = load_config(
        ROOT / "jobs/configs/demo.yaml",
        ["ingest.max_pixels=1000", f"ingest.repositories_file={phantom_root / 'repositories.yaml'}"],
    )
    (repo,) = [r for r, _ in load_repositories(cfg.ingest) if r.name == "ctpa"]
    item = Item("ctpa/x", str(ct), "ctpa", "p", "train", ("a",), "c.")
    with pytest.raises(Rejected, match="too many pixels"):
        list(_images(item, _settings(repo, cfg)))
