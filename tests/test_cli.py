"""The command line as a user meets it, and the one slow end-to-end run of `make demo`'s pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medisyn.cli import main
from medisyn.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs/configs/demo.yaml"


def test_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in (
        "phantoms",
        "ingest",
        "cache",
        "train",
        "select",
        "generate",
        "audit-memorization",
        "audit-utility",
        "reader",
        "report",
        "pipeline",
        "bench",
    ):
        assert name in out


def test_unbuilt_stage_says_so(capsys):
    unbuilt = next(s for s in STAGES if not s.built)
    with pytest.raises(SystemExit) as exc:
        main([unbuilt.name, "--config", str(DEMO)])
    assert f"stage {unbuilt.name!r} is not built yet" in str(exc.value.code)


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.py") if not p.name.startswith("_")))
def test_job_entrypoints_reach_the_cli(job):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / job), "--help"], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and "--config" in proc.stdout, proc.stderr[-2000:]


def test_missing_prerequisite_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["select", "--config", str(DEMO), f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "no epoch checkpoints" in err and "Traceback" not in err


def test_config_prints_resolved_values(capsys):
    assert main(["config", "--config", str(DEMO), "train.epochs=7"]) == 0
    assert "epochs: 7" in capsys.readouterr().out


def test_phantoms_takes_overrides_like_every_stage(tmp_path, capsys):
    """`jobs/phantoms.py --config F run_dir=X` once wrote the repositories into a folder named
    'run_dir=X'; the phantoms belong in X's phantoms folder, where ingest looks for them."""
    run_dir = tmp_path / "run"
    assert main(["phantoms", "--config", str(DEMO), f"run_dir={run_dir}", "phantoms.seed=4"]) == 0
    assert json.loads((run_dir / "phantoms/phantoms.json").read_text())["seed"] == 4
    assert not list(Path.cwd().glob("run_dir=*")) and (run_dir / "phantoms/repositories.yaml").is_file()


def test_phantoms_command_is_idempotent(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantoms", str(out), "--seed", "3", "--scale", "small"]) == 0
    first = (out / "phantoms.json").read_text()
    stamp = (out / "phantoms.json").stat().st_mtime_ns
    assert main(["phantoms", str(out), "--seed", "3", "--scale", "small"]) == 0  # same settings: nothing redone
    assert (out / "phantoms.json").stat().st_mtime_ns == stamp
    assert json.loads(first)["seed"] == 3 and "ctpa" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path):
    """`make demo` in a fresh run dir: every built stage runs and the report is written."""
    run_dir = tmp_path / "demo"
    fast = [
        "train.resolution=64",
        "vae_fit.epochs=14",  # enough at 64² to beat the mean-colour baseline (or cache refuses the VAE)
        "train.epochs=2",
        "train.repeats=2",
        "select.num_images=8",
        "select.steps=4",  # same path as the demo, smaller
        "generate.max_per_prompt=2",
        "generate.steps=3",
        "generate.resolution=64",
        "audit_utility.synthetic=4",  # 2 images per prompt: 1 per class suffices
        "audit_utility.image_size=32",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "medisyn.cli", "pipeline", "--config", str(DEMO), f"run_dir={run_dir}", *fast],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "ingest/summary.json").read_text())
    assert summary["pairs"]["total"] > 400 and len(summary["by_image_type"]) == 10
    page = (run_dir / "report.html").read_text()
    assert "image–caption pairs" in page and (run_dir / "report/corpus_pathology.png").stat().st_size > 10_000
    assert "stages still to come: reader" in proc.stdout
    assert json.loads((run_dir / "selection.json").read_text())["best"] in ("epoch-000", "epoch-001")
    assert (run_dir / "model/model_index.json").exists() and "Training" in page
    manifest = pq.read_table(run_dir / "synthetic/memorization/manifest.parquet")
    assert manifest.num_rows == 40 and "Synthetic sets" in page
    assert "LEAKCANARY" not in proc.stdout + proc.stderr + page
    fit = json.loads((run_dir / "vae/fit.json").read_text())
    assert fit["beats_baseline"] and "VAE fitted to the corpus" in page
    cache = json.loads(next((run_dir / "cache").glob("tiny-r64-*/cache.json")).read_text())
    once = -(-(cache["train_count"] // 2) // 16)  # one pass: 2 workers, 16 per worker, equal shards
    log = json.loads((run_dir / "train_log/epoch-001-rank-0.json").read_text())
    assert log["micro_steps"] == -(-(2 * cache["train_count"] // 2) // 16) >= 2 * once - 1  # train.repeats=2
    fidelity = json.loads((run_dir / "audit/fidelity.json").read_text())
    assert fidelity["real_test"]["specialty"]["share"] > 0.9  # the classifier is sound on real images
    assert fidelity["sets"]["memorization"]["specialty"]["n"] == 40 and "Prompt fidelity" in page
    memorization = json.loads((run_dir / "audit/memorization/summary.json").read_text())
    assert set(memorization["by_kind"]) == {"synthetic:memorization", "control:test", "control:train-loo"}
    assert memorization["by_kind"]["synthetic:memorization"]["overall"]["pairs"] == 40
    assert "Memorization audit" in page and (run_dir / "report/memorization_gallery.png").exists()
    utility = json.loads((run_dir / "audit/utility/summary.json").read_text())
    assert set(utility["tasks"]) == {"chest-xray", "dermoscopy", "prostatectomy"} and utility["seeds"] == 2
    full = {name: t["arms"]["real_full"] for name, t in utility["tasks"].items()}
    assert all(len(v["auroc"]) == 2 for v in full.values())
    assert all(v["mean"] > 0.6 for v in full.values()), full  # the all-real arm beats a random classifier
    assert pq.read_table(run_dir / "audit/utility/predictions.parquet").num_rows == 2 * 4 * sum(
        t["n_test"] for t in utility["tasks"].values()
    )
    assert "Utility audit" in page and (run_dir / "report/utility_dermoscopy-roc.png").exists()


def test_the_report_records_config_seeds_versions_and_commit(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["report", "--config", str(DEMO), f"run_dir={run_dir}", "seed=7"]) == 0
    page = (run_dir / "report.html").read_text()
    assert "<h2>Provenance</h2>" in page and "seed (splits, samples, trials) 7" in page
    assert "torch 2.14.1" in page and "ray 2.60" in page and "audit-utility seeds 7 … 8" in page
    assert "git commit <code>" in page and f"run_dir: {run_dir}" in page
