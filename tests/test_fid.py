"""The selection stage's FID wrapper: features extracted elsewhere, NaN where a side is too small."""

import math

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
