"""``medisyn bench ingest``: end-to-end ingest throughput per core, and 1 → 2 worker scaling.

Sources are made here (no download): 512×512 int16 CT DICOMs (as real CT slices are) and
640×480 RGB PNG photographs. Each source kind is ingested with 1 and then 2 concurrent Ray
tasks, in one process on one local cluster, through the real pipeline (listing, decode,
window, resize, encode, hashes, staging, dedup, finalize). "per core" is end to end, fixed
job costs included (Ray Data job start-up, worker imports, listing, dedup, summary);
"in-task/core" is images per second of task time, the rate a large repository approaches.
The stored encoding's cost is shown beside Pillow's default PNG level as the baseline.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from medisyn.config import RunConfig, load_config


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    small = rng.normal(size=(h // 32 + 1, w // 32 + 1))
    big = np.asarray(Image.fromarray(small.astype(np.float32)).resize((w, h), Image.Resampling.BICUBIC))
    return big


def make_sources(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` CT DICOMs and ``n`` PNGs with label CSVs and a repositories.yaml; returns that file."""
    import pydicom
    from pydicom.data import get_testdata_file

    rng = np.random.default_rng(seed)
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ct, png = root / "ct", root / "png"
    ct.mkdir(parents=True)
    png.mkdir(parents=True)
    for i in range(n):
        hu = np.clip(_smooth(rng, 512, 512) * 400 - 300 + rng.normal(0, 30, (512, 512)), -1024, 2000)
        ds = template.copy()
        ds.Rows = ds.Columns = 512
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        ds.save_as(ct / f"{i:05d}.dcm")
        rgb = np.clip(
            np.stack([_smooth(rng, 480, 640) * 50 + 128 + 40 * c for c in (1, 0, -1)], -1)
            + rng.normal(0, 6, (480, 640, 3)),
            0,
            255,
        ).astype(np.uint8)
        Image.fromarray(rgb).save(png / f"{i:05d}.png")
    for folder, ext in ((ct, "dcm"), (png, "png")):
        pd.DataFrame(
            {"path": [f"{i:05d}.{ext}" for i in range(n)], "pid": [f"p{i // 4}" for i in range(n)], "label": ["a"] * n}
        ).to_csv(folder / "labels.csv", index=False)
    common = dict(
        labels_csv="labels.csv",
        path_column="path",
        label_columns=["label"],
        patient_column="pid",
        template="Bench image showing {label}.",
        classes={"a": "a finding"},
    )
    repos = [
        dict(
            name="ct",
            kind="dicom",
            path="ct",
            glob="*.dcm",
            specialty="radiology",
            image_type="computed tomography",
            **common,
        ),
        dict(name="png", kind="image", path="png", glob="*.png", specialty="surgery", image_type="endoscopy", **common),
    ]
    f = root / "repositories.yaml"
    f.write_text(yaml.safe_dump({"repositories": repos}))
    return f


def _only(repos_file: Path, name: str) -> Path:
    data = yaml.safe_load(repos_file.read_text())
    data["repositories"] = [r for r in data["repositories"] if r["name"] == name]
    out = repos_file.with_name(f"repositories-{name}.yaml")
    out.write_text(yaml.safe_dump(data))
    return out


def _encode_rate(images: list[Image.Image], fmt: str, level: int) -> tuple[float, float]:
    """(images/s, mean KiB) of one encoding on one core."""
    from medisyn.images import encode_image

    start, size = time.perf_counter(), 0
    for img in images:
        size += len(encode_image(img, fmt, level))
    return len(images) / (time.perf_counter() - start), size / len(images) / 1024


def run(cfg: RunConfig, images: int = 256) -> list[dict]:
    from medisyn.ingest.pipeline import run as ingest
    from medisyn.raytools import ensure_ray

    ensure_ray()
    tmp = Path(tempfile.mkdtemp(prefix="medisyn-bench-ingest-"))
    results = []
    try:
        print(f"bench ingest: making {images} CT DICOMs (512x512 int16) and {images} PNGs (640x480 RGB) ...")
        repos_file = make_sources(tmp / "src", images)
        print(
            f"{'source':8s} {'workers':>7s} {'images':>7s} {'seconds':>8s} {'images/s':>9s} {'per core':>9s} "
            f"{'speed-up':>9s} {'in-task/core':>13s}"
        )
        for source in ("ct", "png"):
            base = None
            for workers in (1, 2):
                run_cfg = load_config(
                    None,
                    [
                        f"run_dir={tmp / f'run-{source}-{workers}'}",
                        f"ingest.repositories_file={_only(repos_file, source)}",
                        f"ingest.max_tasks={workers}",
                        "ingest.files_per_task=16",
                        f"ingest.image_format={cfg.ingest.image_format}",
                        f"ingest.png_compress_level={cfg.ingest.png_compress_level}",
                    ],
                )
                start = time.perf_counter()
                summary = ingest(run_cfg)
                seconds = time.perf_counter() - start
                n = summary["accounting"]["corpus"] + summary["accounting"]["duplicates"]
                rate = n / seconds
                base = base or rate
                in_task = n / max(summary["task_seconds"], 1e-9)  # read→encode→write, without fixed job costs
                row = {
                    "source": source,
                    "workers": workers,
                    "images": n,
                    "seconds": seconds,
                    "images_per_s": rate,
                    "per_core": rate / workers,
                    "speedup": rate / base,
                    "in_task_per_core": in_task,
                }
                results.append(row)
                print(
                    f"{source:8s} {workers:7d} {n:7d} {seconds:8.1f} {rate:9.1f} {rate / workers:9.1f} "
                    f"{rate / base:9.2f} "
                    f"{in_task:13.1f}"
                )
        colour = [Image.open(f).convert("RGB").resize((512, 512)) for f in sorted((tmp / "src/png").glob("*.png"))[:16]]
        grey = [c.convert("L") for c in colour]
        print("stored encoding, one core (baseline: Pillow's default PNG, level 6):")
        for name, imgs in (("colour", colour), ("grey", grey)):
            base_rate, base_kib = _encode_rate(imgs, "png", 6)
            rate, kib = _encode_rate(imgs, cfg.ingest.image_format, cfg.ingest.png_compress_level)
            print(
                f"  {name:6s} {cfg.ingest.image_format}: {rate:6.0f} images/s {kib:6.0f} KiB | "
                f"PNG-6: {base_rate:6.0f} images/s "
                f"{base_kib:6.0f} KiB | {rate / base_rate:.1f}x faster"
            )
        for source in ("ct", "png"):
            one, two = [r for r in results if r["source"] == source]
            print(f"{source}: scaling efficiency 1 -> 2 workers: {two['speedup'] / 2:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
