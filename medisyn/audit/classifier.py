"""One utility trial's classifier: a torchvision ResNet trained on an arm, tested at its best epoch.

Plain torch, no Ray: ``fit`` takes arrays and a callback that the Tune trainable turns into
``tune.report`` (with a checkpoint) and tests call directly. The seed fixes the head's and
the backbone's initialisation and the data order; the epoch with the best validation macro
AUROC is kept, and the test set is scored only when validation improves, so no test number
ever influences a choice and the checkpoint carries the kept predictions, not a second model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from medisyn.audit.stats import macro_auroc

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class FitSettings:
    arch: str = "resnet50"
    num_classes: int = 2
    multilabel: bool = False
    epochs: int = 15
    batch_size: int = 32
    learning_rate: float = 1e-4
    seed: int = 0
    steps: int = 0  # optimizer steps to take (0: ``epochs`` full passes); equal_steps sets it
    weights: str = "none"  # none | imagenet | a state_dict file (see resolve_weights)
    device: str = "cpu"


@dataclass
class FitState:
    """What a checkpoint holds: enough to continue the trial exactly where it stopped."""

    epoch: int = 0  # epochs finished
    steps: int = 0  # optimizer steps taken
    best_epoch: int = -1
    best_val_auroc: float = float("nan")
    test_scores: np.ndarray | None = None  # [n_test, C] at the best epoch
    history: list[dict] = field(default_factory=list)
    model: dict | None = None
    optimizer: dict | None = None


def resolve_weights(arch: str, weights: str) -> tuple[str, str]:
    """(what a trial should load, what the outputs say). ``imagenet`` is fetched once here (into
    torch's hub cache); when it cannot be, the trials start from random weights and say so."""
    from pathlib import Path

    if weights == "none":
        return "none", "random initialisation"
    if weights == "imagenet":
        import torchvision

        try:
            torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=False)
        except Exception as exc:  # offline, a proxy, a missing file: the audit runs, labelled
            note = f"random initialisation (ImageNet weights unavailable: {type(exc).__name__}: {exc})"
            log.warning("audit-utility: %s", note)
            return "none", note
        return "imagenet", f"ImageNet ({torchvision.models.get_model_weights(arch).DEFAULT})"
    if not Path(weights).is_file():
        from medisyn.configtools import ConfigError

        raise ConfigError(f"audit_utility.weights: {weights!r} is not none, imagenet or an existing file")
    return weights, f"from {Path(weights).name}"


def build_classifier(arch: str, num_classes: int, weights: str = "none"):
    """A torchvision ResNet with a ``num_classes`` head; backbone weights per ``resolve_weights``."""
    import torch
    import torchvision

    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        model.load_state_dict(torchvision.models.get_model_weights(arch).DEFAULT.get_state_dict(progress=False))
    elif weights != "none":
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the head is the task's own
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shapes of another architecture
            raise ValueError(f"{weights}: not a {arch} state dict ({str(exc).splitlines()[0]})") from None
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise ValueError(f"{weights}: not a {arch} state dict (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


def _batches(x: np.ndarray, device, size: int, order=None):
    """uint8 [n, H, W, 3] -> normalised float tensors [b, 3, H, W], one batch at a time."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    order = np.arange(len(x)) if order is None else order
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        t = torch.from_numpy(np.ascontiguousarray(x[rows])).to(device)
        t = t.permute(0, 3, 1, 2).float().div_(255.0)
        yield rows, ((t - mean) / std).contiguous(memory_format=torch.channels_last)


def predict(model, x: np.ndarray, multilabel: bool, device, batch_size: int = 64) -> np.ndarray:
    """[n, C] scores: sigmoid per label (multi-label) or softmax over classes."""
    import torch

    model.eval()
    out = []
    with torch.inference_mode(), _autocast(device):
        for _, batch in _batches(x, device, batch_size):
            logits = model(batch).float()
            out.append((logits.sigmoid() if multilabel else logits.softmax(dim=1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _autocast(device):
    import contextlib

    import torch

    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def planned_steps(s: FitSettings, n_train: int) -> tuple[int, int]:
    """(epochs, optimizer steps) the trial will run: full passes, or ``steps`` (equal_steps)."""
    per_epoch = math.ceil(n_train / s.batch_size)
    if s.steps <= 0:
        return s.epochs, s.epochs * per_epoch
    return math.ceil(s.steps / per_epoch), s.steps


def fit(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    s: FitSettings,
    state: FitState | None = None,
    on_epoch: Callable[[FitState], None] | None = None,
) -> FitState:
    """Train, validate each epoch, score the test set whenever validation improves.

    ``train``/``val``/``test`` are (uint8 images [n, H, W, 3], bool truths [n, C]); ``state``
    resumes a trial from its last checkpoint; ``on_epoch`` sees the state after every epoch."""
    import torch

    device = torch.device(s.device)
    torch.manual_seed(s.seed)
    model = build_classifier(s.arch, s.num_classes, s.weights).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.learning_rate)
    state = state or FitState()
    if state.model is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
    x, y = train
    target = torch.from_numpy(y.astype(np.float32) if s.multilabel else y.argmax(axis=1)).to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss() if s.multilabel else torch.nn.CrossEntropyLoss()
    epochs, total_steps = planned_steps(s, len(x))
    while state.epoch < epochs and state.steps < total_steps:
        model.train()
        gen = torch.Generator().manual_seed(s.seed * 100_003 + state.epoch)  # data order: (seed, epoch)
        order = torch.randperm(len(x), generator=gen).numpy()
        losses = []
        for rows, batch in _batches(x, device, s.batch_size, order):
            if state.steps >= total_steps:
                break
            with _autocast(device):
                loss = loss_fn(model(batch).float(), target[torch.from_numpy(rows).to(device)])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            state.steps += 1
            losses.append(loss.detach())
        val_auroc = macro_auroc(val[1], predict(model, val[0], s.multilabel, device))
        state.epoch += 1
        improved = not np.isfinite(state.best_val_auroc) or val_auroc > state.best_val_auroc
        if improved:
            state.best_epoch, state.best_val_auroc = state.epoch, val_auroc
            state.test_scores = predict(model, test[0], s.multilabel, device)
        state.history.append(
            {
                "epoch": state.epoch,
                "steps": state.steps,
                "loss": float(torch.stack(losses).mean()) if losses else float("nan"),
                "val_auroc": val_auroc,
            }
        )
        state.model = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        state.optimizer = optimizer.state_dict()
        if on_epoch is not None:
            on_epoch(state)
    return state
