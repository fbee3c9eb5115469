"""Training: the per-step pieces as units, then one real 2-worker Ray Train run with a worker killed."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time

import pytest
import torch

from medisyn.train.loop import add_time_ids, dropout_mask, loss_weights, sample_latents, training_target

PAPER = os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "paper.yaml")


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


def test_prediction_type_sets_the_target_and_reaches_training_and_sampling_schedulers():
    from medisyn.config import load_config
    from medisyn.models import load_noise_scheduler, load_pipeline

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 500, 990])
    default = load_config(None, ["model.preset=tiny"]).model
    v = load_config(None, ["model.preset=tiny", "model.prediction_type=v_prediction"]).model

    eps_scheduler, v_scheduler = load_noise_scheduler(default), load_noise_scheduler(v)
    assert eps_scheduler.config.prediction_type == "epsilon"  # "" keeps SDXL's own
    assert torch.equal(training_target(eps_scheduler, latents, noise, timesteps), noise)
    velocity = training_target(v_scheduler, latents, noise, timesteps)
    abar = v_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    assert torch.allclose(velocity, abar.sqrt() * noise - (1 - abar).sqrt() * latents, atol=1e-5)
    # at t=990 the velocity is mostly -latents, at t=10 mostly noise: not the noise target
    assert not torch.allclose(velocity, noise, atol=0.1)
    # sampling (select, generate) and the exported scheduler/ predict the same quantity
    assert load_pipeline(v).scheduler.config.prediction_type == "v_prediction"
    assert load_pipeline(default).scheduler.config.prediction_type == "epsilon"


def test_min_snr_weights_cap_the_easy_steps_and_are_off_at_gamma_zero():
    from diffusers.training_utils import compute_snr

    from medisyn.config import load_config
    from medisyn.models import load_noise_scheduler

    timesteps = torch.tensor([1, 50, 400, 999])
    eps = load_noise_scheduler(load_config(None, ["model.preset=tiny"]).model)
    v = load_noise_scheduler(load_config(None, ["model.preset=tiny", "model.prediction_type=v_prediction"]).model)
    assert loss_weights(eps, timesteps, 0.0) is None
    snr = compute_snr(eps, timesteps)
    w = loss_weights(eps, timesteps, 5.0)
    assert snr[0] > 5 > snr[-1]  # the timesteps span both sides of gamma
    assert w[0] == pytest.approx(5.0 / snr[0].item(), rel=1e-5) and w[0] < 0.05  # low noise: capped
    assert w[-1] == pytest.approx(1.0, rel=1e-5)  # high noise (SNR < gamma): full weight
    assert torch.all(w[:-1] <= w[1:])  # never more weight for an easier step
    wv = loss_weights(v, timesteps, 5.0)
    assert wv[-1] == pytest.approx((snr[-1] / (snr[-1] + 1)).item(), rel=1e-5)  # v: min(snr, g) / (snr + 1)
    assert wv[0] == pytest.approx(5.0 / (snr[0].item() + 1), rel=1e-5)


def _paper_train(**changes):
    from dataclasses import replace

    from medisyn.config import load_config

    return replace(load_config(PAPER).train, **changes)


def test_the_memory_plan_counts_ddp_buckets_accumulation_and_ema_for_sdxl():
    from medisyn.train.config import memory_plan

    # the measured reference: one GPU, no DDP, no accumulation, eager 16 (bench: 67 GB); 10.3 GB = 4 B x 2,567,463,684
    alone = memory_plan("sdxl", _paper_train(num_workers=1, effective_batch=16, gradient_checkpointing=False))
    lines = dict(alone.lines)
    assert lines["U-Net weights, fp32 (2,567,463,684 parameters)"] == pytest.approx(10.27, abs=0.01)
    assert lines["AdamW moments, fp32 (two per weight)"] == pytest.approx(20.54, abs=0.01)
    assert alone.total_gb - lines["reserve: 10% of the GPU (CUDA context, fragmentation, workspaces)"] == (
        pytest.approx(68.7, abs=0.1)  # 67 GB measured
    )
    # the paper's old settings (4 workers x 16 x 2 accumulation, eager), DDP as it was: +10.3 buckets +10.3 held
    old = memory_plan("sdxl", _paper_train(gradient_checkpointing=False), bucket_view=False)
    assert old.total_gb - alone.total_gb == pytest.approx(2 * 10.27, abs=0.01) and not old.fits
    # gradients as bucket views: the held gradients are the buckets
    viewed = memory_plan("sdxl", _paper_train(gradient_checkpointing=False))
    assert viewed.total_gb - alone.total_gb == pytest.approx(10.27, abs=0.01) and not viewed.fits
    ema = memory_plan("sdxl", _paper_train(ema_decay=0.999))
    assert ema.total_gb - memory_plan("sdxl", _paper_train()).total_gb == pytest.approx(10.27, abs=0.01)
    # paper.yaml: gradient checkpointing, 16 x 4 x 2 = 128, with a margin on 80 GB
    paper = memory_plan("sdxl", _paper_train())
    assert paper.fits and paper.total_gb == pytest.approx(72.3, abs=0.1)
    # activations scale with the latent area; sdxl-random plans as sdxl
    half = memory_plan("sdxl", _paper_train(resolution=256))
    assert paper.total_gb - half.total_gb == pytest.approx(16 * 1.13 * 0.75, abs=0.01)
    assert memory_plan("sdxl-random", _paper_train()).total_gb == paper.total_gb


def test_the_memory_plan_of_the_tiny_preset_and_its_parameter_counts_match_the_networks():
    from diffusers import UNet2DConditionModel

    from medisyn.presets import get_preset
    from medisyn.train.config import memory_plan

    for name in ("tiny", "sdxl-random"):  # built on the meta device: no memory, no weights
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(get_preset(name)["build"]["unet"])
        assert sum(p.numel() for p in unet.parameters()) == get_preset(name)["memory"]["unet_parameters"]
    assert get_preset("sdxl")["memory"] == get_preset("sdxl-random")["memory"]
    plan = memory_plan(
        "tiny", _paper_train(resolution=128, mixed_precision="fp32", ema_decay=0.5, gradient_checkpointing=False)
    )
    lines = dict(plan.lines)
    assert lines["U-Net weights, fp32 (1,714,532 parameters)"] == pytest.approx(4 * 1_714_532 / 1e9)
    assert "EMA copy, fp32" in lines and not any("autocast" in w for w in lines)  # fp32: no bf16 copies
    assert lines["activations: 16 x 0.0042 GB (eager, 128²)"] == pytest.approx(16 * 0.0021 * 2)  # fp32: twice bf16


def test_a_gpu_config_over_its_memory_plan_is_refused_naming_the_plans_lines():
    from medisyn.config import ConfigError, load_config

    paper = load_config(PAPER).train
    assert (paper.per_worker_batch * paper.num_workers * paper.accumulation, paper.gradient_checkpointing) == (
        128,
        True,
    )
    with pytest.raises(ConfigError, match=r"need 87\.0 GB per GPU, more than train.gpu_memory_gb 80") as err:
        load_config(PAPER, ["train.gradient_checkpointing=false"])
    assert "DDP buckets, fp32 (the gradients are views into them)" in str(err.value)
    assert "activations: 16 x 2.05 GB (eager, 512²)" in str(err.value)
    # a larger GPU, a CPU run, and a smaller batch with more accumulation pass
    load_config(PAPER, ["train.gradient_checkpointing=false", "train.gpu_memory_gb=141"])
    load_config(PAPER, ["train.gradient_checkpointing=false", "train.use_gpu=false"])
    load_config(PAPER, ["train.gradient_checkpointing=false", "train.per_worker_batch=8"])
    with pytest.raises(ConfigError, match="train.gpu_memory_gb: 0"):
        load_config(PAPER, ["train.gpu_memory_gb=0"])


def test_ddp_keeps_the_gradients_in_its_buckets(monkeypatch):
    import ray.train.torch

    from medisyn.train.loop import prepare_ddp, zero_grad_kwargs

    seen = {}
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda m, **kw: seen.update(kw) or m)
    unet = torch.nn.Linear(3, 2)
    prepare_ddp(unet, world=2)
    assert seen == {"parallel_strategy_kwargs": {"gradient_as_bucket_view": True}}
    assert all(p.grad is not None and not p.grad.any() for p in unet.parameters())  # views from the first step
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    assert zero_grad_kwargs(ddp) == {"set_to_none": False} and zero_grad_kwargs(None) == {"set_to_none": True}


def test_resume_loads_state_onto_the_workers_own_device(tmp_path, monkeypatch):
    from medisyn.train import loop

    (tmp_path / "resume").mkdir()
    torch.save({"epoch": 3, "step": 7}, tmp_path / "resume" / loop.CHECKPOINT_STATE)
    generator = torch.Generator().manual_seed(1)
    torch.save({"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}, tmp_path / "rng-rank-1.pt")
    calls, real_load = [], torch.load
    monkeypatch.setattr(
        torch, "load", lambda path, **kw: calls.append((path.name, kw["map_location"])) or real_load(path, **kw)
    )
    monkeypatch.setattr("diffusers.UNet2DConditionModel.from_pretrained", lambda path: "unet")
    unet, state = loop.resume_from(tmp_path, 1, torch.device("meta"), torch.Generator())
    assert calls == [(loop.CHECKPOINT_STATE, torch.device("meta")), ("rng-rank-1.pt", "cpu")]
    assert (unet, state) == ("unet", {"epoch": 3, "step": 7})


def test_epoch_checkpoints_are_written_under_the_local_dir_for_ray_to_upload_and_delete(tmp_path, monkeypatch):
    from medisyn.train.loop import checkpoint_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the system temp dir, here

    a, b = checkpoint_dir(str(tmp_path / "nvme"), 3, 0), checkpoint_dir(str(tmp_path / "nvme"), 3, 1)
    assert a.parent == b.parent == tmp_path / "nvme" and a != b  # one folder per rank: Ray deletes each
    assert a.name.startswith("medisyn-epoch-003-rank-0-") and a.is_dir()
    assert checkpoint_dir("", 0, 0).parent == tmp_path / "tmp"


def test_resume_state_is_pruned_only_behind_the_newest_registered_checkpoint(tmp_path):
    import pyarrow.fs

    from medisyn.train.loop import prune_unregistered_behind

    for e in range(4):
        (tmp_path / f"epoch-{e:03d}" / "resume").mkdir(parents=True)
    fs = pyarrow.fs.LocalFileSystem()
    assert prune_unregistered_behind(fs, str(tmp_path)) == []  # nothing registered yet: keep all
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": f"epoch-{e:03d}"} for e in (0, 1)]}
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    # epochs 2 and 3 may still be uploading in the background: a restart resumes from epoch 1
    assert prune_unregistered_behind(fs, str(tmp_path)) == ["epoch-000"]
    assert sorted(p.parent.name for p in tmp_path.glob("epoch-*/resume")) == ["epoch-001", "epoch-002", "epoch-003"]


def test_the_workers_datasets_draw_no_ray_data_progress_bars():
    from types import SimpleNamespace

    from medisyn.train.trainer import quiet_progress

    data = SimpleNamespace(context=SimpleNamespace(enable_progress_bars=True))
    assert quiet_progress(data).context.enable_progress_bars is False


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


def test_captions_the_encoders_cannot_tell_apart_stop_the_cache(tmp_path, ingested):
    """Words outside the tiny tokenizer's vocabulary all become <unk>: such captions collide."""
    import pyarrow.parquet as pq

    from medisyn.config import load_config
    from medisyn.records import read_corpus
    from medisyn.train.cache import encode_text, load_text

    cfg = load_config(None, ["model.preset=tiny", f"run_dir={tmp_path}"])
    corpus_captions = sorted(set(read_corpus(ingested[1] / "corpus", ["caption"]).column("caption").to_pylist()))
    out = tmp_path / "text.parquet"
    assert encode_text(cfg, corpus_captions, out) == len(corpus_captions) + 1  # the demo's all distinct
    captions, embeds, _ = load_text(out)
    assert len({e.tobytes() for e in embeds}) == len(captions)
    with pytest.raises(ValueError, match="share an encoding") as err:
        encode_text(cfg, ["Dermoscopy image showing xyzzy.", "Dermoscopy image showing plugh."], out)
    assert "'Dermoscopy image showing plugh.' == 'Dermoscopy image showing xyzzy.'" in str(err.value)
    assert pq.read_table(out).num_rows == len(corpus_captions) + 1  # the cache was not rewritten


def _kill_a_worker_after_the_first_checkpoint(run_dir, killed: dict) -> None:
    """From outside the loop: once Ray Train has registered epoch 0's checkpoint, SIGKILL rank 1 by pid.

    Registered means listed in the controller's snapshot: a checkpoint whose files are written but
    that the controller has not yet polled is not a restore point (Ray Train restarts from scratch)."""
    snapshot, rank_log = (
        run_dir / "checkpoints/checkpoint_manager_snapshot.json",
        run_dir / "train_log/epoch-000-rank-1.json",
    )
    deadline = time.time() + 600
    while time.time() < deadline and not (snapshot.exists() and "epoch-000" in snapshot.read_text()):
        time.sleep(0.05)
    pid = json.loads(rank_log.read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    killed.update(pid=pid, at=time.time())


def test_caption_balance_repeats_the_rows_of_rare_captions():
    import pyarrow as pa

    from medisyn.train.trainer import caption_repeats, repeat_rows

    counts = {"chest CT": 40, "OCT drusen": 4, "fundus": 10}
    assert caption_repeats(counts, 0.0) == {"chest CT": 1, "OCT drusen": 1, "fundus": 1}  # the paper's corpus as is
    assert caption_repeats(counts, 1.0) == {"chest CT": 1, "OCT drusen": 10, "fundus": 4}  # all about equal
    assert caption_repeats(counts, 0.5) == {"chest CT": 1, "OCT drusen": 3, "fundus": 2}  # square-root balance
    batch = pa.table({"id": ["a", "b", "c"], "caption": ["chest CT", "OCT drusen", "fundus"]})
    out = repeat_rows(batch, {"OCT drusen": 3})  # captions not listed stay once
    assert out.column("id").to_pylist() == ["a", "b", "b", "b", "c"]


def test_a_resumed_lr_schedule_takes_the_next_step_at_the_saved_rate():
    """lr_schedule loads the optimizer after building the schedule: built after, the schedule would
    reset the rate to its step-0 value for the first step after a restart."""
    from medisyn.train.loop import lr_schedule

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    def run(model, optimizer, schedule, steps):
        rates = []
        for _ in range(steps):
            rates.append(optimizer.param_groups[0]["lr"])
            model(torch.ones(2, 3)).pow(2).mean().backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        return rates

    model, optimizer = fresh()
    schedule = lr_schedule(optimizer, "cosine", 2, 10)
    first = run(model, optimizer, schedule, 4)
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": schedule.state_dict()}
    uninterrupted = run(model, optimizer, schedule, 6)
    model2, optimizer2 = fresh()
    resumed = run(model2, optimizer2, lr_schedule(optimizer2, "cosine", 2, 10, state), 6)
    assert resumed == pytest.approx(uninterrupted) and first[:2] == [0.0, 5e-3] and resumed[-1] < 1e-3


@pytest.fixture(scope="module")
def trained(ingested):
    """Cache at 64 px, then 3 epochs on 2 workers (accumulation 2, EMA on, cosine lr); a worker is
    killed after epoch 0."""
    from medisyn.config import load_config
    from medisyn.train.cache import cache_dir
    from medisyn.train.cache import run as cache
    from medisyn.train.trainer import run as train

    base, run_dir, _ = ingested
    cfg = load_config(
        base.config_path,
        [
            f"run_dir={run_dir}",
            f"ingest.sources_root={base.ingest.sources_root}",
            "phantoms.enabled=false",
            "vae_fit.enabled=false",  # the mechanics of training, on the preset's own VAE (tests/test_vae.py fits one)
            "model.vae=",
            "train.resolution=64",
            "train.repeats=1",
            "train.caption_balance=0.5",  # balanced in the loop, at ~1,500 rows an epoch (the demo's 1.0: ~4,000)
            "train.learning_rate=0.001",  # the demo's: the cosine's mean rate is half the peak
            "train.per_worker_batch=4",
            "train.effective_batch=16",
            "train.epochs=3",
            "train.max_failures=2",
            "train.ema_decay=0.9",
            "train.lr_scheduler=cosine",
            "train.lr_warmup_steps=2",
            "select.num_images=10",
            "select.steps=4",
            "select.criterion=fid",  # demo.yaml exports the last epoch; these tests check the FID rule
            "select.weights=raw",  # demo.yaml exports the EMA; the select test switches to it after the raw export
        ],
    )
    first = cache(cfg)
    assert first["latents_encoded"] > 300 and cache(cfg)["latents_encoded"] == 0  # a re-run encodes nothing
    info = json.loads((cache_dir(cfg) / "cache.json").read_text())
    killed: dict = {}
    killer = threading.Thread(target=_kill_a_worker_after_the_first_checkpoint, args=(run_dir, killed), daemon=True)
    killer.start()
    result = train(cfg)
    killer.join(timeout=1)
    return cfg, run_dir, info, result, killed


def _images_repeated_at_most(cfg, times: int) -> set[str]:
    """Train ids whose caption's balance factor is at most ``times``."""
    from collections import Counter

    from medisyn.records import read_corpus
    from medisyn.train.trainer import caption_repeats

    table = read_corpus(cfg.run_path / "corpus", columns=["id", "caption"], split="train")
    ids, captions = table.column("id").to_pylist(), table.column("caption").to_pylist()
    factors = caption_repeats(Counter(captions), cfg.train.caption_balance)  # counted from the rows read once
    return {i for i, c in zip(ids, captions, strict=True) if factors[c] <= times}


def _epoch_logs(run_dir, epochs=(0, 1, 2)):
    log = run_dir / "train_log"
    return [[json.loads((log / f"epoch-{e:03d}-rank-{r}.json").read_text()) for r in (0, 1)] for e in epochs]


@pytest.mark.ray
def test_a_worker_killed_from_outside_resumes_without_redoing_an_epoch(trained):
    from medisyn.train.trainer import checkpoints

    cfg, run_dir, info, result, killed = trained
    assert info["images"] > 300 and info["resolution"] == 64
    assert killed, "the run finished before the first checkpoint was seen"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # the worker really died
    ckpts = checkpoints(cfg)
    assert [c.name for c in ckpts] == ["epoch-000", "epoch-001", "epoch-002"]  # one per epoch, none twice
    epochs = _epoch_logs(run_dir)
    log = run_dir / "train_log"
    for r in (0, 1):  # epoch 0 was not trained again after the kill; the later epochs were trained after it
        assert (log / f"epoch-000-rank-{r}.json").stat().st_mtime < killed["at"]
        assert (log / f"epoch-001-rank-{r}.json").stat().st_mtime > killed["at"]
    assert epochs[1][1]["pid"] != killed["pid"]  # by a new worker process
    steps_per_epoch = epochs[0][0]["step"]
    assert [epochs[e][0]["step"] for e in (0, 1, 2)] == [steps_per_epoch * k for k in (1, 2, 3)]
    assert epochs[2][0]["loss"] < epochs[0][0]["loss"]  # it learns
    dropped = [set(epochs[e][0]["dropped_ids"]) | set(epochs[e][1]["dropped_ids"]) for e in (0, 1)]
    for e in (0, 1):
        assert 0.04 < epochs[e][0]["dropped_fraction"] < 0.18
    # not the same images every epoch: among images seen at most twice a pass (caption balance repeats
    # a rare caption's images many times, so those are dropped at least once in nearly every epoch)
    few = _images_repeated_at_most(cfg, 2)
    dropped = [d & few for d in dropped]
    assert len(dropped[0]) > 10 and len(dropped[0] & dropped[1]) < 0.5 * len(dropped[0])
    assert result.metrics["epoch"] == 2 and result.metrics["effective_batch"] == 16


@pytest.mark.ray
def test_the_learning_rate_schedule_runs_over_all_epochs_and_continues_across_the_restart(trained):
    """Cosine after 2 warmup steps, over the run's optimizer steps: each epoch's logged lr is the
    schedule's at that epoch's step count (after the killed worker's restart too) and the last is 0."""
    from diffusers.optimization import get_scheduler

    cfg, run_dir, _, _, _ = trained
    epochs = _epoch_logs(run_dir)
    steps = [epochs[e][0]["step"] for e in (0, 1, 2)]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.learning_rate)
    reference = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=steps[-1])
    expected = []
    for step in range(1, steps[-1] + 1):
        optimizer.step()
        reference.step()
        if step in steps:
            expected.append(reference.get_last_lr()[0])
    for rank in (0, 1):  # the schedule's length is each worker's true number of steps (no overshoot)
        assert [epochs[e][rank]["lr"] for e in (0, 1, 2)] == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert cfg.train.learning_rate > epochs[0][0]["lr"] > epochs[1][0]["lr"] > epochs[2][0]["lr"] == pytest.approx(0)
    state = torch.load(run_dir / "checkpoints/epoch-002/resume/training_state.pt", weights_only=False)
    assert state["lr_scheduler"]["last_epoch"] == steps[-1]  # saved with the optimizer, for a resume


@pytest.mark.ray
def test_the_training_data_holds_rare_captions_as_often_as_common_ones_with_caption_balance(trained):
    from collections import Counter
    from dataclasses import replace

    from medisyn.train.cache import cache_dir, read_train_ids
    from medisyn.train.trainer import training_data, training_ids

    cfg, *_ = trained
    cache = cache_dir(cfg)
    ids = training_ids(cfg, read_train_ids(cache))
    seen = {}
    for balance in (0.0, 1.0):
        run = replace(cfg, train=replace(cfg.train, caption_balance=balance, repeats=2))
        data, rows = training_data(run, cache, ids)
        captions = Counter(r["caption"] for r in data.select_columns(["caption"]).take_all())
        assert sum(captions.values()) == rows  # the epoch length the loop's schedule and bar use
        seen[balance] = captions
    natural, balanced = seen[0.0], seen[1.0]
    assert sum(natural.values()) == 2 * len(ids) and set(natural) == set(balanced)
    spread = {b: max(c.values()) / min(c.values()) for b, c in seen.items()}
    assert spread[0.0] > 4 and spread[1.0] < 2  # rare captions now come about as often as common ones
    rarest = min(natural, key=natural.get)
    assert balanced[rarest] > natural[rarest] and all(balanced[c] % natural[c] == 0 for c in natural)


@pytest.mark.ray
def test_gradients_sync_only_when_the_optimizer_steps(trained):
    """Accumulation 2 on 2 workers: DDP all-reduces on half the micro-steps (no_sync on the others)."""
    _, run_dir, _, _, _ = trained
    epochs = _epoch_logs(run_dir)
    for e, epoch in enumerate(epochs):
        steps = epoch[0]["step"] - (epochs[e - 1][0]["step"] if e else 0)
        for rank_log in epoch:
            assert rank_log["micro_steps"] in (2 * steps, 2 * steps - 1)
            assert rank_log["grad_syncs"] == steps  # one all-reduce round per optimizer step, none in between


@pytest.mark.ray
def test_checkpoints_keep_bf16_weights_per_epoch_and_resume_state_only_for_the_last(trained):
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    cfg, run_dir, _, _, _ = trained
    ckpts = sorted((run_dir / "checkpoints").glob("epoch-*"))
    for c in ckpts:
        for weights in ("unet", "unet_ema"):
            with safe_open(c / weights / "diffusion_pytorch_model.safetensors", "pt") as f:
                assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
            UNet2DConditionModel.from_pretrained(c / weights)  # a plain diffusers U-Net
    assert [c.name for c in ckpts if (c / "resume").exists()] == ["epoch-002"]
    resume = ckpts[-1] / "resume"
    with safe_open(resume / "unet/diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # the master weights resume in fp32
    state = torch.load(resume / "training_state.pt", weights_only=False)
    assert state["epoch"] == 2 and state["optimizer"]["state"]


@pytest.mark.ray
def test_each_rank_resumes_its_own_random_stream(trained):
    from medisyn.train.loop import rank_state_file, rng_fingerprint

    cfg, run_dir, _, _, _ = trained
    log = run_dir / "train_log"
    epoch1 = [json.loads((log / f"epoch-001-rank-{r}.json").read_text()) for r in (0, 1)]  # after the kill
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

    cfg, run_dir, _, _, _ = trained
    last = run_dir / "checkpoints/epoch-002"
    ema = UNet2DConditionModel.from_pretrained(last / "resume/unet_ema")
    raw = UNet2DConditionModel.from_pretrained(last / "resume/unet")
    torch.manual_seed(cfg.seed)
    initial = load_unet(cfg.model)
    moved = [
        (not torch.equal(e, r), not torch.equal(e, i))
        for e, r, i in zip(ema.parameters(), raw.parameters(), initial.parameters(), strict=True)
    ]
    assert sum(a for a, _ in moved) > 0.9 * len(moved) and sum(b for _, b in moved) > 0.9 * len(moved)
    steps = json.loads((run_dir / "train_log/epoch-002-rank-0.json").read_text())["step"]
    ema_steps = json.loads((last / "resume/unet_ema/config.json").read_text())["optimization_step"]
    assert ema_steps == steps  # one EMA step per optimizer step, counted across the restart (not restarted)


@pytest.mark.ray
def test_every_epoch_reads_a_new_global_order(trained):
    import pyarrow.parquet as pq

    cfg, run_dir, _, _, _ = trained
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

    cfg, run_dir, _, _, _ = trained
    selection = select(cfg)
    fids = {c["checkpoint"]: c["fid"] for c in selection["checkpoints"]}
    assert set(fids) == {"epoch-000", "epoch-001", "epoch-002"} and all(np.isfinite(list(fids.values())))
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
    # demo.yaml trains v-prediction (with Min-SNR weights): the export samples what the U-Net predicts
    assert cfg.model.prediction_type == "v_prediction" and cfg.train.snr_gamma == 5.0
    assert pipe.scheduler.config.prediction_type == "v_prediction"
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

    from medisyn.records import median_original_sizes

    sizes = median_original_sizes(run_dir / "corpus")  # conditioning recorded with the export
    assert sizes["dermoscopy"] and sizes["*"] and selection["original_sizes"] == sizes
    assert json.loads((run_dir / "model/medisyn.json").read_text())["original_sizes"] == sizes
    real_file = run_dir / "select" / selection["real_features"]
    assert real_file.exists()
    real_stamp = real_file.stat().st_mtime_ns

    from dataclasses import replace

    ema_cfg = replace(cfg, select=replace(cfg.select, weights="ema"))
    ema_selection = select(ema_cfg)  # the EMA weights, scored and exported
    assert ema_selection["real_features"] == real_file.name and real_file.stat().st_mtime_ns == real_stamp
    exported = load_file(run_dir / "model/unet/diffusion_pytorch_model.safetensors")
    ema = load_file(run_dir / "checkpoints" / ema_selection["best"] / "unet_ema/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert json.loads((run_dir / "model/medisyn.json").read_text())["weights"] == "ema"


@pytest.mark.ray
def test_a_dropped_caption_is_the_exported_pipelines_unconditional_branch(trained):
    """Training replaces a caption by cache row 0; plain diffusers, loading the export, must guide
    against exactly that encoding (SDXL's default would be zeros: force_zeros_for_empty_prompt)."""
    from diffusers import StableDiffusionXLPipeline

    from medisyn.select.stage import run as select
    from medisyn.train.cache import cache_dir, load_text

    cfg, run_dir, _, _, _ = trained
    if not (run_dir / "model/model_index.json").exists():
        select(cfg)
    captions, embeds, pooled = load_text(cache_dir(cfg) / "text.parquet")
    assert captions[0] == ""
    pipe = StableDiffusionXLPipeline.from_pretrained(run_dir / "model")
    with torch.no_grad():  # the user's call: a prompt, guidance on, no negative prompt given
        _, negative, _, negative_pooled = pipe.encode_prompt(
            "Dermoscopy image showing melanoma.", device="cpu", do_classifier_free_guidance=True
        )
    assert negative.abs().sum() > 0  # not SDXL's zeros
    torch.testing.assert_close(negative[0], torch.from_numpy(embeds[0]).float(), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(negative_pooled[0], torch.from_numpy(pooled[0]).float(), atol=2e-3, rtol=2e-3)


@pytest.mark.ray
def test_select_criterion_last_exports_the_last_epoch_without_scoring(trained):
    """``select.criterion: last`` (the offline demo, whose stand-in FID says nothing about prompts):
    the last epoch is exported as it is, nothing is generated or scored, and the record says so."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from medisyn.configtools import ConfigError
    from medisyn.select.config import SelectConfig
    from medisyn.select.stage import run as select

    cfg, run_dir, *_ = trained
    last = replace(cfg, select=replace(cfg.select, criterion="last"))
    selection = select(last)
    assert selection["criterion"] == "last" and selection["best"] == "epoch-002" and selection["num_images"] == 0
    assert [c["checkpoint"] for c in selection["checkpoints"]] == ["epoch-000", "epoch-001", "epoch-002"]
    assert "no FID" in selection["feature_extractor"]
    exported = load_file(run_dir / "model/unet/diffusion_pytorch_model.safetensors")
    weights = load_file(run_dir / "checkpoints/epoch-002/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], weights[k]) for k in weights)
    assert json.loads((run_dir / "model/medisyn.json").read_text())["checkpoint"] == "epoch-002"
    assert select(last)["best"] == "epoch-002"  # a re-run finds it done
    assert SelectConfig().criterion == "fid"  # the paper's rule stays the default
    with pytest.raises(ConfigError, match="criterion"):
        from medisyn.config import load_config

        load_config(cfg.config_path, [f"run_dir={run_dir}", "select.criterion=best"])


def test_subset_per_caption_keeps_n_seeded_images_of_every_caption(ingested):
    from dataclasses import replace

    from medisyn.records import read_corpus
    from medisyn.train.trainer import training_ids

    cfg, run_dir, _ = ingested
    rows = read_corpus(run_dir / "corpus", ["id", "caption"], split="train").to_pylist()
    ids = [r["id"] for r in rows]
    assert training_ids(cfg, ids) == ids  # 0: all of them
    one = replace(cfg, train=replace(cfg.train, subset_per_caption=1))
    chosen = training_ids(one, ids)
    caption = {r["id"]: r["caption"] for r in rows}
    assert len(chosen) == len(set(caption.values())) and {caption[i] for i in chosen} == set(caption.values())
    assert training_ids(one, ids) == chosen  # seeded
    two = training_ids(replace(cfg, train=replace(cfg.train, subset_per_caption=2)), ids)
    assert set(chosen) < set(two) or len(two) > len(chosen)


@pytest.mark.ray
def test_a_run_of_other_inputs_is_never_resumed_and_a_finished_one_never_rerun(trained):
    """Ray Train resumes whatever its storage holds: the trainer refuses a checkpoints folder that
    another corpus or other settings started, naming what differs, before any worker starts."""
    from dataclasses import replace

    from medisyn.configtools import ConfigError
    from medisyn.records import RUN_INPUTS
    from medisyn.train.trainer import finished
    from medisyn.train.trainer import run as train

    cfg, run_dir, *_ = trained
    assert (run_dir / "checkpoints" / RUN_INPUTS).is_file()
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")}
    faster = replace(cfg, train=replace(cfg.train, max_failures=0))  # a resubmission: the same run, finished
    assert train(faster) is None and {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*")} == stamps
    longer = replace(cfg, train=replace(cfg.train, epochs=4))  # epoch-003 is missing: it would train on
    assert not finished(run_dir / "checkpoints", f"epoch-{longer.train.epochs - 1:03d}")
    other = replace(cfg, train=replace(cfg.train, learning_rate=2e-3))
    with pytest.raises(ConfigError, match=r"holds a run of other inputs or settings \(differs: train\)"):
        train(other)
    reseeded = replace(cfg, seed=cfg.seed + 1)
    with pytest.raises(ConfigError, match=r"differs: seed\)"):
        train(reseeded)


def test_run_inputs_are_recorded_once_and_differences_named(tmp_path):
    from medisyn.records import run_inputs_differ

    folder = tmp_path / "run"
    assert run_inputs_differ(folder, {"a": 1, "b": [1, 2]}) == []  # new: recorded
    assert run_inputs_differ(folder, {"a": 1, "b": [1, 2]}) == []
    assert run_inputs_differ(folder, {"a": 2, "b": [1, 2], "c": 0}) == ["a", "c"]
    legacy = tmp_path / "legacy"
    (legacy / "epoch-000").mkdir(parents=True)
    assert run_inputs_differ(legacy, {"a": 1}) == ["(a run started before its inputs were recorded)"]
