"""Shared fixtures: one local Ray cluster per session, phantoms and a tiny pipeline built once.

Unit tests never touch Ray; tests that need it take the ``ray_cluster`` fixture, which starts
a 2-CPU local cluster the first time and reuses it (starting one costs ~3 s, a Train run ~30 s).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

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


@pytest.fixture(autouse=True)
def no_ray_deprecations(monkeypatch):
    """Fail a test in which Ray logged a deprecation (Ray Data logs some, e.g. `concurrency=`,
    instead of warning): our calls use the pinned Ray's current API. Ray reconfigures its
    loggers' handlers when a dataset first runs, so the record is caught in ``Logger.handle``."""
    messages: list[str] = []
    handle = logging.Logger.handle

    def spy(self, record):
        if self.name.startswith("ray") and "deprecated" in record.getMessage().lower():
            messages.append(record.getMessage())
        return handle(self, record)

    monkeypatch.setattr(logging.Logger, "handle", spy)
    yield
    if messages:
        pytest.fail(f"Ray deprecation logged: {messages[0]}")


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
    """The small phantom repositories in the flat layout (one label table each and a repositories.yaml,
    the ingest.repositories format; seed 0, with planted defects), generated once."""
    from medisyn.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("phantoms") / "phantoms"
    generate_phantoms(out, seed=0, scale="small", layout="flat")
    return out


def flat(repositories_file) -> list[str]:
    """Overrides that make the demo config read repositories in the flat layout (ingest.repositories_file)
    instead of its catalog sources."""
    return [
        "phantoms.layout=flat",
        "ingest.sources=",
        "ingest.sources_root=",
        "ingest.source_entries=[]",
        "ingest.source_settings={}",
        f"ingest.repositories_file={repositories_file}",
    ]


@pytest.fixture(scope="session")
def demo_sources(tmp_path_factory):
    """The demo's repositories as their publishers ship them (the phantoms' demo layout, seed 0, small, with
    planted defects), generated once: what `make demo` ingests through the paper catalog."""
    from medisyn.phantoms import generate_phantoms

    out = tmp_path_factory.mktemp("sources") / "phantoms"
    generate_phantoms(out, seed=0, scale="small", progress=False)
    return out


@pytest.fixture(scope="session")
def replica_root(tmp_path_factory):
    """Replicas of the paper's source repositories in their real layouts (seed 0), generated once.
    Read-only: a test that breaks one (phantoms.replicas.break_replica) copies the entry first."""
    from medisyn.phantoms.replicas import generate_replicas

    out = tmp_path_factory.mktemp("replicas") / "replicas"
    generate_replicas(out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_pipe():
    from medisyn.models import build_pipeline

    return build_pipeline("tiny", seed=0)


@pytest.fixture(scope="session")
def ingested(ray_cluster, demo_sources, tmp_path_factory):
    """The demo's repositories ingested once with the demo config: (config, run dir, summary)."""
    from pathlib import Path

    from medisyn.config import load_config
    from medisyn.ingest.pipeline import run as ingest

    root = Path(__file__).resolve().parents[1]
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(
        root / "jobs/configs/demo.yaml",
        [f"run_dir={run_dir}", "phantoms.enabled=false", f"ingest.sources_root={demo_sources}"],
    )
    return cfg, run_dir, ingest(cfg)


def fake_synthetic_set(run_dir, name: str = "utility", per_class: int = 12, size: int = 64):
    """A synthetic set made of real train images (re-encoded PNGs, single-label rows only), so
    the utility audit can run without a diffusion model: the manifest is the real format."""
    import io
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from medisyn.records import MANIFEST_SCHEMA, read_corpus

    cols = ["id", "image", "specialty", "image_type", "labels", "caption"]
    rows = read_corpus(Path(run_dir) / "corpus", cols, split="train").to_pylist()
    out = Path(run_dir) / "synthetic" / name
    out.mkdir(parents=True, exist_ok=True)
    seen, records = {}, []
    for r in rows:
        key = (r["specialty"], r["image_type"], *r["labels"])
        if len(r["labels"]) != 1 or seen.get(key, 0) >= per_class:
            continue
        seen[key] = seen.get(key, 0) + 1
        image_id = f"{r['id'][:12]}s"
        Image.open(io.BytesIO(r["image"])).convert("RGB").resize((size, size)).save(out / f"{image_id}.png")
        records.append(
            {
                "id": image_id,
                "file": f"{image_id}.png",
                "prompt": r["caption"],
                "specialty": r["specialty"],
                "image_type": r["image_type"],
                "labels": r["labels"],
                "seed": 0,
                "index": seen[key],
                "checkpoint": "real images (test fixture)",
                "guidance_scale": 1.0,
                "steps": 1,
                "scheduler": "none",
                "original_size": [size, size],
            }
        )
    pq.write_table(pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA), out / "manifest.parquet")
    return out


@pytest.fixture(scope="session")
def s3_server():
    """An S3 server on 127.0.0.1 (moto's server mode) with a bucket; yields the environment that
    points fsspec, pyarrow and boto at it (the standard AWS variables, nothing of ours)."""
    from medisyn.storage import local_s3

    with local_s3("medisyn-test") as env:
        yield env


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"  # Debian's package (make browser)
CHROMIUM_FLAGS = [  # headless as root, no calls to Google's services (the network is closed)
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


READER_STUDIES = {  # (source, specialty, image_type, classes, grey) as in jobs/configs/reader/demo.yaml
    "cholecystectomy-phase": (
        "cholec80",
        "surgery",
        "endoscopy",
        ("Calot's triangle dissection", "clipping and cutting", "cleaning and coagulation"),
        False,
    ),
    "oct-condition": (
        "kermany-oct",
        "ophthalmology",
        "optical coherence tomography",
        ("normal findings", "drusen", "diabetic macular edema"),
        True,
    ),
}


def reader_run(run_dir, per_class: int = 4, size: int = 48, overrides: tuple[str, ...] = ()):
    """A run directory the reader study can be built from, without Ray or a model: a corpus shard
    (test images of both demo studies' classes, plus rows no study may use: other splits, other
    sources, other classes, two labels) and a synthetic set ``reader`` (colour PNGs, as a model
    makes them), written in the real formats. Returns the loaded config."""
    import io
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from medisyn import storage
    from medisyn.config import load_config
    from medisyn.records import CORPUS_SCHEMA, MANIFEST_SCHEMA

    rng = np.random.default_rng(0)
    run_dir = Path(run_dir)

    def png(grey: bool, s: int) -> bytes:
        buf = io.BytesIO()
        shape = (s, s) if grey else (s, s, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    rows, manifest = [], []
    out = run_dir / "synthetic" / "reader"
    out.mkdir(parents=True, exist_ok=True)
    for source, specialty, image_type, classes, grey in READER_STUDIES.values():
        extra = [(("preparation",), "test", source), ((classes[0], classes[1]), "test", source)]
        plan = [((c,), split, source) for c in classes for split in ("test",) * per_class + ("train",)]
        plan += [((classes[0],), "test", "elsewhere")] + extra
        for k, (labels, split, src) in enumerate(plan):
            rows.append(
                {
                    "id": f"{source}{k:04d}".ljust(32, "0"),
                    "image": png(grey, size * 2),
                    "caption": f"{image_type} showing {' and '.join(labels)}.",
                    "specialty": specialty,
                    "image_type": image_type,
                    "labels": list(labels),
                    "patient_id": f"p{k}",
                    "split": split,
                    "source": src,
                    "source_ref": f"{src}/{k:016x}",
                    "series": f"{src}/{k:016x}",
                    "original_size": [size * 2, size * 2],
                    "crop_top_left": [0, 0],
                }
            )
        for c in classes:
            for i in range(per_class):
                image_id = f"s{source}{c[:4]}{i}".replace(" ", "").replace("'", "")
                (out / f"{image_id}.png").write_bytes(png(False, size))
                manifest.append(
                    {
                        "id": image_id,
                        "file": f"{image_id}.png",
                        "prompt": f"{image_type} showing {c}.",
                        "specialty": specialty,
                        "image_type": image_type,
                        "labels": [c],
                        "seed": i,
                        "index": i,
                        "checkpoint": "epoch-000",
                        "guidance_scale": 7.0,
                        "steps": 20,
                        "scheduler": "EulerDiscreteScheduler",
                        "original_size": [size, size],
                        "bytes": 0,
                        "sha256": "",
                    }
                )
    storage.write_table(pa.Table.from_pylist(rows, CORPUS_SCHEMA), run_dir / "corpus" / "c-0.parquet")
    pq.write_table(pa.Table.from_pylist(manifest, schema=MANIFEST_SCHEMA), out / "manifest.parquet")
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "reader.studies_file=demo",
            f"reader.images_per_study={per_class * 3}",
            f"reader.image_size={size}",
            "reader.repeat_fraction=0.25",
            "reader.bootstrap_resamples=200",
            *overrides,
        ],
    )


# --- a real Ray head, as users run one: `ray start --head`, token authentication, own ports ---


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def get_json(url: str, token: str | None = None):
    import json
    import urllib.request

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return json.loads(r.read() or b"null")


@contextlib.contextmanager
def ray_head(tmp_path, num_cpus: int = 2, extra_env: dict | None = None):
    """A head started with `ray start --head --block` on 127.0.0.1 with token authentication, its own
    ports and temporary dir, and its job API up; yields (job API url, GCS address, token, the client
    environment). Stopped with SIGTERM, then any process still running from its temporary dir is
    killed by id — never `ray stop`, which stops every Ray cluster on the machine."""
    import json
    import secrets
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.error
    from pathlib import Path

    import psutil

    temp_dir = tempfile.mkdtemp(prefix="msray", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash, client_port, agent, agent_grpc, env_agent, metrics, node_mgr, obj_mgr = free_ports(9)
    token = secrets.token_hex(16)
    env = os.environ | (extra_env or {})
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "HOME": str(tmp_path),  # no ~/.ray/auth_token of the user's is read or written
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # `python` in an entrypoint: this venv's
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
            f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
            f"--object-manager-port={obj_mgr}", f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}",
            f"--object-store-memory={512 * 1024**2}", "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(f"{url}/api/jobs/", token)
                break
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                assert head.poll() is None, "ray start --head exited"
                assert time.monotonic() < deadline, "the head's job API did not come up in 60 s"
                time.sleep(0.5)
        yield url, f"127.0.0.1:{gcs}", token, env
    finally:
        head.terminate()
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=10)
        left = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(temp_dir in part for part in proc.info["cmdline"] or []):
                    left.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for proc in left:
            proc.kill()
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
