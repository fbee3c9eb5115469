"""The selection stage's FID: our symmetric-eigendecomposition formula against torchmetrics'."""

import math

import pytest
import torch

from medisyn.select import fid


def _filled(real, fake):
    m = fid.fid_metric(num_features=real.shape[1])
    m.update(real, real=True)
    m.update(fake, real=False)
    return {"all": m}


def test_frechet_distance_matches_torchmetrics_and_ranks_the_closer_set_lower():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 64, generator=g)
    near = torch.randn(200, 64, generator=g) * 1.1 + 0.1
    far = torch.randn(200, 64, generator=g) * 2.0 + 1.0

    near_metrics, far_metrics = _filled(real, near), _filled(real, far)
    ours_near, ours_far = fid.compute(near_metrics)["all"], fid.compute(far_metrics)["all"]
    theirs_near = float(near_metrics["all"].compute())
    theirs_far = float(far_metrics["all"].compute())

    assert ours_near == pytest.approx(theirs_near, rel=1e-4)
    assert ours_far == pytest.approx(theirs_far, rel=1e-4)
    assert 0 < ours_near < ours_far


def test_fid_is_nan_when_a_side_has_fewer_than_two_images():
    g = torch.Generator().manual_seed(1)
    metrics = _filled(torch.randn(10, 8, generator=g), torch.randn(1, 8, generator=g))
    assert math.isnan(fid.compute(metrics)["all"])
