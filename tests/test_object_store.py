"""The demo pipeline end to end as users run it: submitted as a Ray job to a head started with
`ray start --head` (token authentication), its run directory on object storage (an S3 server on
127.0.0.1).

`make demo` in small: every built stage runs and the report is written. The phantom sources
are on a local disk, as a user's own repositories would be; every stage after them
reads and writes only ``s3://``. The outputs equal a local run's: the same corpus ids (a local
ingest of the same sources), the same checkpoint names, the same manifest ids. Submitting the
same thing again attaches to the finished job; a new attempt on the same run skips every stage's
finished work.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import get_json, ray_head

from medisyn import storage
from medisyn.config import load_config
from medisyn.records import read_corpus, read_manifest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs/configs/demo.yaml"
FAST = [
    "train.resolution=64",
    "vae_fit.epochs=4",  # enough at 64² to beat the mean-colour baseline (or cache refuses the VAE)
    "train.epochs=2",
    "train.repeats=2",
    "train.caption_balance=0",  # 2 passes of the corpus as it is (the step count below); balance: test_train
    "select.num_images=8",
    "select.steps=4",  # same path as the demo, smaller
    "generate.max_per_prompt=2",
    "generate.steps=3",
    "generate.resolution=64",
    "audit_utility.synthetic=4",  # 2 images per prompt: 1 per class suffices
    "audit_utility.image_size=32",
    "audit_utility.seeds=1",
    "audit_utility.tasks=[dermoscopy]",  # one task, 4 trials: the other two are the same code
    "audit_utility.epochs=4",
    "audit_memorization.control_queries=20",
    "audit_memorization.k=5",  # fewer candidate pairs to read pixels for
]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_pipeline_end_to_end_on_s3(s3_server, ingested, demo_sources, tmp_path):
    from medisyn.infer.generate import resolve_set
    from medisyn.infer.prompts import expand

    local_run = ingested[0].run_dir  # the session's local ingest of the same phantom sources
    uri = "s3://medisyn-test/demo"
    pipeline = [
        "pipeline",
        "--config",
        "jobs/configs/demo.yaml",
        f"run_dir={uri}",
        "phantoms.enabled=false",
        f"ingest.sources_root={demo_sources}",  # the demo's repositories as published, on the head's disk
        f"reader.dir={tmp_path}/reader",  # the study's SQLite file needs a disk
        *FAST,
    ]
    # 3 logical CPUs: the job's driver holds one (entrypoint_num_cpus=1), the stages get the 2 a local run has
    with ray_head(tmp_path, num_cpus=3, extra_env=s3_server) as (url, _, token, env):

        def submit(*args: str) -> subprocess.CompletedProcess:
            cmd = [sys.executable, "-m", "medisyn.submit", "--address", url, "--project", str(ROOT), *args]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1500)
            (tmp_path / f"submit-{len(list(tmp_path.glob('submit-*')))}.log").write_text(proc.stdout + proc.stderr)
            return proc

        proc = submit(*pipeline)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        sid = proc.stderr.split("submitted ", 1)[1].split()[0]
        (job,) = [j for j in get_json(f"{url}/api/jobs/", token) if j.get("submission_id") == sid]
        assert job["status"] == "SUCCEEDED" and job["entrypoint"].startswith("python jobs/pipeline.py --config")
        assert job["metadata"]["stage"] == "pipeline" and job["metadata"]["run"] == uri
        run = storage.path(uri)
        stamps = {p: p.stat().st_mtime for p in _finished_outputs(run)}

        again = submit(*pipeline)  # the same submission: one job, the second command attaches to it
        assert again.returncode == 0 and f"attached to {sid}" in again.stderr, again.stderr[-2000:]
        retry = submit("--attempt", "2", *pipeline)  # a new job on the same run: finished work is skipped
        assert retry.returncode == 0, retry.stdout[-4000:] + retry.stderr[-2000:]
        assert len([j for j in get_json(f"{url}/api/jobs/", token) if j["metadata"].get("run") == uri]) == 2
    assert {p: p.stat().st_mtime for p in _finished_outputs(run)} == stamps  # nothing was redone
    for skipped in ("already done, 0 to process", "already fitted", "already selected", "already built"):
        assert skipped in retry.stdout, skipped
    proc_stdout = proc.stdout

    summary = json.loads((run / "ingest/summary.json").read_text())
    assert summary["pairs"]["total"] > 400 and len(summary["by_image_type"]) == 10
    page = (run / "report.html").read_text()
    assert "image–caption pairs" in page and 'alt="pathology"' in page and not (run / "report").exists()
    assert "stages still to come" not in proc_stdout and "stage report: done" in proc_stdout
    reader = sqlite3.connect(tmp_path / "reader" / "study.sqlite")  # 6 real + 6 synthetic per study (demo.yaml)
    counts = reader.execute("SELECT study, origin, COUNT(*) FROM images GROUP BY study, origin").fetchall()
    assert sorted(counts) == [
        (s, o, 6) for s in ("cholecystectomy-phase", "oct-condition") for o in ("real", "synthetic")
    ]
    assert "<h2>Reader study</h2>" in page and "No reader has submitted yet" in page
    assert json.loads((run / "selection.json").read_text())["best"] == "epoch-001"  # demo: select.criterion last
    assert "Checkpoint selection: the last epoch, epoch-001" in page
    assert (run / "model/model_index.json").exists() and "Training" in page
    manifest = read_manifest(run / "synthetic/memorization")
    assert manifest.num_rows == 40 and "Synthetic sets" in page
    assert "LEAKCANARY" not in proc.stdout + proc.stderr + page
    fit = json.loads((run / "vae/fit.json").read_text())
    assert fit["beats_baseline"] and "VAE fitted to the corpus" in page and f"Kept: epoch {fit['epoch']} of" in page
    (cache_json,) = [p for p in (run / "cache").glob("tiny-r64-*/cache.json")]
    cache = json.loads(cache_json.read_text())
    once = -(-(cache["train_count"] // 2) // 16)  # one pass: 2 workers, 16 per worker, equal shards
    log = json.loads((run / "train_log/epoch-001-rank-0.json").read_text())
    assert log["micro_steps"] == -(-(2 * cache["train_count"] // 2) // 16) >= 2 * once - 1  # train.repeats=2
    fidelity = json.loads((run / "audit/fidelity.json").read_text())
    assert fidelity["real_test"]["specialty"]["share"] > 0.9  # the classifier is sound on real images
    assert fidelity["real_test_decoded"]["specialty"]["n"] == fidelity["real_test_images"]  # the VAE's view, scored
    assert "as the VAE renders them" in page
    assert fidelity["sets"]["memorization"]["specialty"]["n"] == 40 and "Prompt fidelity" in page
    memorization = json.loads((run / "audit/memorization/summary.json").read_text())
    assert set(memorization["by_kind"]) == {"synthetic:memorization", "control:test", "control:train-loo"}
    assert memorization["by_kind"]["synthetic:memorization"]["overall"]["pairs"] == 40
    assert "Memorization audit" in page and 'alt="flagged and closest pairs"' in page
    utility = json.loads((run / "audit/utility/summary.json").read_text())
    assert set(utility["tasks"]) == {"dermoscopy"} and utility["seeds"] == 1
    full = {name: t["arms"]["real_full"] for name, t in utility["tasks"].items()}
    assert all(len(v["auroc"]) == 1 for v in full.values())
    assert all(v["mean"] > 0.6 for v in full.values()), full  # the all-real arm beats a random classifier
    assert storage.read_table(run / "audit/utility/predictions.parquet").num_rows == 4 * sum(
        t["n_test"] for t in utility["tasks"].values()
    )
    assert "Utility audit" in page and 'alt="dermoscopy ROC curves"' in page
    for section in ("Corpus", "Training", "Synthetic sets", "Prompt fidelity", "Memorization audit", "Utility audit"):
        assert f"<h2>{section}</h2>" in page and f"<h2>{section}</h2><p class=todo>" not in page, section
    assert "<h2>Provenance</h2>" in page and "Resolved config" in page
    _report_opens_in_a_browser(run, tmp_path / "report-copy")

    # equal to a local run of the same sources and settings
    local = load_config(DEMO, [f"run_dir={local_run}", f"ingest.sources_root={demo_sources}", *FAST])
    ids = read_corpus(run / "corpus", ["id"]).column("id").to_pylist()
    assert ids == read_corpus(local.run_path / "corpus", ["id"]).column("id").to_pylist()
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch-"))
    assert names == ["epoch-000", "epoch-001"]
    for name in local.generate.sets:
        pset = resolve_set(local, name)
        want = sorted(j.id for j in expand(pset))
        assert sorted(read_manifest(run / "synthetic" / pset.name, ["id"]).column("id").to_pylist()) == want
    # no URI was mangled into a local path (pathlib turns "s3://b/x" into the folder "s3:/b/x")
    assert not (ROOT / "s3:").exists() and not list(tmp_path.rglob("s3:"))


def _report_opens_in_a_browser(run, local: Path) -> None:
    """The result card as a reader of it sees it: the one file copied off the store alone, opened from disk in
    headless Chromium (Debian's, driven by Playwright): every image loads from the page itself, nothing errs in
    the console, nothing else is fetched."""
    from conftest import CHROMIUM, CHROMIUM_FLAGS
    from playwright.sync_api import sync_playwright

    local.mkdir(parents=True)
    (local / "report.html").write_bytes((run / "report.html").read_bytes())
    problems: list[str] = []
    fetched: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: r.url.startswith("data:") or fetched.append(r.url))
        page.goto((local / "report.html").as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])")
        page.screenshot(path=str(local / "report.png"), full_page=True)
        browser.close()
    assert len(images) >= 10 and not [src[:40] for src, width in images if width == 0 or not src.startswith("data:")]
    assert not problems, problems
    assert fetched == [(local / "report.html").as_uri()], fetched  # the page, and nothing beside it


def _finished_outputs(run) -> list:
    """Files each stage's rerun must leave alone: a corpus shard, the VAE, a checkpoint, the export, a
    synthetic image, the audits' summaries, the reader-study draw (its record in the run)."""
    picks = [
        sorted((run / "corpus").glob("*.parquet"))[0],
        run / "vae" / "fit.json",
        run / "checkpoints" / "epoch-001" / "unet" / "config.json",
        run / "model" / "model_index.json",
        sorted((run / "synthetic" / "memorization").glob("*.png"))[0],
        run / "synthetic" / "reader" / "manifest.parquet",
        run / "audit" / "fidelity.json",
        run / "audit" / "memorization" / "summary.json",
        run / "audit" / "utility" / "summary.json",
    ]
    for p in picks:
        assert p.exists(), p
    return picks
