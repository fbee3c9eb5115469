"""Shared fixtures: one local Ray cluster per session, phantoms and a tiny pipeline built once.

Unit tests never touch Ray; tests that need it take the ``ray_cluster`` fixture, which starts
a 2-CPU local cluster the first time and reuses it (starting one costs ~3 s, a Train run ~30 s).
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    gpu_items = [i for i in items if "gpu" in i.keywords]
    if not gpu_items:
        return
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A 2-CPU local Ray cluster shared by the whole session, its files under the test tmp dir."""
    import ray

    temp_dir = tmp_path_factory.mktemp("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(temp_dir),
        configure_logging=False,
        object_store_memory=512 * 1024**2,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory):
    """The small phantom repositories (seed 0, with planted defects), generated once."""
    from medisyn.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms") / "phantoms"
    generate_phantoms(out, seed=0, scale="small")
    return out


@pytest.fixture(scope="session")
def tiny_pipe():
    from medisyn.models import build_pipeline

    return build_pipeline("tiny", seed=0)


@pytest.fixture(scope="session")
def ingested(ray_cluster, phantom_root, tmp_path_factory):
    """The phantoms ingested once with the demo config: (config, run dir, summary)."""
    from pathlib import Path

    from medisyn.config import load_config
    from medisyn.ingest.pipeline import run as ingest

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(
        root / "jobs/configs/demo.yaml",
        [f"run_dir={run_dir}", f"ingest.repositories_file={phantom_root / 'repositories.yaml'}"],
    )
    return cfg, run_dir, ingest(cfg)
