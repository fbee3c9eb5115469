"""The cache stage: captions encoded by the text encoders alone, off the driver; latents resumed
after a truncated shard; crop corners rescaled from the ingest size; train ids kept out of
cache.json."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from medisyn import storage
from medisyn.config import load_config
from medisyn.records import CORPUS_SCHEMA, shard_files

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
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_train + n_val):
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
    storage.write_table(pa.Table.from_pylist(rows, CORPUS_SCHEMA), storage.path(run_dir) / "corpus" / "s-0.parquet")
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
