"""Configs: both shipped YAMLs load; every mistake a user can make fails with the key named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medisyn.config import ConfigError, RunConfig, load_config, to_dict
from medisyn.configtools import build
from medisyn.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs/configs/demo.yaml"
PAPER = ROOT / "jobs/configs/paper.yaml"


def test_demo_and_paper_load_and_validate():
    demo, paper = load_config(DEMO), load_config(PAPER)
    assert isinstance(demo, RunConfig) and isinstance(paper, RunConfig)
    assert demo.model.preset == "tiny" and demo.phantoms.enabled and not demo.train.use_gpu
    assert demo.train.accumulation * demo.train.per_worker_batch * demo.train.num_workers == demo.train.effective_batch


def test_paper_yaml_holds_the_papers_numbers():
    p = load_config(PAPER)
    assert (p.ingest.ct_window_width, p.ingest.ct_window_level) == (700.0, 100.0)
    assert (p.ingest.percentile_low, p.ingest.percentile_high) == (0.5, 99.5)
    assert p.ingest.size == 512 and p.ingest.split_fractions == (0.8, 0.1, 0.1) and p.ingest.wsi_overlap <= 0.1
    t = p.train
    assert (t.epochs, t.learning_rate, t.effective_batch, t.caption_dropout, t.mixed_precision) == (
        15,
        1e-5,
        128,
        0.1,
        "bf16",
    )
    assert t.ema_decay == 0.0 and t.accumulation == 2  # 16 per worker x 4 workers x 2 = 128 (fits 80 GB)
    assert (p.select.num_images, p.generate.scheduler, p.generate.guidance_scale, p.generate.steps) == (
        10_000,
        "euler",
        7.0,
        50,
    )
    m = p.audit_memorization
    assert (m.images_per_prompt, m.grid, m.threshold) == (500, 4, 0.15) and m.embedder == "biomedclip"
    assert get_preset(m.embedder)["open_clip"] == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    u = p.audit_utility
    assert (u.real_full, u.real_half, u.synthetic, u.epochs, u.learning_rate, u.bootstrap_resamples) == (
        2000,
        1000,
        1000,
        15,
        1e-4,
        2000,
    )
    assert p.model.preset == "sdxl" and "fp16-fix" in p.model.vae
    # the dataclass defaults are the paper's numbers too, so a bare config is the paper's recipe
    local = {"checkpoint_local_dir": p.train.checkpoint_local_dir}  # a node's disk, not one of the paper's numbers
    assert to_dict(load_config(None).train) | local == to_dict(p.train)


def test_overrides_are_typed():
    cfg = load_config(
        DEMO,
        [
            "train.epochs=3",
            "train.learning_rate=1",
            "run_dir=2024",
            "generate.sets=[a, b]",
            "ingest.split_fractions=[0.7, 0.2, 0.1]",
            "train.use_gpu=true",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    assert cfg.run_dir == "2024" and cfg.generate.sets == ("a", "b") and cfg.train.use_gpu is True
    assert cfg.ingest.split_fractions == (0.7, 0.2, 0.1)
    assert cfg.resolve("{run_dir}/phantoms") == Path("2024/phantoms")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.epoch=2"], "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
        (["trian.epochs=2"], "unknown key 'trian'; did you mean 'train'?"),
        (["train.epochs=two"], "train.epochs: expected an integer, got 'two'"),
        (["train.epochs=2.5"], "train.epochs: expected an integer"),
        (["train.learning_rate=fast"], "train.learning_rate: expected a number, got 'fast'"),
        (["train.use_gpu=maybe"], "train.use_gpu: expected true or false"),
        (["model.preset=big"], "model.preset: unknown preset 'big'; expected one of sdxl, sdxl-random, tiny"),
        (["train.caption_dropout=1.5"], "train.caption_dropout: 1.5 is outside [0, 1)"),
        (["model.prediction_type=sample"], "model.prediction_type: 'sample' is not a valid choice"),
        (["train.snr_gamma=-1"], "train.snr_gamma: -1.0 must be >= 0"),
        (["vae_fit.repeats=0"], "vae_fit.repeats: 0 must be >= 1"),
        (["train.caption_balance=2"], "train.caption_balance: 2.0 must be in [0, 1]"),
        (["train.lr_scheduler=step"], "train.lr_scheduler: 'step' is not a valid choice"),
        (["vae_fit.lr_warmup_steps=-1"], "vae_fit.lr_warmup_steps: -1 must be >= 0"),
        (["vae_fit.crop_size=60"], "vae_fit.crop_size: 60 must be 0 (whole images) or a multiple of 8"),
        (["vae_fit.crop_size=256"], "vae_fit.crop_size: 256 is larger than the images it crops (train.resolution 128)"),
        (
            ["train.lr_scheduler=constant", "train.lr_warmup_steps=10"],
            "train.lr_warmup_steps: 10 needs a schedule with a warmup",
        ),
        (["train.num_workers=3"], "train.effective_batch: 32 is not a multiple of per_worker_batch x num_workers = 48"),
        (["ingest.wsi_overlap=0.2"], "ingest.wsi_overlap: 0.2 is outside [0, 0.1]"),
        (["ingest.split_fractions=[0.5, 0.1, 0.1]"], "must be non-negative and sum to 1"),
        (["epochs"], "override 'epochs' must look like key=value"),
        # ranges are checked at config time, before Ray starts (a zero here was a ZeroDivisionError)
        (["ingest.size=0"], "ingest.size: 0 must be >= 8"),
        (["train.epochs=0"], "train.epochs: 0 must be >= 1"),
        (["train.num_workers=0"], "train.num_workers: 0 must be >= 1"),
        (["train.per_worker_batch=0"], "train.per_worker_batch: 0 must be >= 1"),
        (["train.learning_rate=-1e-5"], "train.learning_rate: -1e-05 must be > 0"),
        (["generate.steps=0"], "generate.steps: 0 must be >= 1"),
        (["generate.batch_size=0"], "generate.batch_size: 0 must be >= 1"),
        (["generate.resolution=100"], "generate.resolution: 100 must be a multiple of 8"),
        (["generate.min_actors=3"], "generate.min_actors: 3 is above generate.max_actors (2)"),
        (["ingest.ct_window_width=.nan"], "ingest.ct_window_width: nan is not a finite number"),
        (["audit_memorization.threshold=inf"], "audit_memorization.threshold: inf is not a finite number"),
        (["seed=-1"], "seed: -1 must be >= 0"),
        (["reader.port=70000"], "reader.port: 70000 must be in [1, 65535]"),
        (["select.resolution=100"], "select.resolution: 100 must be a multiple of 8"),
    ],
)
def test_bad_values_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, overrides)
    assert expected in str(err.value)


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\ngenerate:\n  guidance: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert str(bad) in msg and "unknown key 'generate.guidance'" in msg and "guidance_scale" in msg and "steps" in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml' not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("train: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_repository_entries_are_checked():
    from medisyn.ingest.config import IngestConfig

    repo = dict(
        name="r",
        kind="dicom",
        path=".",
        glob="*.dcm",
        labels_csv="l.csv",
        path_column="p",
        label_columns=["label"],
        patient_column="pid",
        template="CT image showing {label}.",
        specialty="radiology",
        image_type="computed tomography",
        classes={"1": "pulmonary embolism"},
    )
    cfg = build(IngestConfig, {"repositories": [repo]}, "ingest")
    assert cfg.repositories[0].label_columns == ("label",)
    with pytest.raises(ConfigError, match=r"ingest.repositories\[0\].kind: 'dcm' is not a valid choice"):
        build(IngestConfig, {"repositories": [{**repo, "kind": "dcm"}]}, "ingest")
    with pytest.raises(ConfigError, match="unknown specialty 'cardiology'; expected one of radiology"):
        build(IngestConfig, {"repositories": [{**repo, "specialty": "cardiology"}]}, "ingest")
    with pytest.raises(ConfigError, match="has no {label} placeholder"):
        build(IngestConfig, {"repositories": [{**repo, "template": "CT image."}]}, "ingest")
    with pytest.raises(ConfigError, match=r"ingest.repositories\[0\]: missing required key\(s\) glob"):
        build(IngestConfig, {"repositories": [{k: v for k, v in repo.items() if k != "glob"}]}, "ingest")


def test_cli_config_error_stops_before_any_work(tmp_path):
    """A typo fails fast with exit code 2 and the key named; no run directory is created."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "medisyn.cli", "pipeline", "--config", str(DEMO), f"run_dir={run_dir}", "train.epoch=2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "unknown key 'train.epoch'; did you mean 'train.epochs'?" in proc.stderr
    assert not run_dir.exists()


def test_exponent_numbers_without_a_dot_are_numbers():
    """YAML 1.1 reads 1e-5 as a string; a float field takes it as the number the user meant."""
    from medisyn.config import load_config

    assert load_config(None, ["train.learning_rate=1e-5"]).train.learning_rate == 1e-5
