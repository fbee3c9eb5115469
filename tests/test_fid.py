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
