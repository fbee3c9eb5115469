"""The selection stage's FID wrapper: features extracted elsewhere, NaN where a side is too small."""

import math
from types import SimpleNamespace

import pytest
import torch

from medisyn.select import fid


def _filled(real, fake):
    m = fid.fid_metric(num_features=real.shape[1])
    m.update(real, real=True)
    m.update(fake, real=False)
    return {"all": m}


def test_the_closer_set_scores_lower_and_a_side_below_two_images_is_nan():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 64, generator=g)
    near = fid.compute(_filled(real, torch.randn(200, 64, generator=g) * 1.1 + 0.1))["all"]
    far = fid.compute(_filled(real, torch.randn(200, 64, generator=g) * 2.0 + 1.0))["all"]
    assert 0 < near < far
    assert math.isnan(fid.compute(_filled(real[:10], torch.randn(1, 64, generator=g)))["all"])


def test_the_offline_extractor_gives_unit_length_mixed_6e_features_that_fit_its_metrics():
    """768 features (Mixed_6e), as ``feature_count`` says, so select's metrics are made that size."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 64, 64), dtype=torch.uint8, generator=g)
    extract, metrics = fid.extraction("offline", "", ["all"])
    features = extract(images)
    assert features.shape == (6, fid.feature_count("offline")) == (6, 768)
    assert torch.allclose(features.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.equal(features, fid.feature_extractor("offline", "")(images))  # fixed weights: same features
    assert fid.feature_count("inception") == 2048 and "768" in fid.extractor_label("offline")
    hwc = [im.permute(1, 2, 0).numpy() for im in images]
    fid.update(metrics, extract, ["x"] * 6, hwc, real=True)
    fid.update(metrics, extract, ["x"] * 3, hwc[:3], real=False)
    assert math.isfinite(fid.compute(metrics)["all"])


class _CountingPipe:
    """Stands in for the SDXL pipeline: records each call and paints every image its seed."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, *, generator, original_size, height, width, **kwargs):
        import numpy as np

        seeds = [g.initial_seed() for g in generator]
        self.calls.append({"prompts": list(prompts), "seeds": seeds, "size": tuple(original_size)})
        images = np.stack([np.full((height, width, 3), (s % 251) / 255, np.float32) for s in seeds])
        return SimpleNamespace(images=images)


def test_select_batches_a_mixed_sample_by_image_type_one_pipeline_call_each(monkeypatch):
    """A sample whose image types interleave is made in full batches of one size each (not one call
    per type per batch); each image keeps its row's seed and size, and its specialty in the FID."""
    import numpy as np

    from medisyn.select.stage import pipeline_fid

    sizes = {"dermoscopy": [450, 600], "chest x-ray": [512, 512], "fundoscopy": [300, 400]}
    specialty = {"dermoscopy": "dermatology", "chest x-ray": "radiology", "fundoscopy": "ophthalmology"}
    types = np.random.default_rng(0).permutation([t for t in sizes for _ in range(8)])
    rows = [{"caption": f"c{i}", "image_type": t, "specialty": specialty[t]} for i, t in enumerate(types)]
    seen = []
    monkeypatch.setattr(fid, "extraction", lambda *args: (None, {}))
    monkeypatch.setattr(fid, "load_real_state", lambda metrics, real: None)
    monkeypatch.setattr(fid, "update", lambda m, x, keys, images, real: seen.extend(zip(keys, images, strict=True)))
    monkeypatch.setattr(fid, "compute", lambda metrics: {"all": 0.0})
    pipe = _CountingPipe()
    kw = {"kind": "offline", "weights": "", "resolution": 16, "steps": 1, "guidance_scale": 7.0, "sizes": sizes}
    pipeline_fid(pipe, rows, {}, batch_size=8, seed=3, **kw)
    assert len(pipe.calls) == 3 and all(len(c["prompts"]) == 8 for c in pipe.calls)  # 24 rows, 3 sizes
    made = {p: (s, c["size"]) for c in pipe.calls for p, s in zip(c["prompts"], c["seeds"], strict=True)}
    assert made == {r["caption"]: (3 * 1_000_003 + i, tuple(sizes[r["image_type"]])) for i, r in enumerate(rows)}
    painted = {(3 * 1_000_003 + i) % 251: r["specialty"] for i, r in enumerate(rows)}  # seeds 3000009.. differ mod 251
    assert len(seen) == len(rows) and all(painted[int(image[0, 0, 0])] == key for key, image in seen)
    pipe = _CountingPipe()
    pipeline_fid(pipe, rows, {}, batch_size=5, seed=3, **kw)  # 8 a type at 5 a batch: a batch may hold two sizes
    assert [len(c["prompts"]) for c in pipe.calls] == [5, 3, 2, 5, 1, 4, 4]  # sorted: split only where a size ends


@pytest.mark.ray
def test_select_exports_in_a_ray_task_and_not_in_the_driver(ray_cluster, tmp_path, monkeypatch):
    """The export loads the whole pipeline (fp32 SDXL: ≈ 19 GB): a Ray task does it, the driver gets a path."""
    import json

    import pyarrow as pa
    from safetensors.torch import load_file

    import medisyn.models
    from medisyn import storage
    from medisyn.config import load_config
    from medisyn.records import CORPUS_SCHEMA
    from medisyn.select.stage import run as select

    unet = medisyn.models.build_pipeline("tiny", seed=0).unet
    unet.to(torch.bfloat16).save_pretrained(tmp_path / "checkpoints/epoch-000/unet")  # as training saves it
    rows = [{"id": f"{i:032x}", "image": b"", "caption": "c", "specialty": "dermatology", "image_type": "dermoscopy",
             "labels": [], "patient_id": f"p{i}", "split": "train", "source": "s", "source_ref": f"s/{i}",
             "series": f"s/{i}", "original_size": [300, 400], "crop_top_left": [0, 50]} for i in range(2)]  # fmt: skip
    storage.write_table(pa.Table.from_pylist(rows, CORPUS_SCHEMA), tmp_path / "corpus" / "s-0.parquet")
    cfg = load_config(
        None, ["model.preset=tiny", f"run_dir={tmp_path}", "select.criterion=last", "train.use_gpu=false"]
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the driver loaded the pipeline")

    monkeypatch.setattr(medisyn.models, "load_pipeline", refuse)
    selection = select(cfg)
    assert selection["best"] == "epoch-000" and selection["exported"] == str(tmp_path / "model")
    record = json.loads((tmp_path / "model/medisyn.json").read_text())
    assert record["checkpoint"] == "epoch-000" and record["original_sizes"]["dermoscopy"] == [300, 400]
    exported = load_file(tmp_path / "model/unet/diffusion_pytorch_model.safetensors")
    trained = load_file(tmp_path / "checkpoints/epoch-000/unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
