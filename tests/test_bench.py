"""The benchmarks run (tiny scale, CPU) and report numbers; speed itself is never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medisyn.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_tiny_on_cpu(capsys):
    from medisyn.train.bench import run

    results = run("tiny", batch=2, resolution=64, steps=1)
    assert [r["recipe"] for r in results][0] == "eager fp32" and results[0]["ratio"] == 1.0
    assert all(r["samples_per_s"] > 0 and r["tflops"] > 0 for r in results)
    assert "TFLOP forward per sample" in capsys.readouterr().out


def test_bench_generate_tiny_on_cpu(capsys):
    from medisyn.infer.bench import run

    results = run("tiny", resolution=64, steps=2)
    assert [r["batch"] for r in results] == [4, 8] and results[0]["ratio"] == 1.0
    assert all(r["images_per_s"] > 0 for r in results)
    assert "Euler 2 steps, guidance 7" in capsys.readouterr().out


def test_bench_select_tiny_on_cpu(capsys):
    from medisyn.select.bench import run

    results = run("tiny", images=8, checkpoints=2, steps=2, resolution=64)
    assert [r["arm"] for r in results] == ["real features per checkpoint", "real features cached"]
    assert results[0]["ratio"] == 1.0 and all(r["checkpoints_per_hour"] > 0 for r in results)
    assert results[0]["fid"] == pytest.approx(results[1]["fid"])  # caching changes the time, not the number
    assert "checkpoints/hour" in capsys.readouterr().out


def test_bench_bootstrap_matches_the_sklearn_loop(capsys):
    from medisyn.audit.bench import bootstrap

    r = bootstrap(resamples=60, n=500, loop_resamples=30)
    assert r["max_diff"] < 1e-12 and r["vectorised_s"] > 0 and r["loop_s"] > 0
    assert "(timed on 30, scaled)" in capsys.readouterr().out


def test_bench_audit_finds_faiss_neighbours(capsys):
    from medisyn.audit.bench import search

    r = search(n_real=2000, n_queries=200, dim=64, pairs=3)
    assert r["same"] == 1.0 and r["faiss_s"] > 0 and r["patch_ms"] > 0
    assert "projected search, 1M real x 10,000 synthetic" in capsys.readouterr().out


def test_bench_classifier_on_cpu(capsys):
    from medisyn.audit.bench import classifier

    r = classifier("resnet18", image_size=32, batch=4, steps=2)
    assert r["images_per_s"] > 0 and "resnet18 at 32², batch 4, 2 steps" in capsys.readouterr().out


def test_sdxl_random_pipeline_has_sdxl_shapes():
    from diffusers import AutoencoderKL

    from medisyn.presets import get_preset

    with torch.device("meta"):
        vae = AutoencoderKL(**get_preset("sdxl-random")["build"]["vae"])
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # SDXL's VAE


@pytest.mark.ray
def test_bench_ingest_small(ray_cluster, capsys):
    from medisyn.ingest.bench import run

    results = run(load_config(ROOT / "jobs/configs/demo.yaml"), images=8)
    assert [(r["source"], r["workers"]) for r in results] == [("ct", 1), ("ct", 2), ("png", 1), ("png", 2)]
    assert all(r["images"] == 8 and r["per_core"] > 0 for r in results)
    out = capsys.readouterr().out
    assert "scaling efficiency 1 -> 2 workers" in out and "faster" in out


def test_bench_corpus_tiny_local(capsys):
    from medisyn.ingest.corpus_bench import run

    before, after = run(rows=2000, shard_rows=512, wanted=100, before_shards=50)
    assert (before["layout"], before["shards"], after["layout"], after["shards"]) == ("before", 125, "after", 4)
    assert all(r["metadata_s"] > 0 and r["images_s"] > 0 for r in (before, after)) and after["metadata_ratio"] > 0
    out = capsys.readouterr().out
    assert "on local disk" in out and "timed on 50 of 125 shards, scaled x2.5" in out and "after vs before" in out


def test_bench_listing_catalog_against_the_old_format(tmp_path, capsys):
    import json
    import re

    from medisyn.cli import main
    from medisyn.ingest.listing_bench import chexpert_tables, run

    train, valid = chexpert_tables(300)
    assert len(train) + len(valid) == 300 and len(valid) >= 1
    assert {"Frontal", "Lateral"} <= set(train["Frontal/Lateral"]) and {"AP", "PA", ""} <= set(train["AP/PA"])
    assert {"1.0", "0.0", "-1.0", ""} <= set(train["Edema"]) and set(valid["Edema"]) <= {"1.0", "0.0"}
    r = run(rows=300, folder=str(tmp_path))
    # same files to read: the catalog's items are the old listing's AP frontals (it cannot filter views)
    assert r["same"] and 0 < r["catalog_items"] < r["old_items"] and r["catalog_s"] > 0 and r["old_s"] > 0
    out = capsys.readouterr().out
    assert re.search(r"catalog listing [\d,]+ rows/s, old listing [\d,]+ rows/s: catalog/old \d+\.\d\dx", out)
    assert "(made in" in out
    report = tmp_path / "listing.json"
    assert main(["bench", "listing", "--rows", "300", "--dir", str(tmp_path), "--json", str(report)]) == 0
    assert "(reused in" in capsys.readouterr().out  # the files are written once
    doc = json.loads(report.read_text())
    assert doc["bench"] == "listing" and doc["results"]["rows"] == 300 and doc["results"]["same"] is True
