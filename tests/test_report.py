"""The report as one self-contained file, and its sections for the release, the caption counts and the
guidance gap, on fabricated stage records (no pipeline run, no Ray)."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medisyn import report
from medisyn.config import load_config
from medisyn.figures import data_uri

DEMO = Path(__file__).resolve().parents[1] / "jobs/configs/demo.yaml"
STATS = {"pairs": 4, "mean": 0.2, "sd": 0.05, "flagged": 1, "flagged_pct": 25.0, "flagged_rate_upper95": 0.75}
STATS |= {"min": 0.1, "p1": 0.11, "wilcoxon_p_above": 0.06}


def png(size: tuple[int, int], photo: bool) -> bytes:
    """A chart-like PNG (white with grid lines) or a photo-like one (smooth shapes and sensor noise), encoded."""
    w, h = size
    if photo:
        rng = np.random.default_rng(0)
        coarse = rng.integers(0, 255, (max(1, h // 50), max(1, w // 50), 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)).astype(int)
        arr = np.clip(smooth + rng.integers(-8, 8, (h, w, 3)), 0, 255)
    else:
        arr = np.full((h, w, 3), 255)
        arr[::20] = 0
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def memorization_summary(newer: bool) -> dict:
    """A memorization audit's summary.json: the fields the report reads, and (``newer``) issue #36's blocks."""
    entry = {"overall": STATS, "by_specialty": {"radiology": STATS}}
    synth = entry | {"distinct_train_images_matched": 3, "most_matches_to_one_train_image": 2}
    summary = {
        "threshold": 0.15,
        "by_kind": {"synthetic:memorization": synth | {"match_not_embedding_top1": 0}, "control:test": entry},
    }
    if newer:
        summary["by_caption_share"] = {
            "synthetic:memorization": {"1": {"pairs": 3, "flagged": 0, "flagged_pct": 0.0}},
            "control:test": {"65+": {"pairs": 1, "flagged": 1, "flagged_pct": 100.0}},
        }
        gap = {"n": 4, "median": 0.0123, "p90": 0.031, "max": 0.0456}
        summary["guidance_gap"] = {"memorization": {"radiology": gap}}
    return summary


def release_record() -> dict:
    """``release/<name>.json`` as the release stage writes it (interface 3 of issue #36)."""
    figures = {
        "rows": 37,
        "left_out": {"flagged by distance": 2, "copy of a corpus image": 1},
        "corpus_images_hashed": 716,
        "by_specialty": {"radiology": 20, "surgery": 17},
        "guidance_gap": {"radiology": {"n": 20, "median": 0.0211, "p90": 0.03, "max": 0.04}},
        "memorization": {
            "threshold": 0.15,
            "overall": STATS | {"flagged_rate_upper95": 0.0789},
            "by_specialty": {"radiology": STATS},
            "controls": {"control:test": STATS},
        },
        "fidelity": {"specialty": 0.95, "class": 0.8, "real_test": {"specialty": 0.99, "class": 0.9}},
        "utility": {
            "sets": ["utility"],
            "same_images": False,
            "tasks": {"dermoscopy": [{"a": "real_small", "b": "synthetic", "difference": [0.0312, -0.01, 0.07]}]},
        },
        "policy": {"max_flag_rate": 0.05, "on_flagged": "drop"},
    }
    return {
        "name": "memorization",
        "set": "memorization",
        "rows": 37,
        "left_out": figures["left_out"],
        "figures": figures,
        "files": ["README.md", "croissant.json", "data/train-00000-of-00001.parquet"],
        "inputs": {"set": "memorization"},
    }


class Links(HTMLParser):
    """Every attribute of the page that can make a browser fetch something."""

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.fetches: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if tag == "img" and name == "src":
                self.images.append(value)
            elif name in ("src", "href", "srcset", "poster", "data", "action", "background") or "url(" in (value or ""):
                self.fetches.append(f"{tag} {name}={value[:60]}")


@pytest.fixture
def run_dir(tmp_path):
    """A run of fabricated records: a memorization audit with its figures (one a large photograph) and a release."""
    run = tmp_path / "run"
    folder = run / "audit" / "memorization"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(memorization_summary(newer=True)))
    (folder / "histograms.png").write_bytes(png((2400, 300), photo=False))
    (folder / "gallery.png").write_bytes(png((500, 1200), photo=True))
    (folder / "guidance_gap.png").write_bytes(png((600, 300), photo=False))
    (run / "release").mkdir()
    (run / "release" / "memorization.json").write_text(json.dumps(release_record()))
    return run


def test_the_report_is_one_file_that_carries_every_figure(run_dir):
    cfg = load_config(DEMO, [f"run_dir={run_dir}"])
    page = report.run(cfg).read_text()
    links = Links()
    links.feed(page)
    assert len(links.images) == 3 and all(src.startswith("data:image/") for src in links.images)
    assert not links.fetches  # nothing else to load: no stylesheet, script, link or background
    assert not (run_dir / "report").exists()  # no figures folder beside the page
    for f in (run_dir / "audit" / "memorization").glob("*.png"):
        f.unlink()  # the page stands alone: its pictures decode without the files they came from
    decoded = [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) for src in links.images]
    assert [(im.format, im.width) for im in decoded] == [("PNG", 1600), ("JPEG", 500), ("PNG", 600)]
    assert len(png((500, 1200), photo=True)) > 1_000_000 and len(page) < 250_000  # the photograph went as JPEG


def test_data_uri_keeps_charts_png_shrinks_wide_ones_and_sends_photographs_as_jpeg():
    chart = data_uri(png((800, 400), photo=False))
    assert chart.startswith("data:image/png;base64,")
    assert base64.b64decode(chart.split(",", 1)[1]) == png((800, 400), photo=False)  # small PNGs go as they are
    wide = Image.open(io.BytesIO(base64.b64decode(data_uri(png((3200, 200), photo=False)).split(",", 1)[1])))
    assert wide.size == (1600, 100)
    tall = data_uri(png((200, 4000), photo=True), max_pixels=200_000)  # a contact sheet of many captions
    im = Image.open(io.BytesIO(base64.b64decode(tall.split(",", 1)[1])))
    assert im.format == "JPEG" and im.width * im.height <= 200_000 and im.size == (100, 2000)
    rgba = Image.new("RGBA", (2000, 50), (0, 0, 0, 0))  # a transparent chart, wider than the page
    assert data_uri(rgba).startswith("data:image/png;base64,")


def test_the_release_section_shows_rows_what_was_left_out_and_the_cards_figures(run_dir, tmp_path):
    cfg = load_config(DEMO, [f"run_dir={run_dir}"])
    html = report.release_section(cfg)
    assert "<h3>memorization: 37 images released, 3 left out</h3>" in html
    assert "<td>flagged by distance</td><td>2</td>" in html and "<td>copy of a corpus image</td><td>1</td>" in html
    assert "release/memorization.left_out.parquet" in html
    assert "<td>0.0789</td>" in html  # the memorization bound the card prints
    assert "<td>tasks / dermoscopy / real_small − synthetic</td>" in html and "0.0312, -0.01, 0.07" in html
    assert "corpus_images_hashed 716" in html and "data/train-00000-of-00001.parquet" in html
    none = report.release_section(load_config(DEMO, [f"run_dir={tmp_path / 'other'}"]))
    assert "No release was made" in none and "medisyn release --config FILE release.set=NAME" in none


def test_the_memorization_section_shows_the_gap_and_caption_share_only_where_the_audit_wrote_them(run_dir):
    cfg = load_config(DEMO, [f"run_dir={run_dir}"])
    html = report.memorization_section(cfg)
    assert "<h3>Guidance gap</h3>" in html and "<td>memorization / radiology</td><td>4</td><td>0.0123</td>" in html
    assert html.count("<img") == 3  # histograms, gallery, guidance gap
    assert "<td>control:test / 65+</td><td>1</td><td>1</td><td>100</td>" in html
    folder = run_dir / "audit" / "memorization"  # an audit from before issue #36
    (folder / "summary.json").write_text(json.dumps(memorization_summary(newer=False)))
    (folder / "guidance_gap.png").unlink()
    html = report.memorization_section(cfg)
    assert "Guidance gap" not in html and "share the matched" not in html and html.count("<img") == 2


def test_the_corpus_section_shows_images_per_caption_where_ingest_counted_them(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "ingest").mkdir(parents=True)
    zero = {"train": 0, "val": 0, "test": 0, "total": 0}
    summary = {
        "pairs": {"train": 5, "val": 0, "test": 0, "total": 5},
        "by_specialty": {"radiology": zero | {"train": 5, "total": 5}},
        "by_image_type": {},
        "by_class": {},
        "accounting": {"files_listed": 5, "corpus": 5, "duplicates": 0, "rejected": 0, "background": 0},
        "rejects": {},
        "duplicates": {},
    }
    tile = png((32, 32), photo=True)
    monkeypatch.setattr(report, "corpus_samples", lambda corpus: {"radiology": [(tile, "a <b>chest</b> x-ray")]})
    cfg = load_config(DEMO, [f"run_dir={run}"])
    (run / "ingest" / "summary.json").write_text(json.dumps(summary))
    html = report.ingest_section(cfg)
    assert "images per caption" not in html.lower() and html.count('<img src="data:image/') == 2
    captions = {"split": "train", "distinct": 2, "top": [["a <b>chest</b> x-ray", 4], ["a knee", 1]]}
    captions["histogram"] = {"1": 1, "2-4": 1, "5-16": 0, "17-64": 0, "65+": 0}
    (run / "ingest" / "summary.json").write_text(json.dumps(summary | {"captions": captions}))
    html = report.ingest_section(cfg)
    assert "<h3>Train images per caption</h3><p>2 distinct captions." in html
    assert "<td>2-4</td><td>1</td>" in html and "<td>a &lt;b&gt;chest&lt;/b&gt; x-ray</td><td>4</td>" in html
