"""Training: the per-step pieces as units, then one real 2-worker Ray Train run with a worker killed."""

from __future__ import annotations

import json

import pytest
import torch

from medisyn.train.loop import add_time_ids, dropout_mask, sample_latents


def test_latents_are_fresh_draws_from_the_moments():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(64, 4, 8, 8).half(), torch.full((64, 4, 8, 8), -2.0).half()
    a, b = sample_latents(mean, logvar, 0.13025, g), sample_latents(mean, logvar, 0.13025, g)
    assert not torch.equal(a, b)  # a new latent every step
    assert ((a + b) / 2 - mean.float() * 0.13025).mean().abs() < 0.005  # centred on the mean, scaled
    assert abs((a / 0.13025 - mean.float()).std().item() - torch.exp(torch.tensor(-1.0)).item()) < 0.02


def test_caption_dropout_is_drawn_per_step():
    g = torch.Generator().manual_seed(0)
    masks = [dropout_mask(1000, 0.1, g) for _ in range(2)]
    assert all(0.07 < m.float().mean() < 0.13 for m in masks)
    assert not torch.equal(masks[0], masks[1])


def test_time_ids_follow_sdxl_order():
    ids = add_time_ids(torch.tensor([[768, 1024]]), torch.tensor([[0, 85]]), 512)
    assert ids.tolist() == [[768.0, 1024.0, 0.0, 85.0, 512.0, 512.0]]


def test_text_cache_encodes_only_new_captions(tmp_path):
    from medisyn.config import load_config
    from medisyn.train.cache import encode_text, load_text

    cfg = load_config(None, ["model.preset=tiny", f"run_dir={tmp_path}"])
    out = tmp_path / "text.parquet"
    assert encode_text(cfg, ["Dermoscopy image showing melanoma."], out) == 2  # "" and the caption
    caps, e1, p1 = load_text(out)
    assert caps == ["", "Dermoscopy image showing melanoma."] and e1.shape == (2, 77, 64) and p1.shape == (2, 32)
    assert encode_text(cfg, ["Dermoscopy image showing melanoma.", "Fundus photograph showing glaucoma."], out) == 1
    caps, e2, _ = load_text(out)
    assert caps[2] == "Fundus photograph showing glaucoma." and (e2[:2] == e1).all()
    assert not (e2[0] == e2[1]).all()  # "" is encoded, not zeros, and differs from a caption
    assert encode_text(cfg, ["Fundus photograph showing glaucoma."], out) == 0


def test_ema_weights_move():
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    from medisyn.models import build_pipeline

    unet = build_pipeline("tiny").unet
    ema = EMAModel(unet.parameters(), decay=0.999, model_cls=UNet2DConditionModel, model_config=unet.config)
    before = [p.clone() for p in ema.shadow_params]
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    for _ in range(3):  # diffusers' EMA copies the weights on its first step (warm-up), then averages
        for p in unet.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        ema.step(unet.parameters())
    moved = sum(not torch.equal(a, b) for a, b in zip(before, ema.shadow_params, strict=True))
    assert moved > 0.9 * len(before)
    same = sum(torch.equal(s, p) for s, p in zip(ema.shadow_params, unet.parameters(), strict=True))
    assert same == 0  # a moving average, not a copy


@pytest.fixture(scope="module")
def trained(ingested):
    """Cache at 64 px, then 2 epochs on 2 workers with EMA on and a worker killed during epoch 1."""
    from medisyn.config import load_config
    from medisyn.train.cache import cache_dir
    from medisyn.train.cache import run as cache
    from medisyn.train.trainer import run as train

    base, run_dir, _ = ingested
    cfg = load_config(
        base.config_path,
        [
            f"run_dir={run_dir}",
            f"ingest.repositories_file={base.ingest.repositories_file}",
            "train.resolution=64",
            "train.per_worker_batch=8",
            "train.effective_batch=16",
            "train.epochs=2",
            "train.max_failures=2",
            "train.ema_decay=0.9",
            "select.num_images=16",
            "select.steps=4",
        ],
    )
    first = cache(cfg)
    assert first["latents_encoded"] > 300 and cache(cfg)["latents_encoded"] == 0  # a re-run encodes nothing
    info = json.loads((cache_dir(cfg) / "cache.json").read_text())
    result = train(cfg, fail_at_step=info["images"] // 16 + 5)
    return cfg, run_dir, info, result


@pytest.mark.ray
def test_two_workers_two_epochs_survive_a_killed_worker(trained):
    from medisyn.train.trainer import checkpoints

    cfg, run_dir, info, result = trained
    assert info["images"] > 300 and info["resolution"] == 64
    log = run_dir / "train_log"
    marker = log / "fault-injected"
    assert marker.exists()  # the failure really happened
    ckpts = checkpoints(cfg)
    assert [c.name for c in ckpts] == ["epoch-000", "epoch-001"]  # one per epoch, none twice
    assert (ckpts[0] / "unet/diffusion_pytorch_model.safetensors").exists()
    assert (log / "epoch-000-rank-0.json").stat().st_mtime < marker.stat().st_mtime  # epoch 0 not redone
    epochs = [[json.loads((log / f"epoch-{e:03d}-rank-{r}.json").read_text()) for r in (0, 1)] for e in (0, 1)]
    assert epochs[1][0]["loss"] < epochs[0][0]["loss"]  # it learns
    dropped = [set(epochs[e][0]["dropped_ids"]) | set(epochs[e][1]["dropped_ids"]) for e in (0, 1)]
    for e in (0, 1):
        assert 0.04 < epochs[e][0]["dropped_fraction"] < 0.18
    assert len(dropped[0] & dropped[1]) < 0.5 * len(dropped[0])  # not the same images every epoch
    assert result.metrics["epoch"] == 1 and result.metrics["effective_batch"] == 16


@pytest.mark.ray
def test_each_rank_resumes_its_own_random_stream(trained):
    from medisyn.train.loop import rank_state_file, rng_fingerprint

    cfg, run_dir, _, _ = trained
    log = run_dir / "train_log"
    epoch1 = [json.loads((log / f"epoch-001-rank-{r}.json").read_text()) for r in (0, 1)]
    assert epoch1[0]["rng_at_start"] != epoch1[1]["rng_at_start"]  # after the restart the ranks still differ
    for rank in (0, 1):  # ... because each continued exactly where its own epoch 0 ended
        saved = torch.load(run_dir / "checkpoints/epoch-000" / rank_state_file(rank), weights_only=False)
        g = torch.Generator()
        g.set_state(saved["generator"])
        assert rng_fingerprint(g) == epoch1[rank]["rng_at_start"]


@pytest.mark.ray
def test_ema_lives_in_the_loop_and_survives_the_restart(trained):
    from diffusers import UNet2DConditionModel

    from medisyn.models import load_unet

    cfg, run_dir, _, _ = trained
    last = run_dir / "checkpoints/epoch-001"
    ema = UNet2DConditionModel.from_pretrained(last / "unet_ema")
    raw = UNet2DConditionModel.from_pretrained(last / "unet")
    torch.manual_seed(cfg.seed)
    initial = load_unet(cfg.model)
    moved = [
        (not torch.equal(e, r), not torch.equal(e, i))
        for e, r, i in zip(ema.parameters(), raw.parameters(), initial.parameters(), strict=True)
    ]
    assert sum(a for a, _ in moved) > 0.9 * len(moved) and sum(b for _, b in moved) > 0.9 * len(moved)
    steps = json.loads((run_dir / "train_log/epoch-001-rank-0.json").read_text())["step"]
    ema_steps = json.loads((last / "unet_ema/config.json").read_text())["optimization_step"]
    assert ema_steps == steps  # one EMA step per optimizer step, counted across the restart (not restarted)


@pytest.mark.ray
def test_every_epoch_reads_a_new_global_order(trained):
    import pyarrow.parquet as pq

    cfg, run_dir, _, _ = trained
    corpus = pq.read_table(run_dir / "corpus", columns=["id", "specialty"]).to_pylist()
    specialty = {r["id"]: r["specialty"] for r in corpus}
    log = run_dir / "train_log"
    first = {e: json.loads((log / f"epoch-{e:03d}-rank-0.json").read_text())["first_ids"] for e in (0, 1)}
    for e in (0, 1):
        assert len({specialty[i] for i in first[e][:16]}) >= 3, [specialty[i] for i in first[e][:16]]
    assert first[0][:16] != first[1][:16]


@pytest.mark.ray
def test_select_picks_lowest_fid_and_exports_a_plain_diffusers_pipeline(trained):
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from medisyn.select.stage import run as select

    cfg, run_dir, _, _ = trained
    selection = select(cfg)
    fids = {c["checkpoint"]: c["fid"] for c in selection["checkpoints"]}
    assert set(fids) == {"epoch-000", "epoch-001"} and all(np.isfinite(list(fids.values())))
    assert selection["best"] == min(fids, key=fids.get)
    assert "offline" in selection["feature_extractor"] and "not comparable" in selection["feature_extractor"]
    assert set(selection["checkpoints"][0]["fid_by_specialty"]) <= {
        "radiology",
        "dermatology",
        "pathology",
        "ophthalmology",
        "surgery",
        "gastroenterology",
    }
    pipe = StableDiffusionXLPipeline.from_pretrained(run_dir / "model")
    assert pipe.config.force_zeros_for_empty_prompt is False
    exported = load_file(run_dir / "model/unet/diffusion_pytorch_model.safetensors")
    best = load_file(run_dir / "checkpoints" / selection["best"] / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], best[k]) for k in best)
    img = pipe(
        "Dermoscopy image showing melanoma.",
        height=64,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert img.shape == (64, 64, 3) and np.isfinite(img).all()
    stamp = (run_dir / "selection.json").stat().st_mtime_ns
    assert select(cfg)["best"] == selection["best"]  # a re-run with nothing new selects nothing again
    assert (run_dir / "selection.json").stat().st_mtime_ns == stamp
    for c in selection["checkpoints"]:  # per-specialty FID is there, and finite where a specialty has 2+ images
        assert len(c["fid_by_specialty"]) >= 2 and any(np.isfinite(v) for v in c["fid_by_specialty"].values())

    from dataclasses import replace

    ema_cfg = replace(cfg, select=replace(cfg.select, weights="ema"))
    ema_selection = select(ema_cfg)  # the EMA weights, scored and exported
    exported = load_file(run_dir / "model/unet/diffusion_pytorch_model.safetensors")
    ema = load_file(run_dir / "checkpoints" / ema_selection["best"] / "unet_ema/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert json.loads((run_dir / "model/medisyn.json").read_text())["weights"] == "ema"
