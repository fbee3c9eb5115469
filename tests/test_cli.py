"""The command line as a user meets it, and the one slow end-to-end run of `make demo`'s pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def test_every_stage_is_built_and_an_unbuilt_one_would_say_so(monkeypatch):
    import medisyn.cli as cli
    from medisyn.config import load_config
    from medisyn.stages import STAGE_BY_NAME, Stage

    assert all(s.built for s in STAGES)
    monkeypatch.setattr(cli, "STAGE_BY_NAME", {**STAGE_BY_NAME, "later": Stage("later", "to come", issue=99)})
    with pytest.raises(SystemExit) as exc:
        cli.run_stage("later", load_config(DEMO))
    assert "stage 'later' is not built yet (issue #99)" in str(exc.value.code)


def test_reader_actions_from_the_command_line(tmp_path, capsys):
    from conftest import reader_run

    reader_run(tmp_path)
    base = ["--config", str(DEMO), f"run_dir={tmp_path}", "reader.images_per_study=12", "reader.real_splits=[test]"]
    assert main(["reader", *base]) == 0  # build is the default action
    assert main(["reader", "add-reader", *base]) == 2
    assert "name the study with --study" in capsys.readouterr().err
    assert main(["reader", "add-reader", "--study", "nope", *base]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    args = ["reader", "add-reader", "--study", "oct-condition", "--name", "Dr A", "--base-url", "https://r.lab.org/"]
    assert main([*args, *base]) == 0
    line = capsys.readouterr().out
    assert "reader 1 (oct-condition): https://r.lab.org/#t=" in line
    assert main(["reader", "add-reader", "--admin", *base]) == 0
    assert "admin 2: token " in capsys.readouterr().out
    assert main(["reader", "analyze", *base]) == 0
    assert "oct-condition: no submitted readers yet (0 reading)" in capsys.readouterr().out
    assert main(["reader", "export", *base]) == 0
    assert (tmp_path / "reader" / "exports" / "mrmc.csv").is_file()
    assert main(["reader", "frobnicate", *base]) == 2
    assert "unknown action 'frobnicate'" in capsys.readouterr().err


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
    assert not list(Path.cwd().glob("run_dir=*")) and (run_dir / "phantoms/rspect/train.csv").is_file()


def test_phantoms_command_is_idempotent(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantoms", str(out), "--seed", "3", "--scale", "small"]) == 0
    first = (out / "phantoms.json").read_text()
    stamp = (out / "phantoms.json").stat().st_mtime_ns
    assert main(["phantoms", str(out), "--seed", "3", "--scale", "small"]) == 0  # same settings: nothing redone
    assert (out / "phantoms.json").stat().st_mtime_ns == stamp
    assert json.loads(first)["seed"] == 3 and "rspect" in capsys.readouterr().out


def test_the_report_records_config_seeds_versions_and_commit(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["report", "--config", str(DEMO), f"run_dir={run_dir}", "seed=7"]) == 0
    page = (run_dir / "report.html").read_text()
    assert "<h2>Provenance</h2>" in page and "seed (splits, samples, trials) 7" in page
    assert "torch 2.14.1" in page and "ray 2.60" in page and "audit-utility seeds 7 … 8" in page
    assert "git commit <code>" in page and f"run_dir: {run_dir}" in page


def test_phantoms_layout_flag_and_config_choose_the_layout(tmp_path, monkeypatch):
    """`--layout flat` (or phantoms.layout: flat) writes the ingest.repositories format; the demo's default
    writes the repositories as published; a folder of the other layout is made again, not reused."""
    import medisyn.phantoms as phantoms

    made = []
    monkeypatch.setattr(phantoms, "generate_phantoms", lambda out, **kw: made.append(kw["layout"]) or {"seed": 0})
    assert main(["phantoms", str(tmp_path / "a"), "--layout", "flat"]) == 0
    assert main(["phantoms", str(tmp_path / "b")]) == 0
    assert main(["phantoms", "--config", str(DEMO), "phantoms.layout=flat", "--out", str(tmp_path / "c")]) == 0
    assert made == ["flat", "demo", "flat"]
