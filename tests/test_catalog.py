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
}
NEEDS_35 = {  # entries whose files today's readers cannot read (issue #35)
    "figshare-brain-tumor": "mat",
    "cholec80": "video",
    "sar-rarp50": "video",
    "camelyon16": "slide-annotations",
    "pcam": "hdf5",
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
    assert {n: e.reader for n, e in catalog.items() if not e.supported} == NEEDS_35


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
    assert set(promised) == {n for n, e in catalog.items() if e.supported}


@pytest.mark.parametrize("name", [n for n in SOURCES if n not in NEEDS_35])
def test_replica_lists_through_the_catalog_as_promised(catalog, replicas, name):
    steps = pytest.importorskip("medisyn.ingest.steps")
    out, promised = replicas
    entry, expect = catalog[name], promised[name]["expect"]
    listing = steps.list_entry(entry, out / name, IngestConfig())
    items = listing.items
    assert len(items) == expect["corpus"]
    assert Counter(p for i in items for p in set(i.labels)) == Counter(expect["classes"])
    assert {k: v for k, v in listing.left_out.items() if v} == expect["left_out"]
    assert len(listing.rejects) == expect["rejects"], [r["reason"] for r in listing.rejects]
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
    else:
        assert Counter(i.split for i in items) == Counter(want)
        if "groups" in expect:
            assert len(splits) == expect["groups"]
