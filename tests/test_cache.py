"""The cache stage: captions encoded by the text encoders alone, off the driver; latents resumed
after a truncated shard; crop corners rescaled from the ingest size; train ids kept out of
cache.json."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from medisyn import storage
from medisyn.config import load_config
from medisyn.records import CORPUS_SCHEMA, shard_files

ROOT = Path(__file__).resolve().parents[1]

CAPTIONS = ["Dermoscopy image showing melanoma.", "Frontal (AP) chest X-ray image showing edema and cardiomegaly."]


def _refuse(what: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{what} was loaded")

    return refuse


@pytest.mark.parametrize("source", ["build", "saved"])
def test_caption_encoder_loads_only_the_text_encoders(tmp_path, monkeypatch, source):
    """No U-Net, no VAE, no pipeline; the encodings are the full pipeline's ``encode_prompt``'s."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    from medisyn.models import build_pipeline, save_pipeline
    from medisyn.train.cache import _encode_text, load_text

    overrides = ["model.preset=tiny", f"run_dir={tmp_path}"]
    pipe = build_pipeline("tiny", seed=0)
    if source == "saved":  # a model directory in the diffusers layout (as SDXL's hub repo is)
        overrides.append(f"model.base={save_pipeline(pipe, tmp_path / 'model')}")
        pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "model")
    cfg = load_config(None, overrides)
    with torch.no_grad():  # the previous path: the whole pipeline, one batch
        e, _, p, _ = pipe.encode_prompt(
            ["", *sorted(CAPTIONS)], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    for cls in (UNet2DConditionModel, AutoencoderKL, StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "__init__", _refuse(cls.__name__))
        monkeypatch.setattr(cls, "from_pretrained", _refuse(cls.__name__))

    out = tmp_path / "text.parquet"
    assert _encode_text(cfg.model, CAPTIONS, storage.uri(out)) == 3  # the work of the Ray task, here
    captions, embeds, pooled = load_text(out)
    assert captions == ["", *sorted(CAPTIONS)]
    np.testing.assert_array_equal(embeds, e.to(torch.float16).numpy())
    np.testing.assert_array_equal(pooled, p.to(torch.float16).numpy())


def test_vae_scaling_factor_needs_no_weights():
    from medisyn.models import load_vae, vae_scaling_factor

    cfg = load_config(None, ["model.preset=tiny"])
    assert vae_scaling_factor(cfg.model) == load_vae(cfg.model).config.scaling_factor == 0.13025


def _corpus(run_dir, n_train: int = 40, n_val: int = 5, size: int = 128) -> list[dict]:
    """A corpus shard of random ``size``² images (as ingested at ``ingest.size`` = size)."""
    rows = _corpus_rows(n_train + n_val, size, n_train)
    storage.write_table(pa.Table.from_pylist(rows, CORPUS_SCHEMA), storage.path(run_dir) / "corpus" / "s-0.parquet")
    return rows


def _corpus_rows(n: int, size: int, n_train: int | None = None) -> list[dict]:
    from PIL import Image

    n_train = n if n_train is None else n_train
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        rows.append(
            {
                "id": f"{i:032x}",
                "image": buf.getvalue(),
                "caption": CAPTIONS[i % 2],
                "specialty": "dermatology",
                "image_type": "dermoscopy",
                "labels": ["melanoma"],
                "patient_id": f"p{i}",
                "split": "train" if i < n_train else "val",
                "source": "s",
                "source_ref": f"s/{i:016x}",
                "series": f"s/{i:016x}",
                "original_size": [size, 2 * size],
                "crop_top_left": [0, 2 * i + 1],  # odd: their half at 64 px rounds
            }
        )
    return rows


def _latents(folder) -> dict:
    """``{id: (crop_top_left, mean, logvar)}`` of a latents folder, as plain lists and float32 arrays."""
    table = pa.concat_tables(storage.read_table(f) for f in shard_files(folder))
    return {
        r["id"]: (
            np.asarray(r["crop_top_left"]).tolist(),
            np.asarray(r["mean"], np.float32),
            np.asarray(r["logvar"], np.float32),
        )
        for r in table.to_pylist()
    }


@pytest.mark.ray
def test_cache_resumes_a_truncated_latent_shard_and_keeps_the_driver_light(ray_cluster, tmp_path, monkeypatch):
    import medisyn.models
    from medisyn.train.cache import cache_dir, ids_digest, read_train_ids
    from medisyn.train.cache import run as cache

    rows = _corpus(tmp_path)
    train = sorted(r["id"] for r in rows if r["split"] == "train")
    cfg = load_config(
        None,
        [
            "model.preset=tiny",
            f"run_dir={tmp_path}",
            "ingest.size=128",
            "train.resolution=64",
            "train.use_gpu=false",
            "cache.batch_size=8",
            "cache.rows_per_file=8",
        ],
    )
    for name in ("load_text_encoders", "load_pipeline", "build_pipeline", "load_vae"):  # on the driver
        monkeypatch.setattr(medisyn.models, name, _refuse(f"medisyn.models.{name} on the driver"))

    first = cache(cfg)
    assert first["latents_encoded"] == len(train) and first["captions_encoded"] == 3
    out = cache_dir(cfg)
    info = json.loads((out / "cache.json").read_text())
    assert "train_ids" not in info and info["train_count"] == info["images"] == len(train)
    assert info["train_ids_sha256"] == ids_digest(train) and read_train_ids(out) == train
    whole = _latents(out / "latents")
    assert sorted(whole) == train  # the train split only
    # crop corners scaled from the stored images' side (ingest.size 128) to the training resolution
    assert all(whole[r["id"]][0] == [0, round((2 * i + 1) / 2)] for i, r in enumerate(rows[: len(train)]))

    shards = shard_files(out / "latents")
    assert len(shards) >= 5
    cut = shards[len(shards) // 2]
    n_cut = storage.parquet_file(cut).metadata.num_rows
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # a writer killed mid-file

    second = cache(cfg)
    assert second == {**second, "latents_encoded": n_cut, "captions_encoded": 0}
    assert not cut.exists() and all(storage.parquet_is_whole(f) for f in shard_files(out / "latents"))
    again = _latents(out / "latents")
    assert sorted(again) == train
    for image_id, (crop, mean, logvar) in whole.items():  # the same result as the uninterrupted run
        assert again[image_id][0] == crop
        np.testing.assert_array_equal(again[image_id][1], mean)
        np.testing.assert_array_equal(again[image_id][2], logvar)
    assert cache(cfg)["latents_encoded"] == 0


def test_the_cache_is_keyed_by_the_vaes_content_not_its_path(tmp_path):
    """A run directory moved or synced to a bucket keeps its cache: a VAE folder copied elsewhere
    (new path, new times) names the same cache; another byte in its weights names another."""
    import os
    import shutil

    from medisyn.models import model_identity

    vae = tmp_path / "run" / "vae"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text('{"scaling_factor": 0.5}')
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 64)
    (vae / "fit.json").write_text("{}")  # the fit's record: not what encodes
    here = model_identity(load_config(None, ["model.preset=tiny", f"model.vae={vae}"]).model, 64)
    moved = tmp_path / "elsewhere" / "copy-of-run" / "vae"
    shutil.copytree(vae, moved)
    for f in moved.iterdir():
        os.utime(f, ns=(1, 1))
    (moved / "fit.json").write_text('{"val_mse": 0.1}')
    assert model_identity(load_config(None, ["model.preset=tiny", f"model.vae={moved}"]).model, 64) == here
    weights = moved / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # refit in place: same size, other weights
    assert model_identity(load_config(None, ["model.preset=tiny", f"model.vae={moved}"]).model, 64) != here
    # a hub VAE (the paper's) keeps the name its caches had before: no run re-encodes for this change
    paper = load_config(ROOT / "jobs/configs/paper.yaml")
    assert model_identity(paper.model, 512) == "sdxl-r512-a355f0cc87"


def test_the_encoder_actor_gets_decoded_pixels_from_a_cpu_stage(monkeypatch):
    """``decode_images`` (a CPU map_batches stage) turns corpus bytes into uint8 pixels at the
    training resolution; the VAE actor encodes them and decodes nothing itself."""
    import PIL.Image

    from medisyn.images import decode_batch
    from medisyn.models import load_vae
    from medisyn.train.cache import VaeEncoder, decode_images

    rows = _corpus_rows(4, size=32)
    batch = {k: [r[k] for r in rows] for k in ("id", "image", "caption", "original_size", "crop_top_left")}
    decoded = decode_images(batch, 16)
    assert "image" not in decoded and decoded["id"] == batch["id"] and decoded["caption"] == batch["caption"]
    assert decoded["pixels"].dtype == np.uint8 and decoded["pixels"].shape == (4, 16, 16, 3)
    np.testing.assert_allclose(decoded["pixels"].transpose(0, 3, 1, 2) / 127.5 - 1.0,
                               decode_batch(batch, 16)["pixels"] / np.float32(127.5) - 1, atol=1e-6)  # fmt: skip
    cfg = load_config(None, ["model.preset=tiny", "train.resolution=16", "ingest.size=32"])
    encoder = VaeEncoder(cfg)
    x = torch.from_numpy(
        decode_batch({"image": [r["image"] for r in rows]}, 16)["pixels"] / np.float32(127.5) - 1
    )  # the bytes, decoded here

    def no_decoding(*args, **kwargs):
        raise AssertionError("the actor decoded an image")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    out = encoder(decoded)
    assert out["mean"].shape == (4, 4, 2, 2) and out["logvar"].dtype == np.float16
    assert [list(c) for c in out["crop_top_left"]] == [[0, round((2 * i + 1) / 2)] for i in range(4)]
    with torch.no_grad():
        want = load_vae(cfg.model).encode(x).latent_dist.mean.numpy().astype(np.float16)
    np.testing.assert_allclose(out["mean"].astype(np.float32), want.astype(np.float32), atol=2e-3)


GPU_NODE, CPU_NODE, HEAD = {"CPU": 192.0, "GPU": 8.0}, {"CPU": 32.0}, {"CPU": 0.0}


@pytest.mark.parametrize(
    ("nodes", "groups", "gpus"),
    [
        ([HEAD, {"CPU": 2.0}], [], 0.0),  # the demo, the tests: a CPU machine
        ([HEAD, GPU_NODE], [], 8.0),  # a fixed GPU cluster
        ([HEAD], [(CPU_NODE, 8), (GPU_NODE, 8)], 64.0),  # cluster.yaml from a head alone
        ([HEAD, GPU_NODE, CPU_NODE], [(CPU_NODE, 8), (GPU_NODE, 8)], 64.0),  # a node up counts against its type
        ([HEAD, GPU_NODE], [(GPU_NODE, 1)], 8.0),
        ([HEAD], [(GPU_NODE, -1)], None),  # unbounded
    ],
)
def test_gpu_capacity_counts_what_is_up_and_what_autoscaling_can_add(nodes, groups, gpus):
    from medisyn.raytools import gpu_capacity

    assert gpu_capacity(nodes, groups) == gpus


@pytest.mark.parametrize(
    ("min_actors", "max_actors", "use_gpu", "gpus", "bounds"),
    [
        (1, 0, True, 64.0, (1, 64)),  # default: every GPU the cluster has or can add
        (4, 0, True, 8.0, (4, 8)),
        (1, 16, True, 8.0, (1, 8)),  # no actor waits for a GPU that can never come
        (8, 16, True, 4.0, (4, 4)),
        (1, 0, True, None, (1, None)),  # an unbounded node type: Ray Data's unbounded pool
        (2, 6, True, None, (2, 6)),
        (1, 0, False, 0.0, (1, 1)),  # a CPU cluster: the pool stays small
        (4, 0, False, 0.0, (1, 1)),  # the paper's minimum on a CPU cluster
        (1, 2, False, 0.0, (1, 2)),
    ],
)
def test_actor_pools_are_sized_from_the_clusters_gpus(min_actors, max_actors, use_gpu, gpus, bounds):
    from medisyn.raytools import actor_pool_bounds

    assert actor_pool_bounds(min_actors, max_actors, use_gpu, gpus) == bounds


def test_pool_bounds_in_config_and_in_the_stage_preflight():
    from medisyn.configtools import ConfigError
    from medisyn.raytools import stage_requests

    paper = load_config(ROOT / "jobs/configs/paper.yaml")
    assert (paper.cache.min_actors, paper.cache.max_actors) == (4, 0)
    assert stage_requests("cache", paper, gpus=True) == [{"GPU": 1}] * 4  # the pool's minimum
    assert stage_requests("cache", paper, gpus=False) == [{"CPU": 1}]  # small on a CPU cluster
    assert stage_requests("audit-memorization", paper, gpus=True) == [{"GPU": 1}]
    for section in ("cache", "audit_memorization"):
        with pytest.raises(ConfigError, match=f"{section}.min_actors: 3 is above {section}.max_actors"):
            load_config(None, [f"{section}.min_actors=3", f"{section}.max_actors=2"])
        with pytest.raises(ConfigError, match=f"{section}.max_actors"):
            load_config(None, [f"{section}.max_actors=-1"])
