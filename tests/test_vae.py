"""The demo's VAE: fitted to the corpus by Ray Train, better than a trivial baseline, used downstream."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def fitted(ingested):
    from medisyn.config import load_config
    from medisyn.train.vae import run as fit_vae

    base, run_dir, _ = ingested
    cfg = load_config(
        base.config_path,
        [
            f"run_dir={run_dir}",
            f"ingest.sources_root={base.ingest.sources_root}",
            "phantoms.enabled=false",
            "model.vae={run_dir}/vae-64",
            "train.resolution=64",
            "vae_fit.epochs=4",  # 2 GroupNorm groups learn the phantoms in a few epochs at 64²
            "vae_fit.crop_size=32",  # learnt from 32² crops, scored on whole 64² images
            "vae_fit.lr_scheduler=cosine",
        ],
    )
    return cfg, fit_vae(cfg)


@pytest.mark.ray
def test_the_fitted_vae_beats_the_mean_colour_baseline_and_records_its_scale(fitted, tmp_path):
    from diffusers import AutoencoderKL

    cfg, fit = fitted
    assert fit["beats_baseline"] and fit["val_mse"] < fit["baseline_mse"], fit
    assert fit["input_side"] == 32  # the steps saw crops; the score above is of whole images
    from medisyn.report import vae_section

    assert "4 epochs on random 32² crops of the 64² images" in vae_section(cfg)
    assert fit["val_images"] > 20
    vae = AutoencoderKL.from_pretrained(cfg.model.vae)  # plain diffusers layout
    assert vae.config.scaling_factor == pytest.approx(fit["scaling_factor"]) and fit["scaling_factor"] != 0.13025
    assert (cfg.run_path / "vae_fit/epoch-003").is_dir()  # Ray Train checkpoints: a re-submitted job resumes
    import torch

    state = torch.load(cfg.run_path / "vae_fit/epoch-003/state.pt", weights_only=False)
    assert state["lr_scheduler"]["last_epoch"] == fit["steps"]  # the cosine ran over every step, saved to resume
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0, abs=1e-12)  # and ended at zero
    curve = fit["val_mse_by_epoch"]  # each epoch scored on val; the best one is the VAE written
    assert len(curve) == 4 and fit["epoch"] == curve.index(min(curve)) and curve[fit["epoch"]] < curve[0]
    kept = AutoencoderKL.from_pretrained(cfg.run_path / f"vae_fit/epoch-{fit['epoch']:03d}/vae")
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), vae.state_dict().values(), strict=True))
    stamp = (cfg.run_path / "vae-64/fit.json").stat().st_mtime_ns
    from medisyn.train.vae import run as fit_vae

    assert fit_vae(cfg)["val_mse"] == fit["val_mse"]  # same corpus and settings: nothing refit
    assert (cfg.run_path / "vae-64/fit.json").stat().st_mtime_ns == stamp


@pytest.mark.ray
def test_downstream_stages_load_the_fitted_vae_and_refuse_a_useless_one(fitted):
    from medisyn.models import load_pipeline, load_vae
    from medisyn.train.cache import cache_dir
    from medisyn.train.vae import check_fitted_vae, vae_fingerprint

    cfg, fit = fitted
    assert load_vae(cfg.model).config.scaling_factor == pytest.approx(fit["scaling_factor"])
    assert load_pipeline(cfg.model).vae.config.scaling_factor == pytest.approx(fit["scaling_factor"])
    from dataclasses import replace

    before = cache_dir(cfg)  # the cache is keyed by the VAE's weights: a refit VAE gets a new cache
    (cfg.run_path / "vae-64-copy").mkdir(exist_ok=True)
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        data = (cfg.run_path / "vae-64" / f).read_bytes()
        (cfg.run_path / "vae-64-copy" / f).write_bytes(data if f == "config.json" else data[:-1] + b"\x00")
    other = replace(cfg, model=replace(cfg.model, vae=str(cfg.run_path / "vae-64-copy")))
    assert vae_fingerprint(cfg.model.vae) != vae_fingerprint(other.model.vae) and cache_dir(other) != before
    check_fitted_vae(cfg)  # passes
    record = cfg.run_path / "vae-64/fit.json"
    saved = record.read_text()
    try:
        record.write_text(json.dumps({**json.loads(saved), "beats_baseline": False}))
        with pytest.raises(ValueError, match="does not beat the mean-colour baseline"):
            check_fitted_vae(cfg)
        from medisyn.train.cache import run as cache

        with pytest.raises(ValueError, match="does not beat"):
            cache(cfg)
    finally:
        record.write_text(saved)


@pytest.mark.ray
def test_the_vae_fits_the_images_the_unet_trains_on_with_repeats(ingested, tmp_path):
    """demo-memorize: the VAE fits the few images per caption the U-Net memorises, several passes an epoch."""
    from medisyn.config import load_config
    from medisyn.records import read_corpus
    from medisyn.train.trainer import training_ids
    from medisyn.train.vae import run as fit_vae

    base, run_dir, _ = ingested
    (tmp_path / "corpus").symlink_to(run_dir / "corpus")  # the shared corpus; this fit's own vae_fit/
    cfg = load_config(
        base.config_path,
        [
            f"run_dir={tmp_path}",
            f"ingest.sources_root={base.ingest.sources_root}",
            "phantoms.enabled=false",
            "model.vae={run_dir}/vae",
            "train.resolution=64",
            "train.subset_per_caption=1",
            "vae_fit.epochs=1",
            "vae_fit.repeats=3",
            "vae_fit.batch_size=8",
            "vae_fit.lr_scheduler=linear",
            "vae_fit.lr_warmup_steps=2",
        ],
    )
    split = read_corpus(cfg.run_path / "corpus", columns=["id"], split="train").column("id").to_pylist()
    chosen = training_ids(cfg, split)
    fit = fit_vae(cfg)
    assert fit["train_images"] == len(chosen) < len(split) // 3  # one image per caption, not the split
    assert fit["steps"] == -(-3 * len(chosen) // 8)  # 3 passes over them in the one epoch, batches of 8
    assert fit["fingerprint"]["vae_fit"]["repeats"] == 3 and fit["input_side"] == 64  # whole images by default
    import torch

    state = torch.load(tmp_path / "vae_fit/epoch-000/state.pt", weights_only=False)
    lrs = state["lr_scheduler"]["_last_lr"]
    assert state["lr_scheduler"]["last_epoch"] == fit["steps"] and lrs[0] == pytest.approx(0, abs=1e-12)


def test_the_kept_epoch_is_the_best_scored_one_or_the_last_when_none_is_scored():
    from medisyn.train.vae import kept_epoch

    nan = float("nan")
    assert kept_epoch([(0, 0.09, "a"), (1, 0.03, "b"), (2, 0.04, "c")]) == (1, "b")  # a spike at the end
    assert kept_epoch([(0, nan, "a"), (1, nan, "b"), (2, nan, "c")]) == (2, "c")  # no val images: the last


def test_random_crops_cut_each_image_its_own_window():
    import torch

    from medisyn.train.vae import random_crops

    x = torch.randn(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    places = set()
    for _ in range(10):
        crops = random_crops(x, 8, g)
        assert crops.shape == (4, 3, 8, 8) and crops.is_contiguous(memory_format=torch.channels_last)
        for image, crop in zip(x, crops, strict=True):  # each crop is a window of its own image
            found = [
                (t, left)
                for t in range(9)
                for left in range(9)
                if torch.equal(image[:, t : t + 8, left : left + 8], crop)
            ]
            assert len(found) == 1
            places.add(found[0])
    assert len(places) > 20  # 40 crops from 81 places: not one fixed window
    assert random_crops(x, 16, g) is x and random_crops(x, 0, g) is x  # whole images: untouched
