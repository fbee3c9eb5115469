"""FID for checkpoint selection: torchmetrics' FrechetInceptionDistance, standard or offline.

``inception`` is the standard extractor (InceptionV3 pool3 features; weights from
torch-fidelity's download or a local file). ``offline`` is the same torchmetrics code path with
a seeded random-weight InceptionV3: its numbers rank checkpoints of one run but are not
comparable with published FIDs, and every output says so. It pools Mixed_6e's 768 channels
(the layer of torchmetrics' own ``feature=768`` option), not pool3's 2048: on a CPU the FID's
d×d ``eigvals`` was most of a checkpoint's time, and at 768 it is 14× cheaper (measured).
"""

from __future__ import annotations

import numpy as np

OFFLINE_LABEL = (
    "offline: InceptionV3 with fixed random weights, 149px, Mixed_6e's 768 unit-length features "
    "(not comparable with published FID)"
)
STANDARD_LABEL = "standard: torchmetrics FID, InceptionV3 pool3 (2048) features"


def extractor_label(kind: str) -> str:
    return OFFLINE_LABEL if kind == "offline" else STANDARD_LABEL


OFFLINE_FEATURES = 768  # Mixed_6e's channels
STANDARD_FEATURES = 2048  # pool3


def feature_count(kind: str) -> int:
    """Length of the feature vectors ``feature_extractor(kind, ...)`` returns."""
    return OFFLINE_FEATURES if kind == "offline" else STANDARD_FEATURES


def offline_inception():
    """torchvision's InceptionV3 with seeded random weights, spatially pooled Mixed_6e features
    (torchvision's feature extractor stops there): needs no download."""
    import torch
    import torchvision
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    body = create_feature_extractor(net.eval(), return_nodes={"Mixed_6e": "features"})

    class Features(torch.nn.Module):
        num_features = OFFLINE_FEATURES

        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):  # uint8 NCHW, as torchmetrics passes it
            x = torch.nn.functional.interpolate(x.float() / 255.0, size=(149, 149), mode="bilinear", antialias=True)
            pooled = self.body((x - 0.5) / 0.5)["features"].mean(dim=(2, 3))
            # random weights make activations grow with depth: unit-length features keep FID finite
            return torch.nn.functional.normalize(pooled.double(), dim=1).float()

    return Features()


def feature_extractor(kind: str, weights: str, device: str = "cpu"):
    """The extractor, built once per task and shared by every FID key (uint8 NCHW -> [n, 2048])."""
    import torch

    if kind == "offline":
        net = offline_inception()
    else:
        from torchmetrics.image.fid import NoTrainInceptionV3

        net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights or None
        )
    net = net.to(device).eval()

    def extract(images):
        with torch.no_grad():
            return net(images.to(device)).reshape(len(images), -1)

    return extract


def fid_metric(num_features: int = STANDARD_FEATURES):
    """torchmetrics' FID over features extracted elsewhere (so each image is extracted once,
    whichever keys it counts for)."""
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Precomputed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_features = num_features

        def forward(self, features):
            return features

    return FrechetInceptionDistance(feature=Precomputed(), reset_real_features=False)


def to_uint8_nchw(images: list[np.ndarray]):
    """uint8 HWC arrays as the uint8 NCHW tensor torchmetrics expects."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def new_metrics(keys: list[str], device: str = "cpu", num_features: int = STANDARD_FEATURES) -> dict:
    """One FID metric per key ("all" and each specialty), on the device that makes the images."""
    return {k: fid_metric(num_features).to(device) for k in keys}


def extraction(kind: str, weights: str, keys: list[str], device: str = "cpu") -> tuple:
    """(the extractor, one FID metric per key sized for its features): what a side's pass needs."""
    return feature_extractor(kind, weights, device), new_metrics(keys, device, feature_count(kind))


def update(metrics: dict, extract, specialties: list[str], images: list[np.ndarray], real: bool) -> None:
    """Extract a batch of uint8 HWC images once; add the features to "all" and their specialty."""
    import torch

    features = extract(to_uint8_nchw(images)).float()
    for key, m in metrics.items():
        keep = [i for i, s in enumerate(specialties) if key in ("all", s)]
        if keep:
            m.update(features[torch.tensor(keep, device=features.device)].to(m.device), real=real)


REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


def real_state(metrics: dict) -> dict[str, np.ndarray]:
    """The real images' running sums, flat ``{"<key>/<state>": array}``: what is cached and reused."""
    return {f"{k}/{n}": getattr(m, n).cpu().numpy() for k, m in metrics.items() for n in REAL_STATES}


def load_real_state(metrics: dict, state: dict[str, np.ndarray]) -> None:
    """Start each metric from cached real statistics instead of re-extracting the real images."""
    import torch

    for k, m in metrics.items():
        for n in REAL_STATES:
            setattr(m, n, torch.from_numpy(np.asarray(state[f"{k}/{n}"])).to(m.device))


def compute(metrics: dict) -> dict[str, float]:
    """FID per key; NaN where a key has fewer than two images on a side."""
    out = {}
    for key, m in metrics.items():
        try:
            out[key] = float(m.compute())
        except (RuntimeError, ValueError):
            out[key] = float("nan")
    return out
