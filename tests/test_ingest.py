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
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from conftest import flat
from PIL import Image

from medisyn.config import load_config
from medisyn.ingest.pipeline import _settings
from medisyn.ingest.pipeline import run as ingest
from medisyn.phantoms import PLANTED_MARKER

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


def _read_dir(folder: Path, columns=None) -> pd.DataFrame:
    frames = [pq.read_table(f, columns=columns).to_pandas() for f in sorted(folder.glob("*.parquet"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def test_every_item_is_accounted_for(ingested, demo_sources):
    """The demo's repositories, written as their publishers ship them, ingest through the paper catalog to
    what the phantoms promise per entry (phantoms.json): corpus and per-phrase counts, rejects, left out and
    captions from the entry's template; every listed file is in the corpus or in rejects (issue #35)."""
    from collections import Counter

    from medisyn.ingest.describe import load_catalog

    cfg, run_dir, summary = ingested
    info = json.loads((demo_sources / "phantoms.json").read_text())["repositories"]
    catalog = {e.name: e for e in load_catalog("paper")}
    corpus = _read_dir(
        run_dir / "corpus", ["id", "source", "source_ref", "split", "patient_id", "specialty", "image_type", "labels"]
    )
    corpus["caption"] = _read_dir(run_dir / "corpus", ["caption"])["caption"]
    rejects = _read_dir(run_dir / "rejects")
    assert set(corpus["source"]) == set(info) == set(cfg.ingest.source_entries) and not summary.get("skipped")
    for name, written in info.items():
        expect, rows = written["expect"], corpus[corpus["source"] == name]
        assert len(rows) == expect["corpus"], name
        assert Counter(p for labels in rows["labels"] for p in labels) == expect["classes"], name
        assert (rows["specialty"] == catalog[name].specialty).all() and (
            rows["image_type"] == written["image_type"]
        ).all()
        prefix = catalog[name].caption.split("{")[0]
        assert rows["caption"].str.startswith(prefix).all(), name
        mine = rejects[rejects["source_ref"].str.startswith(f"{name}/")]
        assert (mine["stage"] == "listing").sum() == expect["rejects"], name
        assert summary["left_out"].get(name, {}) == expect["left_out"], name
    acc = summary["accounting"]
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
    # every listed file is in the corpus or in rejects, by its privacy-safe reference, or was left out by a rule
    source_map = pq.read_table(run_dir / "private/source_map.parquet").to_pandas()
    seen = set(corpus["source_ref"].str.split("#").str[0]) | set(rejects["source_ref"].str.split("#").str[0])
    unseen = set(source_map["source_ref"]) - seen
    assert {r.split("/")[0] for r in unseen} <= {n for n, w in info.items() if w["expect"]["left_out"]}
    assert len(unseen) <= acc["left_out"]


def test_planted_defects_are_rejected_for_their_reason(ingested, demo_sources):
    """The mess planted in the published layouts: each bad file a reject with its reason (read or dedup), the
    UNK-only ISIC row left out by the catalog's rule; the per-entry reasons are what the phantoms promise."""
    from collections import Counter

    _, run_dir, summary = ingested
    phantoms = json.loads((demo_sources / "phantoms.json").read_text())
    source_map = pq.read_table(run_dir / "private/source_map.parquet").to_pandas()
    ref_of = {f"{s}/{p}": r for r, s, p in source_map[["source_ref", "source", "path"]].itertuples(index=False)}
    rejects = _read_dir(run_dir / "rejects")
    reason = rejects.set_index("source_ref")["reason"].to_dict()
    expected = {
        "truncated_dicom": "truncated pixel data",
        "dicom_without_pixel_data": "no pixel data",
        "duplicate_image": "exact duplicate of isic2019/",
        "not_a_tiff": "unreadable slide",
        "empty_file": "empty file (0 bytes)",
        "truncated_jpeg": "unreadable or truncated image",
    }
    planted = phantoms["defects"]
    assert {d["kind"] for d in planted} == set(expected) | {"unknown_label"}
    for d in planted:
        if d["kind"] == "unknown_label":  # a row with no phrase: left out under the catalog's rule, not read
            assert summary["left_out"]["isic2019"] == {"unmapped label (UNK)": 1}
        elif d["kind"] == "duplicate_image":  # dedup keeps one of the two, whichever its order meets first
            original = "isic2019/" + d["detail"].split("isic2019/")[1].split(" ")[0]
            pair = [ref_of[d["path"]], ref_of[original]]
            (dropped,) = [r for r in pair if r in reason]
            assert reason[dropped] == f"exact duplicate of {next(r for r in pair if r != dropped)}"
        else:
            assert expected[d["kind"]] in reason[ref_of[d["path"]]], d
    for name, info in phantoms["repositories"].items():
        mine = rejects[rejects["source_ref"].str.startswith(f"{name}/")]
        assert Counter(mine.loc[mine["stage"] == "read", "reason"]) == Counter(info["expect"].get("read_rejects", {}))
        dups = Counter(r.split(" of ")[0] for r in mine.loc[mine["stage"] == "dedup", "reason"])
        assert dups == Counter(info["expect"].get("duplicates", {})), name
    assert summary["duplicates"] == {"exact duplicate": 1}
    assert summary["background_patches"] == phantoms["repositories"]["camelyon16"]["expect"]["background"] > 0


def test_split_is_by_patient(ingested):
    """Each patient (study, lesion, video, slide) in one split; official splits as shipped (CBIS-DDSM's
    Test/Training, Kermany's folders, SAR-RARP50's train1/train2/test), the others by ingest's group hash."""
    _, run_dir, summary = ingested
    corpus = _read_dir(run_dir / "corpus", ["patient_id", "split", "source", "labels"])
    assert corpus.groupby("patient_id")["split"].nunique().max() == 1
    assert set(corpus.loc[corpus["source"].isin(["cbis-ddsm", "sar-rarp50"]), "split"]) == {"train", "test"}
    hashed = corpus[corpus["source"] == "busi"]  # every image its own group: the plain hash split
    frac = hashed.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert 0.6 < frac["train"] < 0.95
    # every class the audits and the reader study use has train and test images
    for name, by_split in summary["by_class"].items():
        if not name.startswith("X-ray:"):  # chest X-ray label combinations
            assert by_split["train"] > 0 and by_split["test"] > 0, (name, by_split)
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
    cxr = corpus[corpus.source == "chexpert"]
    assert any(" and " in c for c in cxr.caption)  # multi-label captions read naturally
    wsi = corpus[corpus.source == "camelyon16"]
    assert wsi.source_ref.str.contains("#level=").all() and wsi.source_ref.str.contains(",x=").all()
    # series: a salted hash of the file's folder; a CT series' slices share one, patients never do
    ct = corpus[corpus.source == "rspect"]
    assert ct.series.str.match(r"^rspect/[0-9a-f]{16}$").all() and ct.series.nunique() < len(ct)
    assert (ct.groupby("series").patient_id.nunique() == 1).all()
    assert corpus.series.notna().all()


def _identifiers(root: Path) -> set[str]:
    """What identifies a patient in the published layouts: id-like folder and file names (RSPECT's UIDs,
    CheXpert's patientNNNNN, ISIC and Kvasir ids, CBIS-DDSM case folders, slide and video names)."""
    catalog = (Path(__file__).resolve().parents[1] / "jobs/configs/sources/paper.yaml").read_text()
    out = set()
    for f in root.rglob("*"):
        if f.is_file() and not f.name.startswith((".", "phantoms.json")):
            for part in f.relative_to(root).parts[1:]:
                stem = part.split(".")[0]
                if len(stem) >= 6 and any(c.isdigit() for c in stem) and stem not in catalog:  # not a folder name
                    out.add(stem)
    return out


def test_no_identifier_in_any_output_byte(ingested, demo_sources, capfd):
    _, run_dir, _ = ingested
    needles = [PLANTED_MARKER.encode(), b"GENERAL HOSPITAL"] + [i.encode() for i in _identifiers(demo_sources)]
    assert len(needles) > 500
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
    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [f"run_dir={tmp_path / 'run'}", *flat(repos_file)])
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
    first = ingest(load_config(ROOT / "jobs/configs/demo.yaml", [f"run_dir={run_dir}", *flat(good)]))
    shards, rows = shard_files(run_dir / "corpus"), read_corpus(run_dir / "corpus", ["id"]).num_rows
    assert (run_dir / "corpus" / SHARD_LIST).is_file() and rows == first["pairs"]["total"] > 0
    cfg = load_config(ROOT / "jobs/configs/demo.yaml", [f"run_dir={run_dir}", *flat(bad)])
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

    cfg = load_config(
        ROOT / "jobs/configs/demo.yaml",
        ["ingest.max_pixels=1000", *flat(phantom_root / "repositories.yaml")],
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
    ray_cluster, s3_server, ingested, demo_sources, tmp_path, monkeypatch
):
    """Catalog entries read from s3:// (listed, tables and annotation files read and files fetched through
    medisyn.storage: JPEGs with a planted empty file, MATLAB v7.3 files, MP4 videos cut frame by frame) give
    the corpus a local read of the same files gives; a zero-byte file is still a reject, a missing object
    fails its unit."""
    from medisyn import storage
    from medisyn.ingest import pipeline
    from medisyn.ingest.catalog import load_sources, reading
    from medisyn.ingest.units import Item, Unit
    from medisyn.ingest.worker import SourceUnreadable, process_unit
    from medisyn.records import read_corpus

    def map_with_s3(key, rows, fn, max_tasks=0):
        """The session's Ray workers may predate the S3 server (a worker without its address fails its
        unit: NoCredentialsError); a cluster's nodes have their own credentials."""
        ds = ray_cluster.data.from_items([{key: r} for r in rows], override_num_blocks=max(len(rows), 1))
        return ds.map(fn, num_cpus=1, runtime_env={"env_vars": s3_server}).take_all() if rows else []

    monkeypatch.setattr(pipeline, "_ray_map", map_with_s3)
    names = ("kermany-oct", "figshare-brain-tumor", "cholec80")
    bucket = storage.path("s3://medisyn-test/sources")
    for name in names:
        storage.upload_dir(demo_sources / name, bucket / name)
    cfg = load_config(
        ROOT / "jobs/configs/demo.yaml",
        [
            f"run_dir={tmp_path / 'run'}",
            "phantoms.enabled=false",
            f"ingest.sources_root={storage.uri(bucket)}",
            f"ingest.source_entries=[{', '.join(names)}]",
        ],
    )
    summary = ingest(cfg)
    _, local_run, _ = ingested
    local = read_corpus(local_run / "corpus", ["id", "source", "source_ref"]).to_pandas()
    local = local[local.source.isin(names)]
    remote = read_corpus(tmp_path / "run/corpus", ["id", "source", "source_ref"]).to_pandas()
    assert len(remote) == summary["pairs"]["total"] > 100 and set(remote.source) == set(names)
    assert sorted(zip(remote.source_ref, remote.id, strict=True)) == sorted(
        zip(local.source_ref, local.id, strict=True)
    )
    source_map = pq.read_table(tmp_path / "run/private/source_map.parquet").to_pandas()
    assert not source_map.path.str.contains("s3:|medisyn-test").any()  # paths relative to the entry's folder
    rejects = _read_dir(tmp_path / "run/rejects")
    assert "empty file (0 bytes)" in set(rejects.reason)
    (oct_source,) = [s for s in load_sources(cfg.ingest) if s.entry.name == "kermany-oct"]
    item = Item(
        "kermany-oct/0", storage.uri(bucket / "kermany-oct/nothing.jpeg"), "kermany-oct", "p", "train", ("x",), "c."
    )
    with pytest.raises(SourceUnreadable, match="repository 'kermany-oct': source kermany-oct/0 could not be read"):
        process_unit(
            {"unit": Unit("u-s3", str(tmp_path / "staging"), _settings(reading(oct_source.entry), cfg), (item,))}
        )
    assert not (tmp_path / "staging/u-s3.json").exists()
    storage.remove_tree(bucket)
