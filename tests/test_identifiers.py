"""The caption side of privacy: identifier-like catalog text refused at load (entry and field named, never
the value), a DICOM whose person name is a word of its caption rejected, images per caption in the ingest
summary, and the memorization audit's flag rates by how many train images share the matched caption."""

from __future__ import annotations

import copy
from pathlib import Path

import pyarrow as pa
import pydicom
import pytest
import yaml

from medisyn.configtools import ConfigError
from medisyn.ingest.identifiers import identifier_kind

ROOT = Path(__file__).resolve().parents[1]
CT_SMALL = Path(pydicom.__file__).parent / "data/test_files/CT_small.dcm"

ENTRY = {
    "name": "e",
    "specialty": "radiology",
    "image_type": "X-ray",
    "reader": "image",
    "files": {"glob": "**/*.png"},
    "tables": [{"file": "labels.csv", "columns": ["file", "dx", "view"], "key": "{file}"}],
    "label": {"field": "dx", "classes": {"a": "alpha", "b": "beta"}},
    "caption_fields": {"v": {"field": "view", "map": {"PA": "frontal", "LL": "lateral"}}},
    "caption": "A {v} image at 40x showing {label}.",
}


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("seen on 2019-03-12", "a date"),
        ("study 2019/3/2", "a date"),
        ("follow-up 12/03/2019", "a date"),
        ("follow-up 3.12.19", "a date"),
        ("scan of March 2019", "a date"),
        ("scan of 12 Mar 2019", "a date"),
        ("scan of Sept. 4, 2021", "a date"),
        ("2020-Jan review", "a date"),
        ("MRN 0012345", "a run of 5 or more digits"),
        ("acquired 20190312", "a run of 5 or more digits"),
        ("ask jane.doe@example.org", "an email address"),
        ("see https://example.org/case", "a URL"),
        ("see www.example.org", "a URL"),
        ("pneumonia in [**Hospital1 18**]", "a de-identification placeholder"),
        ("XXXX opacity", "a de-identification placeholder"),
        ("effusion on ___", "a de-identification placeholder"),
        ("by [REDACTED]", "a de-identification placeholder"),
    ],
)
def test_each_rule_names_what_it_found(text, kind):
    assert identifier_kind(text) == kind


@pytest.mark.parametrize(
    "text",
    [
        "Histopathological lymph node image showing metastasis at 40x magnification.",
        "Frontal (AP) chest X-ray image showing {label}.",
        "a marginal mass in 2 of 4 views",  # "mar" of marginal is no month; no year after it
        "grade 3/4 retinopathy",
        "May-Thurner syndrome",
        "T2-weighted 1.5 T image",
        "Task01 BrainTumour",
    ],
)
def test_description_text_passes(text):
    assert identifier_kind(text) == ""


def _catalog(tmp_path, **changes) -> Path:
    raw = copy.deepcopy(ENTRY)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = raw
        for p in parents:
            node = node[p]
        node[key] = value
    path = tmp_path / "cat.yaml"
    path.write_text(yaml.safe_dump({"sources": [raw]}, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("change", "field", "value"),
    [
        ({"label__classes": {"a": "alpha", "b": "beta on 2019-03-12"}}, "label.classes (phrase 2 of 2)", "2019-03-12"),
        ({"caption_fields__v__map": {"PA": "film 0012345", "LL": "lateral"}}, "caption_fields.v.map (phrase 1 of 2)",
         "0012345"),
        ({"caption": "An image for jane@example.org showing {label}."}, "caption", "jane@example.org"),
        ({"label__classes": {"a": "[**Known lastname**]", "b": "beta"}}, "label.classes (phrase 1 of 2)", "lastname"),
    ],
)  # fmt: skip
def test_a_catalog_with_identifier_like_caption_text_is_refused_naming_entry_and_field(tmp_path, change, field, value):
    from medisyn.ingest.describe import load_catalog

    path = _catalog(tmp_path, **change)
    with pytest.raises(ConfigError) as err:
        load_catalog(str(path))
    message = str(err.value)
    assert message.startswith(f"cat.yaml: sources[0]: source 'e'.{field}: holds "), message
    assert value not in message and "\n" not in message
    assert load_catalog(str(_catalog(tmp_path)))[0].name == "e"  # the same entry without it loads


def test_a_lesion_phrase_is_checked_too():
    from medisyn.ingest.describe import parse_entry

    raw = copy.deepcopy(ENTRY) | {
        "reader": "wsi",
        "files": {"glob": "**/*.tif"},
        "caption_fields": {},
        "caption": "Patch showing {label}.",
        "lesions": {"annotations": "{stem}.xml", "positive": "alpha", "negative": "normal XXXX tissue"},
    }
    with pytest.raises(ConfigError, match=r"sources\[0\]: source 'e'.lesions.negative: holds a de-identification"):
        parse_entry(raw, "t.yaml: sources[0]")


def test_an_old_format_repository_with_identifier_like_text_is_refused_when_it_loads(tmp_path):
    from medisyn.ingest.config import IngestConfig
    from medisyn.ingest.listing import load_repositories

    repo = {"name": "photos", "kind": "image", "path": "photos", "glob": "*.png", "labels_csv": "labels.csv",
            "path_column": "file", "label_columns": ["dx"], "patient_column": "patient",
            "template": "Clinical image showing {label}.", "specialty": "dermatology",
            "image_type": "clinical images", "classes": {"ps": "psoriasis", "ec": "eczema"}}  # fmt: skip
    listed = tmp_path / "repositories.yaml"
    listed.write_text(yaml.safe_dump({"repositories": [repo]}))
    assert load_repositories(IngestConfig(repositories_file=str(listed)))[0][0].name == "photos"
    for change, field in (
        ({"classes": {"ps": "psoriasis", "ec": "eczema seen on 3 June 2021"}}, "classes (phrase 2 of 2)"),
        ({"template": "Clinical image (www.clinic.example) showing {label}."}, "template"),
    ):
        listed.write_text(yaml.safe_dump({"repositories": [repo | change]}, sort_keys=False))
        with pytest.raises(ConfigError) as err:
            load_repositories(IngestConfig(repositories_file=str(listed)))
        assert str(err.value).startswith(f"repository 'photos'.{field}: holds "), str(err.value)
        assert "2021" not in str(err.value) and "clinic" not in str(err.value)


def test_the_shipped_catalog_demo_and_phantom_repositories_pass():
    from medisyn.config import load_config
    from medisyn.configtools import build
    from medisyn.ingest.config import RepositoryConfig
    from medisyn.ingest.describe import load_catalog
    from medisyn.ingest.identifiers import check_repository, entry_texts
    from medisyn.phantoms.catalog import REPOSITORIES

    entries = load_catalog("paper")  # raises on the first identifier-like text
    assert len(entries) >= 18 and sum(1 for e in entries for _ in entry_texts(e)) > 100
    for name in ("demo", "demo-memorize", "paper"):
        cfg = load_config(ROOT / f"jobs/configs/{name}.yaml", [])
        if cfg.ingest.sources:
            load_catalog(cfg.ingest.sources, cfg.ingest.source_settings)  # the demo's overrides too
    for r in REPOSITORIES:  # the ingest.repositories format of the demo's phantoms
        check_repository(build(RepositoryConfig, r.ingest_entry(), r.name))


def _dicom(tmp_path: Path, patient: str, referring: str = "") -> Path:
    ds = pydicom.dcmread(CT_SMALL)
    ds.PatientName = patient
    ds.ReferringPhysicianName = referring
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.dcm"
    ds.save_as(path)
    return path


def test_a_dicom_whose_name_token_is_a_caption_word_is_rejected_without_the_name(tmp_path):
    from medisyn.ingest.pipeline import STAGING_FORMAT
    from medisyn.ingest.readers import Rejected, read_dicom
    from medisyn.ingest.units import Item, UnitSettings
    from medisyn.ingest.worker import _images

    caption = "Chest CT image showing a pulmonary embolism."
    assert read_dicom(_dicom(tmp_path, "Doe^Jane"), caption=caption)  # no token of the name in the caption
    assert read_dicom(_dicom(tmp_path, "Ct^Al"), caption=caption)  # tokens under 3 letters do not count
    for patient, referring in (("Embolism^Jane", ""), ("Doe^Jane", "PULMONARY^DR")):
        path = _dicom(tmp_path, patient, referring)
        with pytest.raises(Rejected) as err:
            read_dicom(path, caption=caption)
        assert err.value.reason == "caption holds a DICOM name token"
        assert read_dicom(path)  # without a caption (a header check alone) it reads
    # the worker passes the item's caption
    settings = UnitSettings(
        kind="dicom", specialty="radiology", image_type="computed tomography", frames="all", intensity="auto",
        size=64, png_compress_level=1, image_format="auto", window=(700, 100), pct=(0.5, 99.5), wsi_level=0,
        wsi_patch_size=512, wsi_overlap=0.0, wsi_tissue_fraction=0.5, row_group_rows=64, max_pixels=10**8,
        format=STAGING_FORMAT,
    )  # fmt: skip
    item = Item("ct/0", str(path), "ct", "p", "train", ("a pulmonary embolism",), caption)
    with pytest.raises(Rejected, match="^caption holds a DICOM name token$"):
        list(_images(item, settings))


def test_the_ingest_summary_counts_train_images_per_caption(tmp_path):
    from medisyn.ingest.summary import caption_counts, format_table, summarize
    from medisyn.records import CORPUS_SCHEMA, atomic_write_table, caption_share_bin

    assert [caption_share_bin(n) for n in (1, 2, 4, 5, 16, 17, 64, 65, 10**6)] == [
        "1", "2-4", "2-4", "5-16", "5-16", "17-64", "17-64", "65+", "65+"
    ]  # fmt: skip
    captions = ["c0"] * 70 + ["c1"] * 20 + ["c2"] * 3 + ["c3", "c4"]
    rows = [
        {"id": f"i{n}", "image": b"", "caption": c, "specialty": "radiology", "image_type": "X-ray",
         "labels": ["x"], "patient_id": "p", "split": "train", "source": "s", "source_ref": f"s/{n:016x}",
         "original_size": [8, 8], "crop_top_left": [0, 0]}
        for n, c in enumerate(captions)
    ]  # fmt: skip
    rows += [rows[0] | {"id": "v0", "caption": "only in val", "split": "val"}]  # other splits are not counted
    (tmp_path / "corpus").mkdir()
    atomic_write_table(pa.Table.from_pylist(rows, CORPUS_SCHEMA), tmp_path / "corpus/a.parquet")
    summary = summarize(tmp_path / "corpus", tmp_path / "rejects", [], files=len(rows))
    assert summary["captions"] == {
        "split": "train",
        "distinct": 5,
        "top": [["c0", 70], ["c1", 20], ["c2", 3], ["c3", 1], ["c4", 1]],
        "histogram": {"1": 2, "2-4": 1, "5-16": 0, "17-64": 1, "65+": 1},
    }
    assert len(caption_counts([f"c{n}" for n in range(30)])["top"]) == 10
    text = format_table(summary)
    assert "train images per caption: 5 distinct captions" in text and "      70  c0" in text


def test_memorization_flags_are_binned_by_how_many_train_images_share_the_matched_caption():
    from medisyn.audit.memorization import by_caption_share

    train = {f"u{n}": "unique" if n == 0 else ("pair" if n < 3 else "common") for n in range(40)}  # 1, 2, 37

    def pair(kind, match, flagged):
        return {"kind": kind, "id": "q", "match_id": match, "flagged": flagged}

    s = "synthetic:s"
    pairs = [pair(s, "u0", True), pair(s, "u1", False), pair(s, "u2", True), pair(s, "u5", True),
             pair(s, "u6", False), pair("control:test", "u7", False)]  # fmt: skip
    assert by_caption_share(pairs, train) == {
        "control:test": {"17-64": {"pairs": 1, "flagged": 0, "flagged_pct": 0.0}},
        "synthetic:s": {
            "1": {"pairs": 1, "flagged": 1, "flagged_pct": 100.0},
            "2-4": {"pairs": 2, "flagged": 1, "flagged_pct": 50.0},
            "17-64": {"pairs": 2, "flagged": 1, "flagged_pct": 50.0},
        },
    }
