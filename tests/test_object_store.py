"""The demo pipeline with its run directory on object storage (an S3 server on 127.0.0.1).

The phantom sources are written to a local disk, as a user's own repositories would be; every
stage after them reads and writes only ``s3://``. The outputs must equal a local run's: the
same corpus ids, the same checkpoint names, the same manifest ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medisyn import storage
from medisyn.config import load_config
from medisyn.records import read_corpus, read_manifest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs/configs/demo.yaml"
FAST = [  # the end-to-end test's settings (test_cli), with one utility seed
    "train.resolution=64",
    "vae_fit.epochs=14",
    "train.epochs=2",
    "train.repeats=2",
    "select.num_images=8",
    "select.steps=4",
    "generate.max_per_prompt=2",
    "generate.steps=3",
    "generate.resolution=64",
    "audit_utility.synthetic=4",
    "audit_utility.image_size=32",
    "audit_utility.seeds=1",
]


@pytest.mark.slow
def test_demo_pipeline_on_s3_equals_a_local_run(s3_server, ray_cluster, tmp_path):
    from medisyn.infer.generate import resolve_set
    from medisyn.infer.prompts import expand
    from medisyn.ingest.pipeline import run as ingest

    sources = tmp_path / "sources"
    uri = "s3://medisyn-test/demo"
    env = {**os.environ, **s3_server, "RAY_ADDRESS": ""}  # its own local cluster, started with these variables
    env.pop("RAY_ADDRESS")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medisyn.cli",
            "pipeline",
            "--config",
            str(DEMO),
            f"run_dir={uri}",
            f"phantoms.out={sources}",
            f"ingest.repositories_file={sources}/repositories.yaml",
            *FAST,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = storage.path(uri)
    assert (run / "report.html").exists() and (run / "model" / "medisyn.json").exists()

    # the local run of the same sources and settings
    local = load_config(
        DEMO, [f"run_dir={tmp_path / 'local'}", f"ingest.repositories_file={sources}/repositories.yaml", *FAST]
    )
    ingest(local)
    assert (
        read_corpus(run / "corpus", ["id"]).column("id").to_pylist()
        == read_corpus(local.run_path / "corpus", ["id"]).column("id").to_pylist()
    )
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("epoch-"))
    assert names == ["epoch-000", "epoch-001"]
    for name in local.generate.sets:
        pset = resolve_set(local, name)
        want = sorted(j.id for j in expand(pset))
        have = read_manifest(run / "synthetic" / pset.name, ["id"]).column("id").to_pylist()
        assert sorted(have) == want and len(want) > 0
    summary = json.loads((run / "audit" / "utility" / "summary.json").read_text())
    assert summary["seeds"] == 1 and (run / "audit" / "memorization" / "summary.json").exists()
    # no URI was mangled into a local path (pathlib turns "s3://b/x" into the folder "s3:/b/x")
    assert not (ROOT / "s3:").exists() and not any(p.name == "s3:" for p in tmp_path.rglob("s3:"))
