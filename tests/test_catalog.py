"""Issue #34: the shipped catalog of the paper's repositories (jobs/configs/sources/paper.yaml).

It names exactly SOURCES.md's 18 entries, produces every phrase and caption the paper's prompt,
utility and reader sets use, and, listed through it, each replica (medisyn/phantoms/replicas.py)
gives the counts, classes, left-out reasons, rejects and splits that replicas.json promises. No Ray.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from medisyn.ingest.config import IngestConfig
from medisyn.ingest.describe import load_catalog
from medisyn.ingest.listing import join_phrases

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"

# ../shared/SOURCES.md's table: entry -> (image type, specialty)
SOURCES = {
    "rspect": ("computed tomography", "radiology"),
    "chexpert": ("X-ray", "radiology"),
    "cbis-ddsm": ("X-ray", "radiology"),
    "vindr-mammo": ("X-ray", "radiology"),
    "figshare-brain-tumor": ("magnetic resonance imaging", "radiology"),
    "busi": ("ultrasound", "radiology"),
    "cholec80": ("endoscopy", "surgery"),
    "sar-rarp50": ("endoscopy", "surgery"),
    "hyperkvasir": ("endoscopy", "gastroenterology"),
    "kvasir-v2": ("endoscopy", "gastroenterology"),
    "camelyon16": ("microscopy", "pathology"),
    "pcam": ("microscopy", "pathology"),
    "kermany-oct": ("optical coherence tomography", "ophthalmology"),
    "eyepacs": ("fundoscopy", "ophthalmology"),
    "aptos2019": ("fundoscopy", "ophthalmology"),
    "isic2019": ("dermoscopy", "dermatology"),
    "fitzpatrick17k": ("clinical images", "dermatology"),
    "ddi": ("clinical images", "dermatology"),
    "msd-brain-tumour": ("magnetic resonance imaging", "radiology"),  # a NIfTI example beyond Table 2
}
OTHER_KINDS = {  # issue #35: entries whose files are not image files, and their readers
    "figshare-brain-tumor": "mat",
    "cholec80": "video",
    "sar-rarp50": "video",
    "camelyon16": "wsi",
    "pcam": "hdf5",
    "msd-brain-tumour": "nifti",
}


@pytest.fixture(scope="module")
def catalog():
    return {e.name: e for e in load_catalog("paper")}


def _paper_sets() -> tuple[list[dict], list[dict]]:
    """(every prompt of the paper's prompt sets, every utility task and reader study)."""
    prompts = []
    for f in sorted((CONFIGS / "prompts").glob("*.yaml")):
        prompts += yaml.safe_load(f.read_text())["prompts"]
    utility = yaml.safe_load((CONFIGS / "utility" / "paper.yaml").read_text())
    reader = yaml.safe_load((CONFIGS / "reader" / "paper.yaml").read_text())
    return prompts + utility.get("prompts", []), utility["tasks"] + reader["studies"]


def test_catalog_holds_sources_md_entries_with_terms_and_download(catalog):
    assert list(catalog) == list(SOURCES)
    for name, entry in catalog.items():
        assert (entry.image_type, entry.specialty) == SOURCES[name], name
        assert entry.access in ("open", "registration", "credentialed")
        for text in (entry.repository, entry.publisher, entry.version, entry.licence):
            assert text.strip(), name
        assert f"<sources_root>/{name}/" in " ".join(entry.download.split()), name  # where to unpack it
        assert entry.expected.files > 0 or name == "cbis-ddsm", name  # TCIA counts only images with ROIs
    assert catalog["vindr-mammo"].access == "credentialed"  # PhysioNet restricted access
    assert catalog["rspect"].caps.per_class == "min"  # every PE-positive slice plus as many negatives
    assert {n: e.reader for n, e in catalog.items() if e.reader not in ("image", "dicom")} == OTHER_KINDS


def test_other_kinds_are_described_as_their_publishers_ship_them(catalog):
    """SOURCES.md §5, 7, 8, 11, 12 in the #35 language (the language helper checks the syntax)."""
    ch = catalog["cholec80"].video
    assert (ch.columns, ch.header, ch.delimiter, ch.frame) == (("Frame", "Phase"), True, "\t", "Frame")
    assert (ch.fps, ch.every) == (25, 25) and ch.annotations == "cholec80/phase_annotations/video{video}-phase.txt"
    sar = catalog["sar-rarp50"]
    assert (sar.video.header, sar.video.columns, sar.video.fps, sar.video.every) == (False, ("frame", "action"), 60, 6)
    assert sar.label.unmapped == "leave_out" and "0" not in sar.label.classes  # 0 Other: not a suturing action
    assert sar.group.field == "video"  # video_11_1 and video_11_2: one operation
    mat = catalog["figshare-brain-tumor"].mat
    assert (mat.image, mat.fields, mat.transpose) == (
        "cjdata/image",
        {"label": "cjdata/label", "pid": "cjdata/PID"},
        True,
    )
    assert catalog["figshare-brain-tumor"].intensity == "percentile"
    cam = catalog["camelyon16"]
    assert (cam.wsi.magnification, cam.wsi.patch_size) == (40, 512) and "40x" in cam.caption  # as the caption says
    assert (cam.lesions.positive, cam.lesions.negative) == ("metastasis", "no presence of metastasis")
    assert (cam.lesions.tumour_min, cam.lesions.normal_max) == (0.5, 0.0)
    assert catalog["pcam"].hdf5.dataset == "x" and "10x" in catalog["pcam"].caption
    assert all(t.key == "{subset}/{index}" for t in catalog["pcam"].tables)
    msd = catalog["msd-brain-tumour"]
    assert msd.volume.mask == "Task01_BrainTumour/labelsTr/{case}.nii.gz" and msd.licence == "CC BY-SA 4.0"
    # the example's phrase is its own: the paper's sets never meet it
    prompts, groups = _paper_sets()
    used = {lab for p in prompts for lab in p["labels"]} | {c for g in groups for c in g["classes"]}
    assert not msd.phrases() & used


def test_every_paper_prompt_is_a_catalog_caption(catalog):
    """Each prompt of the paper's sets reads exactly as some entry of its specialty and image type
    captions its label, so prompt, task and study classes all meet real corpus captions."""
    prompts, groups = _paper_sets()
    for p in prompts:
        made = {
            e.caption.format(label=join_phrases(list(p["labels"])))
            for e in catalog.values()
            if (e.specialty, e.image_type) == (p["specialty"], p["image_type"]) and set(p["labels"]) <= e.phrases()
        }
        assert p["prompt"] in made, p["prompt"]
    for g in groups:
        phrases = set().union(
            *(e.phrases() for e in catalog.values() if (e.specialty, e.image_type) == (g["specialty"], g["image_type"]))
        )
        assert set(g["classes"]) <= phrases, (g["name"], sorted(set(g["classes"]) - phrases))


def test_paper_phrases_for_relabelled_sources(catalog):
    """The source labels the paper renames (SOURCES.md: "the catalog maps the source's label to exactly
    that phrase")."""
    assert catalog["isic2019"].label.classes["BKL"] == "seborrheic keratosis"
    assert catalog["isic2019"].label.classes["NV"] == "melanocytic nevi"
    assert catalog["cholec80"].label.classes["CalotTriangleDissection"] == "Calot's triangle dissection"
    assert catalog["chexpert"].label.uncertain == "negative"
    gi = catalog["hyperkvasir"].label.classes
    assert {gi[f"ulcerative-colitis-grade-{g}"] for g in ("0-1", "1", "1-2", "2", "2-3", "3")} == {"ulcerative colitis"}
    assert gi["esophagitis-a"] == gi["esophagitis-b-d"] == "esophagitis"
    assert {catalog["kermany-oct"].label.classes[c] for c in ("NORMAL", "DRUSEN", "CNV", "DME")} == {
        "normal findings",
        "drusen",
        "choroidal neovascularization",
        "diabetic macular edema",
    }
    # the two clinical-image sources share one vocabulary
    assert set(catalog["ddi"].phrases()) < set(catalog["fitzpatrick17k"].phrases())


# --------------------------------------------------------------------------------- replicas


@pytest.fixture(scope="module")
def replicas(replica_root):
    """The session's replicas (tests/conftest.py writes them once) and what replicas.json promises."""
    return replica_root, json.loads((replica_root / "replicas.json").read_text(encoding="utf-8"))["entries"]


def test_replicas_cover_the_supported_entries(catalog, replicas):
    _, promised = replicas
    assert set(promised) == set(catalog)


@pytest.mark.parametrize("name", list(SOURCES))
def test_replica_lists_through_the_catalog_as_promised(catalog, replicas, name):
    """What listing alone decides: a video's sampled frames and an HDF5 file's rows are items; a volume
    and a slide are one item each (their slices and patches are the worker's: tests/test_sources.py)."""
    steps = pytest.importorskip("medisyn.ingest.steps")
    out, promised = replicas
    entry, expect = catalog[name], promised[name]["expect"]
    listed = expect.get("listing", expect)  # before the reader: frames past the end, slices, patches
    listing = steps.list_entry(entry, out / name, IngestConfig())
    items = listing.items
    assert len(items) == listed.get("items", expect["corpus"])
    assert Counter(p for i in items for p in set(i.labels)) == Counter(listed["classes"])
    assert {k: v for k, v in listing.left_out.items() if v} == listed["left_out"]
    assert len(listing.rejects) == expect["rejects"], [r["reason"] for r in listing.rejects]
    if "reject_reasons" in expect:
        assert Counter(r["reason"] for r in listing.rejects) == Counter(expect["reject_reasons"])
    for i in items:  # captions only from the entry's phrases, in its template
        assert set(i.labels) <= entry.phrases()
        assert i.caption == entry.caption.format(label=join_phrases(list(i.labels)))
    splits = defaultdict(set)
    for i in items:
        splits[i.patient].add(i.split)
    assert all(len(s) == 1 for s in splits.values()), "a group in two splits"
    want = expect["splits"]
    if "by" in want:  # ingest's group hash: only the number of groups is fixed
        assert len(splits) == want["groups"]
    elif "listing" not in expect:
        assert Counter(i.split for i in items) == Counter(want)
        if "groups" in expect:
            assert len(splits) == expect["groups"]


def test_frames_and_rows_are_listed_as_elements_of_their_file(catalog, replicas):
    """Cholec80's sampled frames (every 25th, past the end included: the reader decides), SAR-RARP50's
    10 Hz rows, PCam's rows: one item per element, numbered by ``Item.index``, the frames of one video
    sharing its series; a volume and a slide stay one item with their mask or outlines."""
    steps = pytest.importorskip("medisyn.ingest.steps")
    out, _ = replicas
    cfg = IngestConfig()
    items = steps.list_entry(catalog["cholec80"], out / "cholec80", cfg).items
    frames = defaultdict(list)
    for i in items:
        frames[i.series].append(i.index)
    assert sorted(sorted(f) for f in frames.values()) == [[0, 25, 50], [0, 25, 50, 75, 100]]
    assert len({i.ref for i in items}) == len(items) and len({i.patient for i in items}) == 2
    sar = steps.list_entry(catalog["sar-rarp50"], out / "sar-rarp50", cfg).items
    assert {i.index % 6 for i in sar} == {0} and max(i.index for i in sar) == 54  # zero-padded frames read too
    assert len({i.series for i in sar}) == 3 and len({i.patient for i in sar}) == 2  # 3 clips, 2 operations
    pcam = steps.list_entry(catalog["pcam"], out / "pcam", cfg).items
    assert sorted(i.index for i in pcam if i.split == "train") == list(range(6))
    msd = steps.list_entry(catalog["msd-brain-tumour"], out / "msd-brain-tumour", cfg).items
    assert [i.index for i in msd] == [-1, -1] and all(i.annotation.endswith(".nii.gz") for i in msd)
    assert all(Path(i.annotation).parent.name == "labelsTr" for i in msd)
    cam = steps.list_entry(catalog["camelyon16"], out / "camelyon16", cfg).items
    tumour = [i for i in cam if "metastasis" in i.labels]
    assert len(tumour) == 1 and tumour[0].annotation.endswith("tumor_001.xml")
    assert [i.annotation for i in cam if i not in tumour] == [""]  # a normal slide needs no outlines
