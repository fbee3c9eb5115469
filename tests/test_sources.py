"""Issue #34: the paper's catalog read from where a user downloaded it (``ingest.sources``).

Config options, where each entry's folder is (absent -> skipped with its access text), ``medisyn sources
check`` on the replicas (passes) and on broken copies (fails, naming the entry and the cause), and one
Ray ingest of the replicas through ``ingest.sources: paper`` against what ``replicas.json`` promises.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from medisyn.config import load_config
from medisyn.configtools import ConfigError
from medisyn.ingest.summary import format_table

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs/configs/demo.yaml"
# the demo config without its own sources (it reads the phantoms through the catalog): each test says what it reads
RESET = ["ingest.sources=", "ingest.sources_root=", "ingest.source_entries=[]", "ingest.source_settings={}"]


# ----------------------------------------------------------------------------- config options


def test_source_options_are_read_and_printed_by_medisyn_config(capsys):
    from medisyn.cli import main

    overrides = [
        "ingest.sources=paper",
        "ingest.sources_root=s3://bucket/sources",
        "ingest.source_paths.chexpert=/mnt/chexpert",
        "ingest.source_entries=[chexpert, aptos2019]",
    ]
    cfg = load_config(DEMO, [*RESET, *overrides]).ingest
    assert cfg.sources == "paper" and cfg.sources_root == "s3://bucket/sources"
    assert cfg.source_paths == {"chexpert": "/mnt/chexpert"} and cfg.source_entries == ("chexpert", "aptos2019")
    assert main(["config", "--config", str(DEMO), *RESET, *overrides]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)["ingest"]
    assert shown["sources"] == "paper" and shown["sources_root"] == "s3://bucket/sources"
    assert shown["source_paths"] == {"chexpert": "/mnt/chexpert"}
    assert shown["source_entries"] == ["chexpert", "aptos2019"]
    # every entry with its own folder: no root needed
    cfg = load_config(
        DEMO, [*RESET, "ingest.sources=paper", "ingest.source_entries=[ddi]", "ingest.source_paths.ddi=/d"]
    )
    assert cfg.ingest.sources_root == ""


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ingest.sources_root=/data"], "ingest.sources_root is set but ingest.sources"),
        (["ingest.source_paths.ddi=/d"], "ingest.source_paths is set but ingest.sources"),
        (["ingest.source_entries=[ddi]"], "ingest.source_entries is set but ingest.sources"),
        (["ingest.sources=paper"], "ingest.sources_root: needed to find the catalog's entries"),
        (
            ["ingest.sources=paper", "ingest.source_entries=[ddi, busi]", "ingest.source_paths.ddi=/d"],
            "ingest.sources_root: needed to find entry 'busi'",
        ),
        (["ingest.sources=paper", "ingest.sources_root=/d", "ingest.source_entries=[ddi, ddi]"], "'ddi' named more"),
        (["ingest.sources=paper", "ingest.sources_root=/d", "ingest.source_paths.ddi= "], "source_paths.ddi: empty"),
        (
            [
                "ingest.sources=paper",
                "ingest.sources_root=/d",
                "ingest.source_entries=[busi]",
                "ingest.source_paths.ddi=/d",
            ],
            "ingest.source_paths.ddi: not among ingest.source_entries",
        ),
    ],
)
def test_source_options_are_checked_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(DEMO, [*RESET, *overrides])


def test_source_settings_override_reading_settings_not_the_layout():
    """`ingest.source_settings.<entry>` changes caps/wsi/lesions/video/volume for one run (the demo's smaller
    patches and per-slide cap) and nothing else; what it changes reaches the reader's settings (so unit ids)."""
    from medisyn.ingest.catalog import load_sources, reading

    base = ["ingest.sources=paper", "ingest.sources_root=/d"]
    paper = {s.entry.name: s.entry for s in load_sources(load_config(DEMO, [*RESET, *base]).ingest)}
    over = [
        "ingest.source_settings.camelyon16.wsi.patch_size=256",
        "ingest.source_settings.camelyon16.lesions.per_slide=16",
        "ingest.source_settings.cholec80.video.every=50",
    ]
    entries = {s.entry.name: s.entry for s in load_sources(load_config(DEMO, [*RESET, *base, *over]).ingest)}
    cam = entries["camelyon16"]
    assert cam.wsi.patch_size == 256 and cam.wsi.magnification == paper["camelyon16"].wsi.magnification == 40
    assert cam.lesions.per_slide == 16 and cam.lesions.annotations == paper["camelyon16"].lesions.annotations
    assert entries["cholec80"].video.every == 50 and entries["cholec80"].video.fps == 25
    assert (
        dict(reading(cam).settings)["wsi_patch_size"]
        == 256
        != dict(reading(paper["camelyon16"]).settings).get("wsi_patch_size")
    )
    assert entries["busi"] == paper["busi"]  # untouched entries are the catalog's
    for bad, message in [
        ("ingest.source_settings.nope.caps.total=3", "no entry 'nope' in paper.yaml"),
        ("ingest.source_settings.busi.files.glob=x", "busi.files: not a setting a run may change"),
        ("ingest.source_settings.camelyon16.wsi.patchsize=3", "wsi: unknown key(s) 'patchsize'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_sources(load_config(DEMO, [*RESET, *base, bad]).ingest)
    with pytest.raises(ConfigError, match="ingest.source_settings is set but ingest.sources"):
        load_config(DEMO, [*RESET, "ingest.sources=", "ingest.source_settings.busi.caps.total=3"])


def test_summary_prints_what_was_left_out_and_skipped():
    from medisyn.ingest.summary import summarize

    summary = summarize(
        Path("/nonexistent/corpus"),
        Path("/nonexistent/rejects"),
        [],
        files=0,
        left_out={"chexpert": {"filter: lateral view": 2, "cap per_class": 5}, "busi": {}},
        skipped={"rspect": "absent: no folder /d/rspect; access: registration; download: from Kaggle"},
    )
    assert summary["left_out"] == {"chexpert": {"cap per_class": 5, "filter: lateral view": 2}}
    assert summary["skipped"]["rspect"].endswith("download: from Kaggle")
    assert summary["accounting"]["left_out"] == 7
    text = format_table(summary)
    assert "left out by the catalog's rules: 7" in text and "       5  cap per_class" in text
    assert "sources skipped: 1" in text and "rspect: absent: no folder /d/rspect; access: registration" in text


# ----------------------------------------------------------------------------- sources check on the replicas


@pytest.fixture(scope="module")
def replicas(replica_root):
    """The shared replicas (tests/conftest.py; read-only: a test that breaks one copies it): (folder, replicas.json)."""
    return replica_root, json.loads((replica_root / "replicas.json").read_text())


def _blocks(text: str) -> dict[str, str]:
    """The check's output per entry: a block starts at an unindented ``<entry>: ...`` line."""
    blocks: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        if not line.startswith(" "):
            name = line.split(":")[0]
        blocks[name] = blocks.get(name, "") + line + "\n"
    return blocks


def _check(overrides: list[str]) -> tuple[int, str]:
    from medisyn.ingest.check import check

    lines: list[str] = []
    rc = check(load_config(DEMO, [*RESET, "ingest.sources=paper", *overrides]).ingest, out=lines.append)
    return rc, "\n".join(lines)


def test_check_passes_on_the_replicas_and_reports_each_entry(replicas):
    root, info = replicas
    rc, text = _check([f"ingest.sources_root={root}"])
    assert rc == 0, text
    blocks = _blocks(text)
    for name, written in info["entries"].items():  # every catalog entry has a replica (issue #35)
        expect = written["expect"]
        listed = expect.get("listing", {}).get("items", expect["corpus"])  # a volume, a slide: one item each
        assert blocks[name].startswith(f"{name}: found at {root / name}"), blocks[name]
        assert f"  corpus: {listed:,} files" in blocks[name], blocks[name]
        assert f"sample: {min(3, listed)} element(s) opened" in blocks[name], blocks[name]
    assert "FAILED" not in text and "needs issue #35" not in text


def test_check_passes_on_the_demo_sources_as_make_demo_reads_them(demo_sources, capsys):
    """The demo's phantoms, written as their publishers ship them, match the paper catalog under the demo's
    own settings: `medisyn sources check` on demo.yaml exits 0 with every one of its 13 entries found."""
    from medisyn.cli import main

    assert main(["sources", "check", "--config", str(DEMO), f"ingest.sources_root={demo_sources}"]) == 0
    out = capsys.readouterr().out
    entries = load_config(DEMO).ingest.source_entries
    assert len(entries) == 13 and f"{len(entries)} entries: {len(entries)} match, 0 do not, 0 absent" in out


def test_absent_entries_are_reported_with_their_access_and_do_not_fail(replicas, tmp_path):
    root, _ = replicas
    rc, text = _check(
        [
            "ingest.source_entries=[ddi, aptos2019]",
            f"ingest.source_paths.ddi={root / 'ddi'}",
            f"ingest.source_paths.aptos2019={tmp_path / 'not-downloaded'}",
        ]
    )
    assert rc == 0, text
    assert "ddi: found at" in text
    assert f"aptos2019: absent: no folder {tmp_path / 'not-downloaded'}; access: registration; download: " in text
    assert "2 entries: 1 match, 0 do not, 1 absent" in text


@pytest.mark.parametrize(
    "entry, how, cause",
    [
        ("aptos2019", "header", r"no column\(s\) 'diagnosis'"),
        ("eyepacs", "folder", r"matches no file"),
        ("ddi", "file", r"table .*ddi_metadata.csv. matches no file"),
        ("busi", "file", r"3 file\(s\) rejected because the description does not cover them: label in field 'folder'"),
        ("kermany-oct", "folder", r"matches only files its files.exclude leaves out"),
    ],
)
def test_check_fails_on_a_broken_replica_naming_the_entry_and_the_cause(replicas, tmp_path, capsys, entry, how, cause):
    """Through the CLI: exit 1, the entry and the cause in one line, and no other entry blamed."""
    import re

    from medisyn.cli import main
    from medisyn.phantoms.replicas import break_replica

    root, _ = replicas
    copy = tmp_path / "sources"
    shutil.copytree(root / entry, copy / entry)
    break_replica(copy, entry, how)
    args = ["sources", "check", "--config", str(DEMO), *RESET, "ingest.sources=paper", f"ingest.sources_root={copy}"]
    assert main([*args, f"ingest.source_entries=[{entry}]"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and failed[0].startswith(f"  FAILED: source '{entry}': "), out
    assert re.search(cause, failed[0]), failed[0]
    assert f"1 do not ({entry})" in out


def test_ingest_stops_before_ray_on_a_present_entry_that_does_not_match(replicas, tmp_path, monkeypatch):
    import medisyn.raytools
    from medisyn.ingest.pipeline import run as ingest
    from medisyn.phantoms.replicas import break_replica

    def no_ray():
        raise AssertionError("Ray was started before the entry was checked")

    monkeypatch.setattr(medisyn.raytools, "ensure_ray", no_ray)
    root, _ = replicas
    shutil.copytree(root / "aptos2019", tmp_path / "sources/aptos2019")
    break_replica(tmp_path / "sources", "aptos2019", "header")
    overrides = ["ingest.repositories_file=", "ingest.sources=paper", f"ingest.sources_root={tmp_path / 'sources'}"]
    cfg = load_config(DEMO, [*RESET, f"run_dir={tmp_path / 'run'}", "ingest.source_entries=[aptos2019]", *overrides])
    with pytest.raises(ConfigError, match=r"source 'aptos2019': tables\[0\].*no column\(s\) 'diagnosis'"):
        ingest(cfg)
    # names stay unique across old-format repositories and catalog entries; nothing present: one line saying why
    cfg = load_config(
        DEMO, [*RESET, f"run_dir={tmp_path / 'run'}", "ingest.source_entries=[ddi, cholec80]", *overrides]
    )
    with pytest.raises(
        ConfigError, match=r"no entry of catalog 'paper' can be read: cholec80 absent: no folder .*; ddi absent"
    ):
        ingest(cfg)


def test_names_are_unique_across_repositories_and_catalog_entries(tmp_path):
    from medisyn.configtools import build
    from medisyn.ingest.catalog import load_inputs
    from medisyn.ingest.config import IngestConfig

    repo = dict(
        name="ddi",
        kind="image",
        path=str(tmp_path),
        glob="*.png",
        labels_csv="l.csv",
        path_column="p",
        label_columns=["label"],
        patient_column="pid",
        template="Clinical image showing {label}.",
        specialty="dermatology",
        image_type="clinical images",
        classes={"1": "melanoma"},
    )
    cfg = build(IngestConfig, {"repositories": [repo], "sources": "paper", "sources_root": str(tmp_path)}, "ingest")
    with pytest.raises(ConfigError, match="repository and source names must be unique; repeated: ddi"):
        load_inputs(cfg)
    with pytest.raises(
        ConfigError, match=r"ingest.source_entries: no entry 'dermnet' in catalog 'paper'; its entries: "
    ):
        load_inputs(build(IngestConfig, {"sources": "paper", "sources_root": ".", "source_entries": ["dermnet"]}))
    with pytest.raises(ConfigError, match="ingest: no repositories; set ingest.sources"):
        load_inputs(IngestConfig())


def test_check_fails_on_a_sample_that_does_not_open(replicas, tmp_path):
    root, _ = replicas
    shutil.copytree(root / "aptos2019", tmp_path / "aptos2019")
    for png in (tmp_path / "aptos2019").rglob("*.png"):
        png.write_bytes(b"not a png")
    rc, text = _check(["ingest.source_entries=[aptos2019]", f"ingest.sources_root={tmp_path}"])
    assert rc == 1
    assert "  FAILED: source 'aptos2019': sample file aptos2019/" in text
    assert "does not open with the image reader (unreadable or truncated image" in text


# ----------------------------------------------------------------------------- one ingest of the replicas


def test_replicas_ingest_through_the_paper_catalog(ray_cluster, replicas, tmp_path):
    """`ingest.sources: paper` on the replicas gives, per entry, the corpus, captions, splits and
    left-out counts replicas.json promises, for every entry: frames cut from the videos, rows of the
    HDF5 and .mat files, slices of the volumes and patches of the slides included (issue #35)."""
    from collections import Counter

    from medisyn.ingest.describe import load_catalog
    from medisyn.ingest.listing import join_phrases
    from medisyn.ingest.pipeline import run as ingest
    from medisyn.records import read_corpus, read_shards

    root, info = replicas
    cfg = load_config(
        DEMO,
        [
            *RESET,
            f"run_dir={tmp_path / 'run'}",
            "ingest.repositories_file=",
            "ingest.sources=paper",
            f"ingest.sources_root={root}",
        ],
    )
    summary = ingest(cfg)
    corpus = read_corpus(tmp_path / "run/corpus", ["source", "labels", "caption", "split", "patient_id"]).to_pandas()
    rejects = read_shards(tmp_path / "run/rejects", ["source_ref", "stage", "reason"]).to_pandas()
    catalog = {e.name: e for e in load_catalog("paper")}
    for name, written in info["entries"].items():
        expect, rows = written["expect"], corpus[corpus["source"] == name]
        assert len(rows) == expect["corpus"], name
        assert Counter(p for labels in rows["labels"] for p in labels) == expect["classes"], name
        prefix = catalog[name].caption.split("{")[0]  # captions: the entry's template, its phrases only
        for caption, labels in zip(rows["caption"], rows["labels"], strict=True):
            assert caption.startswith(prefix) and join_phrases(list(labels)) in caption, (name, caption)
            assert set(labels) <= catalog[name].phrases(), name
        mine = rejects[rejects["source_ref"].str.startswith(f"{name}/")]
        assert (mine["stage"] == "listing").sum() == expect["rejects"], name
        read = Counter(mine.loc[mine["stage"] != "listing", "reason"])  # the reader's: a frame past the end
        assert read == Counter(expect.get("read_rejects", {})), (name, read)
        assert summary["left_out"].get(name, {}) == expect["left_out"], name
        splits = expect["splits"]
        if "by" in splits:  # the group hash split: each group in one split
            assert rows.groupby("patient_id")["split"].nunique().max() == 1, name
            assert rows["patient_id"].nunique() == splits["groups"], name
        else:
            assert rows["split"].value_counts().to_dict() == splits, name
    assert not summary.get("skipped") and set(info["entries"]) == set(catalog)  # every entry read
    assert summary["accounting"]["left_out"] == sum(
        sum(w["expect"]["left_out"].values()) for w in info["entries"].values()
    )
    from medisyn.report import ingest_section

    page = ingest_section(cfg)  # the report shows what the rules left out and what was not read
    assert f"{summary['accounting']['left_out']:,} left out by the catalog's rules" in page
    assert "<td>rspect: cap per_class</td>" in page and "needs issue #35" not in page
    assert "<td>camelyon16: lesions: tumour fraction between thresholds</td>" in page  # counted by the worker


def test_every_node_probes_each_read_entry_folder_and_its_table_files(replicas):
    """What ``raytools.check_sources`` asks every node to read: each table file resolved from its glob
    on the driver (several per entry: one probe each), an entry without tables by its first file (a
    video entry too: it is read since issue #35)."""
    from medisyn.ingest.catalog import load_sources, probes
    from medisyn.raytools import visible_sources

    root, _ = replicas
    cfg = load_config(DEMO, [*RESET, "ingest.sources=paper", f"ingest.sources_root={root}"])
    sources = load_sources(cfg.ingest, str)
    entries = ["chexpert", "busi", "cholec80"]
    sources = tuple(s for s in sources if s.entry.name in entries)
    video = str(root / "cholec80/cholec80/videos/video01.mp4")
    found = probes(sources, {"busi": str(root / "busi/first.png"), "cholec80": video})
    assert found == {
        "chexpert": (str(root / "chexpert"), str(root / "chexpert/CheXpert-v1.0-small/train.csv")),
        "chexpert (table 2)": (str(root / "chexpert"), str(root / "chexpert/CheXpert-v1.0-small/valid.csv")),
        "busi": (str(root / "busi"), str(root / "busi/first.png")),
        "cholec80": (str(root / "cholec80"), video),
    }
    visible = visible_sources({k: v for k, v in found.items() if k != "busi"})
    assert visible == ["chexpert", "chexpert (table 2)", "cholec80"]
