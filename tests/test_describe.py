"""The source description language (ingest/describe.py) and its steps (ingest/steps.py), on tiny
folders written here: every field and option changes what list_entry gives, and every listed file
ends as an item, a reject or a left-out count. No Ray, no pixels (empty files)."""

from __future__ import annotations

import copy

import pytest

from medisyn import storage
from medisyn.configtools import ConfigError
from medisyn.ingest import steps
from medisyn.ingest.config import IngestConfig
from medisyn.ingest.describe import load_catalog, parse_entry
from medisyn.ingest.split import patient_hash, split_for
from medisyn.ingest.steps import list_entry, rank

CFG = IngestConfig()
BASE = {
    "name": "e",
    "specialty": "radiology",
    "image_type": "X-ray",
    "reader": "image",
    "files": {"glob": "**/*.png"},
    "tables": [{"file": "labels.csv", "columns": ["file", "dx"], "key": "{file}"}],
    "label": {"field": "dx", "classes": {"a": "alpha", "b": "beta"}},
    "caption": "An image showing {label}.",
}


def entry(**over):
    raw = copy.deepcopy(BASE)
    for key, value in over.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return parse_entry(raw, "t.yaml: sources[0]")


def write(root, files: list[str], table: str | bytes | None = None, table_name: str = "labels.csv"):
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    if table is not None:
        (root / table_name).write_bytes(table if isinstance(table, bytes) else table.encode())
    return root


def listed(e, root, cfg=CFG, orphans: int = 0):
    """list_entry, with the invariant: items + rejects + left out == files listed + rows without a file."""
    out = list_entry(e, root, cfg)
    n_files = len(steps.glob_files(storage.path(root), e.files.glob))
    assert len(out.items) + len(out.rejects) + sum(out.left_out.values()) == n_files + orphans
    return out


def captions(out) -> dict[str, str]:
    rel = out.source_map
    return {rel[it.ref]: it.caption for it in out.items}


def reasons(out) -> list[str]:
    return sorted(r["reason"] for r in out.rejects)


# --- files, templates, tables --------------------------------------------------------------------------------------


def test_key_templates_and_file_regex_fields(tmp_path):
    """An id column meets files through a path template; a regex group of the path is a field (the view)."""
    write(tmp_path, ["train_images/a1_frontal.png", "train_images/b2_lateral.png"], "id_code,dx\na1,a\nb2,b\n")
    e = entry(
        files={"glob": "train_images/*.png", "regex": r"(?P<id>[^/]+)_(?P<view>frontal|lateral)\.png$", "key": "{id}"},
        tables=[{"file": "labels.csv", "columns": ["id_code", "dx"], "key": "{id_code}"}],
        caption="A {view} image showing {label}.",
        caption_fields={"view": {"field": "view", "map": {"frontal": "frontal", "lateral": "side"}}},
    )
    assert captions(listed(e, tmp_path)) == {
        "train_images/a1_frontal.png": "A frontal image showing alpha.",
        "train_images/b2_lateral.png": "A side image showing beta.",
    }
    e2 = entry(tables=[{"file": "labels.csv", "columns": ["id_code", "dx"], "key": "train_images/{id_code}_x.png"}])
    with pytest.raises(ConfigError, match=r"source 'e': tables\[0\]\.key 'train_images/\{id_code\}_x\.png' matches no"):
        list_entry(e2, tmp_path, CFG)


def test_labels_from_folders_excludes_counted_and_regex_misses_rejected(tmp_path):
    """No table: labels from folder names; excluded masks are left out by reason; a path the regex
    does not match is a reject."""
    write(
        tmp_path,
        [
            "D/benign/benign (1).png",
            "D/benign/benign (1)_mask.png",
            "D/malignant/m (2).png",
            "x_mask.png",
            "D/odd/o.png",
        ],
    )
    e = entry(
        tables=None,
        files={
            "glob": "**/*.png",
            "exclude": {"segmentation mask": "**/*_mask*.png"},
            "regex": r"(?P<cls>benign|malignant)/",
        },
        label={"field": "cls", "classes": {"benign": "benign lesion", "malignant": "malignant lesion"}},
    )
    out = listed(e, tmp_path)
    assert out.left_out == {"segmentation mask": 2}
    assert sorted(captions(out).values()) == ["An image showing benign lesion.", "An image showing malignant lesion."]
    assert reasons(out) == ["path does not match files.regex"]


def test_links_leaving_the_root_and_non_utf8_names_are_rejects(tmp_path):
    import os

    root = write(tmp_path / "e", ["a.png"], "file,dx\na.png,a\n")
    write(tmp_path, ["outside.png"])
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    open(os.path.join(os.fsencode(root), b"bad\xff.png"), "wb").close()
    out = listed(entry(), root)
    assert len(out.items) == 1
    assert reasons(out) == [
        "file name is not valid UTF-8",
        "outside the repository root (a symbolic link that leaves it)",
    ]


@pytest.mark.parametrize("policy", ["reject", "leave_out"])
def test_unlisted_files_and_rows_without_files(tmp_path, policy):
    write(tmp_path, ["a.png", "b.png", "c.png"], "file,dx\na.png,a\nb.png,b\nmissing.png,a\n")
    out = listed(entry(unlisted=policy), tmp_path, orphans=1)
    assert len(out.items) == 2
    if policy == "reject":
        assert reasons(out) == ["listed in labels.csv but no such file", "no row in labels.csv"]
        assert out.left_out == {}
    else:
        assert reasons(out) == ["listed in labels.csv but no such file"]
        assert out.left_out == {"unlabelled (no row in labels.csv)": 1}


def test_tables_concatenate_with_set_constants_and_the_split_map(tmp_path):
    write(tmp_path, ["train/a.png", "valid/b.png", "valid/c.png"])
    (tmp_path / "train.csv").write_text("Path,dx\ntrain/a.png,a\n")
    (tmp_path / "valid.csv").write_text("Path,dx\nvalid/b.png,b\nvalid/c.png,a\n")
    tables = [
        {"file": "train.csv", "columns": ["Path", "dx"], "key": "{Path}", "set": {"subset": "train"}},
        {"file": "valid.csv", "columns": ["Path", "dx"], "key": "{Path}", "set": {"subset": "valid"}},
    ]
    out = listed(entry(tables=tables, split={"field": "subset", "map": {"train": "train", "valid": "val"}}), tmp_path)
    assert {out.source_map[it.ref]: it.split for it in out.items} == {
        "train/a.png": "train",
        "valid/b.png": "val",
        "valid/c.png": "val",
    }
    out = listed(entry(tables=tables, split={"field": "subset", "map": {"train": "train"}}), tmp_path)
    assert len(out.items) == 1 and reasons(out) == ["value in split field 'subset' not in split.map"] * 2


def test_table_regex_groups_become_row_fields(tmp_path):
    """CBIS-DDSM: the case folder and the series UID, cut from a path column, meet the file's regex
    fields; the case also gives the patient id."""
    files = [
        "CBIS/Mass-Training_P_00001_LEFT_CC/07-20/1.0-full-245/1-1.dcm",
        "CBIS/Mass-Training_P_00002_LEFT_CC/x/1.0-full-9/1-1.dcm",
    ]
    table = (
        "image file path,pathology\nMass-Training_P_00001_LEFT_CC/1.3.6/245/000000.dcm,MALIGNANT\n"
        "Mass-Training_P_00002_LEFT_CC/1.3.7/9/000000.dcm,BENIGN\n"
    )
    write(tmp_path, files, table)
    e = entry(
        files={
            "glob": "CBIS/*/*/*/*.dcm",
            "regex": r"CBIS/(?P<case>[^/]+)/[^/]+/[^/]*-(?P<series>\d+)/",
            "key": "{case}|{series}",
        },
        tables=[
            {
                "file": "labels.csv",
                "columns": ["image file path", "pathology"],
                "regex": {"column": "image file path", "pattern": r"^(?P<case>[^/]+)/[^/]+/(?P<series>[^/]+)/"},
                "key": "{case}|{series}",
            }
        ],
        label={"field": "pathology", "classes": {"MALIGNANT": "malignant mass", "BENIGN": "benign mass"}},
        group={"field": "case", "regex": r"P_(\d+)"},
    )
    out = listed(e, tmp_path)
    assert {out.source_map[it.ref]: (it.labels, it.patient) for it in out.items} == {
        files[0]: (("malignant mass",), patient_hash("00001", CFG.split_salt)),
        files[1]: (("benign mass",), patient_hash("00002", CFG.split_salt)),
    }


def test_headerless_table_names_its_columns_in_order(tmp_path):
    """Camelyon16's reference.csv: no header, a third column the description does not name."""
    write(tmp_path, ["images/test_001.tif", "images/test_002.tif"], "test_001,Tumor,Macro\ntest_002,Normal,\n")
    e = entry(
        files={"glob": "images/*.tif", "key": "{stem}"},
        tables=[{"file": "labels.csv", "header": False, "columns": ["slide", "dx"], "key": "{slide}"}],
        label={"field": "dx", "classes": {"Tumor": "metastasis", "Normal": "normal lymph node"}},
    )
    assert sorted(captions(listed(e, tmp_path)).values()) == [
        "An image showing metastasis.",
        "An image showing normal lymph node.",
    ]
    headed = [{"file": "labels.csv", "columns": ["slide", "dx"], "key": "{slide}"}]
    with pytest.raises(ConfigError, match="no column.*'slide', 'dx' among its 3 columns") as exc:  # row 1 read as names
        list_entry(entry(files=e.files.__dict__, tables=headed, label=e.label.__dict__), tmp_path, CFG)
    assert "test_001" not in str(exc.value)


def test_aliases_accept_another_spelling_of_a_column(tmp_path):
    write(tmp_path, ["a.png"], "file,malignancy(malig=1)\na.png,1\n")
    t = {"file": "labels.csv", "columns": ["file", "malignant"], "key": "{file}"}
    label = {"field": "malignant", "classes": {"1": "malignancy"}}
    with pytest.raises(ConfigError, match="no column.*'malignant'"):
        list_entry(entry(tables=[t], label=label), tmp_path, CFG)
    aliased = {**t, "aliases": {"malignant": ["malignancy(malig=1)"]}}
    out = listed(entry(tables=[aliased], label=label), tmp_path)
    assert [it.labels for it in out.items] == [("malignancy",)]


def test_semicolon_delimiter_and_quoted_cells_with_newlines(tmp_path):
    write(tmp_path, ["x/u1.jpg", "x/u2.jpg"], 'file-name;note;class-name\nu1.jpg;"two\nlines";polyp\nu2.jpg;;cecum\n')
    e = entry(
        files={"glob": "x/*.jpg", "key": "{name}"},
        tables=[{"file": "labels.csv", "delimiter": ";", "columns": ["file-name", "class-name"], "key": "{file-name}"}],
        label={"field": "class-name", "classes": {"polyp": "polyps", "cecum": "cecum"}},
    )
    assert sorted(captions(listed(e, tmp_path)).values()) == ["An image showing cecum.", "An image showing polyps."]
    with pytest.raises(ConfigError, match="no column"):  # read with a comma, the header is one column
        comma = [{**e.tables[0].__dict__, "delimiter": ",", "regex": None}]
        list_entry(entry(files=e.files.__dict__, tables=comma, label=e.label.__dict__), tmp_path, CFG)


def test_latin1_table(tmp_path):
    write(tmp_path, ["a.png"], "file,dx\na.png,naevus b\xe9nin\n".encode("latin-1"))
    t = {"file": "labels.csv", "columns": ["file", "dx"], "key": "{file}"}
    e = entry(tables=[{**t, "encoding": "latin-1"}], label={"field": "dx", "classes": {"naevus b\xe9nin": "nevus"}})
    assert [it.labels for it in listed(e, tmp_path).items] == [("nevus",)]
    with pytest.raises(ConfigError, match="is not utf-8 text"):
        list_entry(entry(tables=[t], label={"field": "dx", "classes": {"x": "y"}}), tmp_path, CFG)


@pytest.mark.parametrize("how", ["left", "inner"])
def test_join_left_keeps_unmatched_rows_and_inner_leaves_them_out(tmp_path, how):
    """ISIC 2019: the ground truth joined with the metadata's lesion ids."""
    write(tmp_path, ["img/i1.jpg", "img/i2.jpg", "img/i3.jpg"], "image,dx\ni1,a\ni2,a\ni3,b\n")
    (tmp_path / "meta.csv").write_text("image,lesion_id\ni1,L1\ni2,L1\n")
    e = entry(
        files={"glob": "img/*.jpg", "key": "{stem}"},
        tables=[{"file": "labels.csv", "columns": ["image", "dx"], "key": "{image}"}],
        join=[{"file": "meta.csv", "columns": ["image", "lesion_id"], "key": "{image}", "on": "{image}", "how": how}],
        group={"kind": "lesion", "field": "lesion_id", "blank": "file"},
    )
    out = listed(e, tmp_path)
    groups = {out.source_map[it.ref]: it.patient for it in out.items}
    assert groups["img/i1.jpg"] == groups["img/i2.jpg"] == patient_hash("L1", CFG.split_salt)
    if how == "left":
        assert groups["img/i3.jpg"] == patient_hash("img/i3.jpg", CFG.split_salt) and out.left_out == {}
    else:
        assert "img/i3.jpg" not in groups and out.left_out == {"no row in meta.csv": 1}
    (tmp_path / "meta.csv").write_text("image,lesion_id\nI1,L1\n")  # a key that meets no row
    with pytest.raises(ConfigError, match=r"source 'e': join\[0\]\.key '\{image\}' meets no row's join\[0\]\.on"):
        list_entry(e, tmp_path, CFG)


@pytest.mark.parametrize("rows", ["agree", "union"])
def test_several_rows_for_one_file_agree_or_union(tmp_path, rows):
    write(tmp_path, ["i1.png", "i2.png"], "file,dx\ni1.png,a\ni1.png,a\ni2.png,a\ni2.png,b\n")
    out = listed(entry(rows=rows, label={"field": "dx", "classes": {"b": "beta", "a": "alpha"}}), tmp_path)
    got = {out.source_map[it.ref]: it.labels for it in out.items}
    if rows == "agree":
        assert got == {"i1.png": ("alpha",)}
        assert reasons(out) == ["conflicting labels: rows of labels.csv for this file disagree"]
    else:  # united in classes order, whatever the row order
        assert got == {"i1.png": ("alpha",), "i2.png": ("beta", "alpha")}
        assert captions(out)["i2.png"] == "An image showing beta and alpha."
    write(tmp_path, [], "file,dx,pid\ni1.png,a,P1\ni1.png,a,P2\ni2.png,a,P3\n")  # one file, two patients
    t = [{"file": "labels.csv", "columns": ["file", "dx", "pid"], "key": "{file}"}]
    out = listed(entry(rows=rows, tables=t, group={"field": "pid"}), tmp_path)
    assert reasons(out) == ["conflicting rows: rows of labels.csv for this file disagree on 'pid'"]


def test_group_from_a_field_by_regex_and_blank_ids(tmp_path):
    files = ["t/patient00001/s1/v1.png", "t/patient00001/s2/v1.png", "t/patient00002/s1/v1.png", "t/x/v1.png"]
    table = "Path,dx\n" + "".join(f"{f},a\n" for f in files)
    write(tmp_path, files, table)
    t = [{"file": "labels.csv", "columns": ["Path", "dx"], "key": "{Path}"}]
    out = listed(entry(tables=t, group={"field": "Path", "regex": r"patient(\d+)"}), tmp_path)
    groups = {out.source_map[it.ref]: it.patient for it in out.items}
    assert groups[files[0]] == groups[files[1]] == patient_hash("00001", CFG.split_salt) != groups[files[2]]
    assert reasons(out) == ["missing patient id in field 'Path'"]
    out = listed(
        entry(tables=t, group={"kind": "study", "field": "Path", "regex": r"patient\d+/study\d+", "blank": "file"}),
        tmp_path,
    )
    assert len(out.items) == 4 and len({it.patient for it in out.items}) == 4
    alone = listed(entry(tables=t, group=None), tmp_path)  # no group: each file alone
    assert {it.patient for it in alone.items} == {patient_hash(f, CFG.split_salt) for f in files}


# --- labels ---------------------------------------------------------------------------------------------------------

CHEX = "file,A,B,C\nr1.png,1.0,,\nr2.png,-1.0,1.0,0.0\nr3.png,,,-1.0\nr4.png,2,,\n"


@pytest.mark.parametrize(
    "policy,want,left",
    [
        ("negative", {"r1.png": ("fa",), "r2.png": ("fb",)}, {"no mapped finding": 1}),
        ("positive", {"r1.png": ("fa",), "r2.png": ("fa", "fb"), "r3.png": ("fc",)}, {}),
        ("leave_out", {"r1.png": ("fa",)}, {"uncertain label": 2}),
    ],
)
def test_finding_columns_with_an_uncertain_policy(tmp_path, policy, want, left):
    write(tmp_path, ["r1.png", "r2.png", "r3.png", "r4.png"], CHEX)
    label = {
        "columns": ["A", "B", "C"],
        "uncertain": policy,
        "none": "leave_out",
        "classes": {"A": "fa", "B": "fb", "C": "fc"},
    }
    out = listed(
        entry(tables=[{"file": "labels.csv", "columns": ["file", "A", "B", "C"], "key": "{file}"}], label=label),
        tmp_path,
    )
    assert {out.source_map[it.ref]: it.labels for it in out.items} == want
    assert out.left_out == left
    assert reasons(out) == ["label value in column 'A' is none of label.values"]  # "2"
    custom = {**label, "values": {"positive": ["2", "1.0"], "negative": ["", "0.0"], "uncertain": ["-1.0"]}}
    out = listed(
        entry(tables=[{"file": "labels.csv", "columns": ["file", "A", "B", "C"], "key": "{file}"}], label=custom),
        tmp_path,
    )
    assert "r4.png" in {out.source_map[it.ref] for it in out.items}


def test_list_literal_labels(tmp_path):
    table = "file,cats\na.png,\"['Mass', 'Skin Retraction']\"\nb.png,[]\nc.png,Mass\nd.png,\"['Mass', 'Other']\"\n"
    write(tmp_path, ["a.png", "b.png", "c.png", "d.png"], table)
    classes = {"Mass": "mass", "Skin Retraction": "skin retraction"}
    t = [{"file": "labels.csv", "columns": ["file", "cats"], "key": "{file}"}]
    out = listed(entry(tables=t, label={"field": "cats", "list": True, "classes": classes}), tmp_path)
    assert captions(out) == {"a.png": "An image showing mass and skin retraction."}
    assert reasons(out) == [
        "label field 'cats' does not hold a list literal",
        "label in field 'cats' not in classes",
        "no positive finding mapped to a caption phrase",
    ]


def test_unmapped_and_none_policies(tmp_path):
    write(tmp_path, ["a.png", "b.png", "c.png"], "file,dx,X,Y\na.png,a,1,0\nb.png,zzz,0,1\nc.png,,0,0\n")
    t = [{"file": "labels.csv", "columns": ["file", "dx", "X", "Y"], "key": "{file}"}]
    out = listed(entry(tables=t), tmp_path)
    assert reasons(out) == ["label in field 'dx' not in classes", "missing label in field 'dx' not in classes"]
    out = listed(entry(tables=t, label={**BASE["label"], "unmapped": "leave_out"}), tmp_path)
    assert out.left_out == {"unmapped label (dx)": 2} and not out.rejects
    cols = {"columns": ["X", "Y"], "classes": {"X": "ex"}}
    out = listed(entry(tables=t, label=cols), tmp_path)
    assert reasons(out) == [
        "finding column 'Y' has no caption phrase in classes",
        "no positive finding mapped to a caption phrase",
    ]
    out = listed(entry(tables=t, label={**cols, "unmapped": "leave_out", "none": "leave_out"}), tmp_path)
    assert out.left_out == {"unmapped label (Y)": 1, "no mapped finding": 1} and len(out.items) == 1


def test_filters_in_not_in_and_regex_count_what_they_leave_out(tmp_path):
    rows = [
        "a.png,Frontal,AP,ok",
        "b.png,Lateral,,ok",
        "c.png,Frontal,PA,ok",
        "d.png,Frontal,AP,3 bad",
        "e.png,Frontal,AP,ok",
    ]
    write(tmp_path, ["a.png", "b.png", "c.png", "d.png", "e.png"], "file,fl,appa,qc\n" + "\n".join(rows) + "\n")
    t = [{"file": "labels.csv", "columns": ["file", "fl", "appa", "qc"], "key": "{file}"}]
    filters = [
        {"field": "fl", "in": ["Frontal"], "reason": "lateral view"},
        {"field": "appa", "in": ["AP"], "reason": "not an AP view"},
        {"field": "qc", "not_in": ["3 bad"], "reason": "wrongly labelled"},
        {"field": "file", "regex": "^[a-d]", "reason": "not in the study"},
    ]
    out = listed(entry(tables=t, label={"field": "fl", "classes": {"Frontal": "f"}}, filters=filters), tmp_path)
    assert [out.source_map[it.ref] for it in out.items] == ["a.png"]
    assert out.left_out == {
        "filter: lateral view": 1,
        "filter: not an AP view": 1,
        "filter: wrongly labelled": 1,
        "filter: not in the study": 1,
    }


# --- groups, splits, caps, captions ---------------------------------------------------------------------------------


def test_hash_split_keeps_every_group_in_one_split(tmp_path):
    files = [f"p{p}/i{i}.png" for p in range(20) for i in range(3)]
    write(tmp_path, files, "file,dx,pid\n" + "".join(f"{f},a,P{f.split('/')[0]}\n" for f in files))
    t = [{"file": "labels.csv", "columns": ["file", "dx", "pid"], "key": "{file}"}]
    out = listed(entry(tables=t, group={"field": "pid"}), tmp_path)
    by_group: dict[str, set] = {}
    for it in out.items:
        by_group.setdefault(it.patient, set()).add(it.split)
        assert it.split == split_for(it.patient, CFG.split_fractions)
    assert len(by_group) == 20 and all(len(s) == 1 for s in by_group.values())
    assert len({s for v in by_group.values() for s in v}) >= 2


def _capped(tmp_path, caps, n_a=10, n_b=4, per_patient=1):
    files = [f"{c}{i}.png" for c, n in (("a", n_a), ("b", n_b)) for i in range(n)]
    rows = "".join(f"{f},{f[0]},P{i // per_patient}\n" for i, f in enumerate(files))
    write(tmp_path, files, "file,dx,pid\n" + rows)
    t = [{"file": "labels.csv", "columns": ["file", "dx", "pid"], "key": "{file}"}]
    return listed(entry(tables=t, group={"field": "pid"}, caps=caps), tmp_path)


@pytest.mark.parametrize(
    "per_class,counts,left",
    [(3, {"alpha": 3, "beta": 3}, 8), ("min", {"alpha": 4, "beta": 4}, 6), ({"alpha": 2}, {"alpha": 2, "beta": 4}, 8)],
)
def test_caps_per_class(tmp_path, per_class, counts, left):
    out = _capped(tmp_path, {"per_class": per_class})
    got: dict[str, int] = {}
    for it in out.items:
        got[it.labels[0]] = got.get(it.labels[0], 0) + 1
    assert got == counts and out.left_out == {"cap per_class": left}


def test_caps_per_group_and_total(tmp_path):
    out = _capped(tmp_path, {"per_group": 2}, per_patient=3)  # 14 files, patients of 3, 3, 3, 3, 2
    assert len(out.items) == 10 and out.left_out == {"cap per_group": 4}
    assert max(sum(it.patient == p for it in out.items) for p in {it.patient for it in out.items}) == 2
    out = _capped(tmp_path, {"total": 5})
    assert len(out.items) == 5 and out.left_out == {"cap total": 9}


def test_caps_rank_by_hash_not_listing_order_and_follow_the_seed(tmp_path, monkeypatch):
    kept = {s: {it.ref for it in _capped(tmp_path, {"seed": s, "total": 5}).items} for s in (0, 1)}
    assert kept[0] != kept[1]
    first = sorted((f"{c}{i}.png" for c, n in (("a", 10), ("b", 4)) for i in range(n)), key=lambda r: rank(0, "e", r))[
        :5
    ]
    out = _capped(tmp_path, {"seed": 0, "total": 5})
    assert sorted(out.source_map[r] for r in kept[0]) == sorted(first)
    real = steps.glob_files
    monkeypatch.setattr(steps, "glob_files", lambda root, p: list(reversed(real(root, p))))
    assert {it.ref for it in _capped(tmp_path, {"seed": 0, "total": 5}).items} == kept[0]


def test_caption_fields_map_values_to_phrases_and_reject_the_rest(tmp_path):
    write(tmp_path, ["a.png", "b.png", "c.png"], "file,dx,AP/PA\na.png,a,AP\nb.png,b,PA\nc.png,a,LL\n")
    t = [{"file": "labels.csv", "columns": ["file", "dx", "AP/PA"], "key": "{file}"}]
    e = entry(
        tables=t,
        caption="Frontal ({view}) chest X-ray image showing {label}.",
        caption_fields={"view": {"field": "AP/PA", "map": {"AP": "AP", "PA": "PA"}}},
    )
    out = listed(e, tmp_path)
    assert captions(out) == {
        "a.png": "Frontal (AP) chest X-ray image showing alpha.",
        "b.png": "Frontal (PA) chest X-ray image showing beta.",
    }
    assert reasons(out) == ["value of field 'AP/PA' not in caption_fields.view.map"]


def test_every_file_is_accounted_for_and_no_value_reaches_a_reason(tmp_path):
    """Excludes, rejects of several kinds, filters, caps and orphan rows at once; no cell value (the
    patient ids, an unmapped label) appears in a reason, a left-out reason or a caption."""
    files = [f"img/{i}.png" for i in range(12)] + ["img/9_mask.png", "img/extra.png"]
    rows = [f"img/{i}.png,{'a' if i % 2 else 'b'},SECRET{i % 4},{'keep' if i < 10 else 'drop'}" for i in range(11)]
    rows += ["img/5.png,SECRETLABEL,SECRET1,keep", "img/3.png,b,SECRET3,keep", "img/gone.png,a,SECRET9,keep"]
    write(tmp_path, files, "file,dx,pid,f\n" + "\n".join(rows) + "\n")
    e = entry(
        files={"glob": "img/*.png", "exclude": {"mask": "**/*_mask.png"}},
        tables=[{"file": "labels.csv", "columns": ["file", "dx", "pid", "f"], "key": "{file}"}],
        filters=[{"field": "f", "in": ["keep"], "reason": "dropped"}],
        group={"field": "pid"},
        caps={"per_class": 3},
    )
    out = listed(e, tmp_path, orphans=1)
    assert out.left_out["mask"] == 1 and out.left_out["filter: dropped"] == 1 and "cap per_class" in out.left_out
    text = " ".join(
        [*reasons(out), *out.left_out, *(it.caption for it in out.items), *(it.patient for it in out.items)]
    )
    assert "SECRET" not in text
    assert "conflicting labels: rows of labels.csv for this file disagree" in reasons(out)
    assert "label in field 'dx' not in classes" in reasons(out)  # the unmapped row of img/5.png


def test_an_s3_root_lists_like_a_local_folder(s3_server, tmp_path):
    write(tmp_path / "e", ["x/a.png", "x/b.png"], "file,dx\nx/a.png,a\nx/b.png,b\n")
    storage.upload_dir(tmp_path / "e", "s3://medisyn-test/describe/e")
    local, remote = list_entry(entry(), tmp_path / "e", CFG), list_entry(entry(), "s3://medisyn-test/describe/e", CFG)
    assert [(it.ref, it.caption, it.split) for it in remote.items] == [
        (it.ref, it.caption, it.split) for it in local.items
    ]
    assert remote.items[0].path.startswith("s3://medisyn-test/describe/e/x/")


# --- load-time errors and the catalog -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over,message",
    [
        ({"labels": {}}, r"unknown key .*source 'e'.*labels.*did you mean"),
        ({"files": {"glob": "*.png", "regexp": "x"}}, r"unknown key .*source 'e'\.files\.regexp"),
        (
            {"caption": "A {view} showing {label}."},
            r"source 'e'\.caption: field\(s\) \{view\} not defined in caption_fields",
        ),
        ({"caption": "An image."}, r"caption 'An image\.' has no \{label\}"),
        ({"caption": "{label:>9}"}, r"caption .* plain \{field\}"),
        ({"label": {"classes": {"a": "b"}}}, r"label: give either field"),
        ({"label": {"field": "nope", "classes": {"a": "b"}}}, r"label\.field: field 'nope' is not a field"),
        ({"split": {"field": "dx", "map": {"a": "training"}}}, r"split\.map: targets must be train, val or test"),
        ({"files": {"glob": "*.png", "regex": "(unclosed"}}, r"files\.regex '\(unclosed' does not compile"),
        ({"files": {"glob": "../*.png"}}, r"files\.glob '\.\./\*\.png' must be a relative glob"),
        ({"access": "public"}, r"access: 'public' is not a valid choice"),
        ({"specialty": "cardiology"}, r"specialty: 'cardiology' is not one of"),
        ({"filters": [{"field": "dx", "reason": "r"}]}, r"filters\[0\]: give exactly one of in, not_in, regex"),
        ({"filters": [{"field": "dx", "in": "a", "reason": "r"}]}, r"filters\[0\]\.in: expected list"),
        ({"caps": {"per_class": "max"}}, r"caps\.per_class: 'max'"),
        ({"caps": {"per_class": {"alpha": 1, "gamma": 2}}}, r"caps\.per_class: 'gamma' is not a phrase of label"),
        ({"tables": [{"file": "l.csv", "columns": ["f"], "key": "{g}"}]}, r"tables\[0\]\.key: field 'g'"),
        ({"tables": [{"file": "l.csv", "columns": ["f"], "key": "{f}", "encoding": "klingon"}]}, r"unknown encoding"),
    ],
)
def test_load_time_errors_name_the_entry_and_field(over, message):
    with pytest.raises(ConfigError, match=message):
        entry(**over)


def test_header_mismatch_names_the_missing_column_not_the_values(tmp_path):
    write(tmp_path, ["a.png"], "file,SECRETVALUE\na.png,SECRETVALUE\n")
    with pytest.raises(ConfigError, match=r"source 'e': tables\[0\] \(labels\.csv\) has no column\(s\) 'dx'") as exc:
        list_entry(entry(), tmp_path, CFG)
    assert "SECRET" not in str(exc.value)


def test_table_globs_must_match_exactly_one_file(tmp_path):
    write(tmp_path, ["a.png"])
    with pytest.raises(ConfigError, match=r"source 'e': tables\[0\]\.file 'labels\.csv' matches 0 files"):
        list_entry(entry(), tmp_path, CFG)
    (tmp_path / "l1.csv").write_text("file,dx\n")
    (tmp_path / "l2.csv").write_text("file,dx\n")
    with pytest.raises(ConfigError, match=r"tables\[0\]\.file 'l\*\.csv' matches 2 files \(l1\.csv, l2\.csv\)"):
        list_entry(entry(tables=[{"file": "l*.csv", "columns": ["file", "dx"], "key": "{file}"}]), tmp_path, CFG)
    with pytest.raises(ConfigError, match=r"files\.glob '\*\.jpg' matches no file"):
        list_entry(entry(files={"glob": "*.jpg"}), tmp_path, CFG)


def test_load_catalog_and_entry_properties(tmp_path):
    import yaml

    raw = copy.deepcopy(BASE) | {
        "reader": "nifti",
        "join": [{"file": "m.csv", "columns": ["file"], "key": "{file}", "on": "{file}"}],
    }
    path = tmp_path / "cat.yaml"
    terms = {"access": "credentialed", "expected": {"files": 3, "corpus": 2}, "assumed": ["x"], "frames": "middle"}
    path.write_text(yaml.safe_dump({"sources": [BASE | terms, raw | {"name": "v"}]}))
    first, video = load_catalog(str(path))
    assert (first.access, first.expected.files, first.expected.corpus, first.assumed, first.frames) == (
        "credentialed",
        3,
        2,
        ("x",),
        "middle",
    )
    assert video.table_files == ("labels.csv", "m.csv") and first.phrases() == {"alpha", "beta"}
    path.write_text(yaml.safe_dump({"sources": [BASE, BASE]}))
    with pytest.raises(ConfigError, match="repeated: e"):
        load_catalog(str(path))
    path.write_text(yaml.safe_dump({"sources": [BASE], "extra": 1}))
    with pytest.raises(ConfigError, match="unknown key.*'extra'"):
        load_catalog(str(path))
    path.write_text(yaml.safe_dump({"sources": [BASE | {"bogus": 1}]}))
    with pytest.raises(ConfigError, match=r"cat\.yaml: sources\[0\]: source 'e'.*bogus"):
        load_catalog(str(path))


def test_yaml_bare_on_key(tmp_path):
    """YAML 1.1 reads a bare `on:` as True: it still means the join's `on`. (`reader_fields` is gone: a
    reader's fields are declared by its spec, tests/test_kinds.py.)"""
    import yaml

    raw = yaml.safe_load("join: [{file: meta.csv, columns: [image], key: '{image}', on: '{file}'}]")
    assert True in raw["join"][0]
    assert entry(**raw).join[0].on == "{file}"
    with pytest.raises(ConfigError, match=r"unknown key .*reader_fields"):
        entry(reader_fields=["phase"])


def test_a_glob_that_finds_only_excluded_files_is_an_error(tmp_path):
    """Kermany with OCT2017/ moved away: only __MACOSX/ is left, and a present entry giving nothing stops."""
    write(tmp_path, ["__MACOSX/._a.png"], "file,dx\n")
    with pytest.raises(ConfigError, match=r"source 'e': files.glob .* matches only files its files.exclude leaves out"):
        list_entry(entry(files={"glob": "**/*.png", "exclude": {"macOS metadata": "__MACOSX/**"}}), tmp_path, CFG)
