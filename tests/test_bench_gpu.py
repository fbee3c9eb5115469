"""One visit to a GPU node: `scripts/bench-gpu.sh` runs every GPU benchmark, each in its own process,
and `scripts/wheelhouse.py` fetches the wheels beforehand. GPU time is short and rare and the node has
no package index, so its first run must not fail on an import or a flag: the dry run here is the same
script on tiny sizes, with Ray, s3fs and pydicom made unimportable as on a node that lacks them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_BENCHES = ["train", "generate", "select", "embed", "classifier"]
BLOCKED = ("ray", "s3fs", "pydicom")
BLOCKER = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in BLOCKED)


def blocked_env(tmp_path: Path) -> dict:
    """An environment whose Python cannot import ray, s3fs or pydicom (a sitecustomize on PYTHONPATH)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable}


def test_every_bench_module_imports_without_ray_s3fs_or_dicom(tmp_path):
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "medisyn").glob("*/*bench*.py")  # bench.py and *_bench.py
    )
    assert {"medisyn.train.bench", "medisyn.audit.embed_bench", "medisyn.select.bench"} <= set(modules)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    code += "import medisyn.cli\nprint('imported', len(sys.argv) - 1)\n"
    out = subprocess.run(
        [sys.executable, "-c", code, *modules], env=blocked_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == f"imported {len(modules)}"


def test_the_blocker_blocks(tmp_path):
    code = "import importlib\ntry:\n    importlib.import_module('pydicom')\nexcept ImportError:\n    print('blocked')\n"
    out = subprocess.run([sys.executable, "-c", code], env=blocked_env(tmp_path), capture_output=True, text=True)
    assert out.stdout.strip() == "blocked"


def test_the_dry_run_writes_one_json_per_bench_and_the_table(tmp_path):
    out_dir = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(ROOT / "scripts/bench-gpu.sh"), str(out_dir), "--dry-run"],
        env=blocked_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=540,  # inside pytest-timeout's 600 s, so a hang shows its output
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    status = [line.split("\t") for line in (out_dir / "status.tsv").read_text().splitlines()]
    assert [s[0] for s in status] == GPU_BENCHES and all(s[1] == "0" for s in status)
    for name in GPU_BENCHES:
        doc = json.loads((out_dir / f"{name}.json").read_text())
        rows = doc.get("recipes") or doc["results"]
        rows = [rows] if isinstance(rows, dict) else rows
        assert any(r.get("samples_per_s", r.get("images_per_s", r.get("checkpoints_per_hour", 0))) > 0 for r in rows)
    train = json.loads((out_dir / "train.json").read_text())
    assert train["ddp"] is True and train["accumulation"] == 2  # the paper's plan's flags reach the bench
    embed = json.loads((out_dir / "embed.json").read_text())
    assert [r["arm"] for r in embed["results"]] == ["preprocess (1 CPU core)", "embedder (cpu)"]
    assert embed["peak_rss_gb"] > 0
    table = (out_dir / "table.txt").read_text()
    assert table == run.stdout[-len(table) :]  # printed last
    lines = table.splitlines()
    assert "throughput" in lines[1] and "peak memory" in lines[1]
    assert {line.split()[0] for line in lines[2:] if line and not line.startswith(" ")} == set(GPU_BENCHES)
    assert "FAILED" not in table and "torch" in (out_dir / "env.txt").read_text()


@pytest.fixture(scope="module")
def wheelhouse():
    spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts/wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheelhouse_asks_for_every_manylinux_tag_the_node_runs(wheelhouse):
    tags = wheelhouse.platforms("2.28")
    # torch 2.14.1 needs nvidia-nccl-cu13 2.30.7, published only as manylinux_2_18: pip matches tags
    # exactly, so a list of the usual few (2_28, 2_17, 2014) finds no nccl wheel and fails
    assert {"manylinux_2_28_x86_64", "manylinux_2_18_x86_64", "manylinux2014_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and "manylinux_2_4_x86_64" not in tags
    args = wheelhouse.target_args("3.12", "2.28")
    assert args[:5] == ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]


def test_wheelhouse_reads_a_nodes_pip_freeze(wheelhouse, tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text(
        "# node image\ntorch==2.11.0+cu128\nTorchVision==0.26.0\nopen_clip_torch @ file:///wheels/oc.whl\n"
        "-e git+https://example.invalid/x#egg=x\nPyYAML>=6\n\n"
    )
    assert wheelhouse.have_names(freeze) == {"torch", "torchvision", "open-clip-torch", "pyyaml"}
