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


def test_corpus_is_compacted_into_shards_of_shard_rows_with_an_index(ingested):
    """ingest.shard_rows (demo: 128) sizes the corpus shards, not the units (64 here); the index
    lists every row in corpus order with its shard, row group and row."""
    from medisyn.records import INDEX_SCHEMA, index_file, shard_files

    cfg, run_dir, summary = ingested
    shards = shard_files(run_dir / "corpus")
    total = summary["pairs"]["total"]
    assert cfg.ingest.shard_rows == 128 and len(shards) == -(-total // 128)
    assert len(list((run_dir / "ingest/staging").glob("*.json"))) > 3 * len(shards)
    metas = [pq.ParquetFile(p).metadata for p in shards]
    assert [m.num_rows for m in metas[:-1]] == [128] * (len(shards) - 1) and sum(m.num_rows for m in metas) == total
    groups = [m.row_group(g).num_rows for m in metas for g in range(m.num_row_groups)]
    assert max(groups) == cfg.ingest.shard_row_group_rows == 16
    index = pq.read_table(index_file(run_dir / "corpus"))
    assert index.schema.equals(INDEX_SCHEMA) and index.num_rows == total
    ids = [i for p in shards for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    assert index.column("id").to_pylist() == ids
    assert set(index.column("shard").to_pylist()) == {p.name for p in shards}
    assert len(shard_files(run_dir / "rejects")) == len(shards) + 1  # the shards' rejects and the listing's


def test_rerun_resumes_without_duplicating(ingested):
    cfg, run_dir, summary = ingested
    corpus = run_dir / "corpus"

    def files():
        return {
            f.relative_to(corpus).as_posix(): (f.read_bytes(), f.stat().st_mtime_ns)
            for f in corpus.rglob("*")
            if f.is_file()
        }

    before = files()
    assert ingest(cfg)["accounting"] == summary["accounting"]
    assert files() == before  # a rerun that changes nothing rewrites nothing: shards, index, shard list
    shards = sorted(n for n in before if n.startswith("part-"))
    assert len(shards) >= 3 and sum(n.startswith("_index/") for n in before) == 1
    victim = shards[1]
    (corpus / victim).unlink()  # a lost corpus shard
    sorted((run_dir / "ingest/staging").glob("*.json"))[3].unlink()  # and a unit unfinished
    again = ingest(cfg)
    after = files()
    assert set(after) == set(before) and again["accounting"] == summary["accounting"]
    assert after[victim][0] == before[victim][0]  # remade identically
    assert {n: v for n, v in after.items() if n != victim} == {n: v for n, v in before.items() if n != victim}

    # outputs cut short after a finished run: a staging shard (its marker says done) and a
    # corpus shard (its name is current) are both redone, whole and equal, not trusted
    staged = run_dir / "ingest/staging" / (sorted((run_dir / "ingest/staging").glob("*.json"))[2].stem + ".parquet")
    for f in (staged, corpus / shards[2]):
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    third = ingest(cfg)
    after = files()
    assert set(after) == set(before) and third["accounting"] == summary["accounting"]
    assert {n: v[0] for n, v in after.items()} == {n: v[0] for n, v in before.items()}


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


def test_a_source_that_cannot_be_read_fails_its_unit_not_the_file(ray_cluster, tmp_path):
    """A missing file (a node without the mount) is no reject: the unit writes no marker, so the next
    run reads it again, and the stage stops with one line naming the repository and the file's ref."""
    from medisyn.configtools import ConfigError
    from medisyn.ingest.pipeline import STAGING_FORMAT, _read_units
    from medisyn.ingest.units import Item, Unit, UnitSettings
    from medisyn.ingest.worker import SourceUnreadable, process_unit

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    pixels = dict(frames="all", intensity="auto", size=64, png_compress_level=1, image_format="auto")
    settings = UnitSettings(
        kind="image", specialty="dermatology", image_type="dermoscopy", window=(700, 100), pct=(0.5, 99.5),
        wsi_level=0, wsi_patch_size=512, wsi_overlap=0.0, wsi_tissue_fraction=0.5, row_group_rows=64,
        max_pixels=10**8, format=STAGING_FORMAT, **pixels,
    )  # fmt: skip

    def unit(uid, *names):
        items = [
            Item(f"derm/{i:016x}", str(tmp_path / n), "derm", "p", "train", ("x",), "c.") for i, n in enumerate(names)
        ]
        return Unit(uid, str(tmp_path / "staging"), settings, tuple(items))

    counts = process_unit({"unit": unit("u-ok", "good.png", "empty.png")})  # bad bytes stay a reject
    assert (counts["accepted"], counts["rejected"]) == (1, 1) and (tmp_path / "staging/u-ok.json").exists()
    gone = tmp_path / "unmounted" / "LEAKCANARY-patient.png"
    with pytest.raises(SourceUnreadable, match=r"repository 'derm': source derm/0000000000000001 .*FileNotFoundError"):
        process_unit({"unit": unit("u-gone", "good.png", str(gone))})
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == [
        "u-ok.json",
        "u-ok.parquet",
        "u-ok.rejects.parquet",
    ]  # no marker, no shard: nothing of the failed unit
    with pytest.raises(ConfigError, match=r"^ingest: repository 'derm': source derm/0+1 could not be read") as err:
        _read_units([unit("u-gone", "good.png", str(gone))], 0)
    assert "LEAKCANARY" not in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "staging/u-gone.json").exists()


def test_repositories_in_a_bucket_ingest_to_the_same_corpus(
    ray_cluster, s3_server, ingested, phantom_root, tmp_path, monkeypatch
):
    """Repositories read from s3:// (listed, label CSVs read and files fetched through medisyn.storage)
    give the corpus a local read of the same files gives; a zero-byte file is still a reject, a
    missing object fails its unit."""
    import yaml

    from medisyn import storage
    from medisyn.ingest import pipeline

    def map_with_s3(key, rows, fn, max_tasks=0):
        """The session's Ray workers may predate the S3 server (a worker without its address fails its
        unit: NoCredentialsError); a cluster's nodes have their own credentials."""
        ds = ray_cluster.data.from_items([{key: r} for r in rows], override_num_blocks=max(len(rows), 1))
        return ds.map(fn, num_cpus=1, runtime_env={"env_vars": s3_server}).take_all() if rows else []

    monkeypatch.setattr(pipeline, "_ray_map", map_with_s3)
    from medisyn.ingest.listing import load_repositories
    from medisyn.ingest.pipeline import _settings
    from medisyn.ingest.units import Item, Unit
    from medisyn.ingest.worker import SourceUnreadable, process_unit
    from medisyn.records import read_corpus

    names = ("oct", "brain-mri")  # PNGs with a planted empty file; DICOM series
    bucket = storage.path("s3://medisyn-test/sources")
    doc = yaml.safe_load((phantom_root / "repositories.yaml").read_text())
    repos = [r for r in doc["repositories"] if r["name"] in names]  # paths relative to the file: to the bucket
    storage.write_bytes(yaml.safe_dump({"repositories": repos}).encode(), bucket / "repositories.yaml")
    for name in names:
        storage.upload_dir(phantom_root / name, bucket / name)
    cfg = load_config(
        ROOT / "jobs/configs/demo.yaml",
        [f"run_dir={tmp_path / 'run'}", f"ingest.repositories_file={storage.uri(bucket / 'repositories.yaml')}"],
    )
    summary = ingest(cfg)
    _, local_run, _ = ingested
    local = read_corpus(local_run / "corpus", ["id", "source", "source_ref"]).to_pandas()
    local = local[local.source.isin(names)]
    remote = read_corpus(tmp_path / "run/corpus", ["id", "source", "source_ref"]).to_pandas()
    assert len(remote) == summary["pairs"]["total"] > 20
    assert sorted(zip(remote.source_ref, remote.id, strict=True)) == sorted(
        zip(local.source_ref, local.id, strict=True)
    )
    source_map = pq.read_table(tmp_path / "run/private/source_map.parquet").to_pandas()
    assert not source_map.path.str.contains("s3:|medisyn-test").any()  # paths relative to the repository
    rejects = _read_dir(tmp_path / "run/rejects")
    assert "empty file (0 bytes)" in set(rejects.reason)
    (repo,) = [r for r, _ in load_repositories(cfg.ingest) if r.name == "oct"]
    item = Item("oct/0", storage.uri(bucket / "oct/nothing.png"), "oct", "p", "train", ("x",), "c.")
    with pytest.raises(SourceUnreadable, match="repository 'oct': source oct/0 could not be read"):
        process_unit({"unit": Unit("u-s3", str(tmp_path / "staging"), _settings(repo, cfg), (item,))})
    assert not (tmp_path / "staging/u-s3.json").exists()
    storage.remove_tree(bucket)
