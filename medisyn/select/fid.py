"""FID for checkpoint selection: torchmetrics' FrechetInceptionDistance, standard or offline.

``inception`` is the standard extractor (InceptionV3 pool3 features; weights from
torch-fidelity's download or a local file). ``offline`` is the same torchmetrics code path with
a seeded random-weight InceptionV3: its numbers rank checkpoints of one run but are not
comparable with published FIDs, and every output says so.
"""

from __future__ import annotations

import numpy as np

OFFLINE_LABEL = (
    "offline: InceptionV3 with fixed random weights, 149px, unit-length features (not comparable with published FID)"
)
STANDARD_LABEL = "standard: torchmetrics FID, InceptionV3 pool3 (2048) features"


def extractor_label(kind: str) -> str:
    return OFFLINE_LABEL if kind == "offline" else STANDARD_LABEL


def offline_inception():
    """torchvision's InceptionV3 with seeded random weights, pool features: needs no download."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    net.fc = torch.nn.Identity()
    net.eval()

    class Features(torch.nn.Module):
        num_features = 2048

        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):  # uint8 NCHW, as torchmetrics passes it
            x = torch.nn.functional.interpolate(x.float() / 255.0, size=(149, 149), mode="bilinear", antialias=True)
            # random weights make activations grow with depth: unit-length features keep FID finite
            return torch.nn.functional.normalize(self.net((x - 0.5) / 0.5).double(), dim=1).float()

    return Features()


def fid_metric(kind: str, weights: str):
    from torchmetrics.image.fid import FrechetInceptionDistance

    if kind == "offline":
        return FrechetInceptionDistance(feature=offline_inception(), reset_real_features=False)
    return FrechetInceptionDistance(
        feature=2048, reset_real_features=False, feature_extractor_weights_path=weights or None
    )


def to_uint8_nchw(images: list[np.ndarray]):
    """uint8 HWC arrays as the uint8 NCHW tensor torchmetrics expects."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
