"""The guidance gap: a second memorization signal that classifier-free guidance computes for free.

Every guided sampling step runs the U-Net on a batch of two halves, the unconditional
(``negative_prompt``) predictions first and the conditional ones second (diffusers' SDXL
pipeline: ``noise_pred.chunk(2)``). Wen et al. (ICLR 2024) find that the size of their
difference over the first steps separates memorised prompts from the rest. A forward hook on
the U-Net sees that output, so recording it costs no U-Net pass, in our sampling loop and in a
plain diffusers pipeline alike::

    gap = record_guidance_gap(pipe, steps=5)
    images = pipe(prompts, guidance_scale=7.0).images
    gaps = gap()  # one float per image (None where the call was not guided)

Per image and step: the root mean square over latent elements of ``eps_cond - eps_uncond``
(in float32), averaged over the first ``steps`` U-Net calls of a pipeline call.
"""

from __future__ import annotations

import torch


class GuidanceGap:
    """Handle of a hook on ``pipe.unet``: call it after ``pipe(...)`` for that call's per-image gaps.

    The hook keeps each guided U-Net call's timestep and per-image gap on the device (no sync per
    step); reading splits them into pipeline calls (a call's timesteps fall, so a rise starts the
    next call, as does a change of batch) and averages the latest call's first ``steps``. Reading
    also clears the record. ``remove()`` (or leaving a ``with`` block) takes the hook off."""

    KEEP = 4096  # U-Net calls held between reads, at most (a handle nobody reads stays small)

    def __init__(self, pipe, steps: int = 5):
        if steps < 1:
            raise ValueError(f"record_guidance_gap: steps must be >= 1, not {steps}")
        self.pipe, self.steps = pipe, steps
        self._calls: list[tuple[torch.Tensor | float, torch.Tensor | int]] = []  # (timestep, gaps or n unguided)
        self._handle = pipe.unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("timestep", 0.0)
        t = t.detach().flatten()[0] if isinstance(t, torch.Tensor) else float(t)
        pred = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        guided = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and pred.shape[0] % 2 == 0
        if guided:
            uncond, cond = pred.detach().chunk(2)
            gap = (cond.float() - uncond.float()).pow(2).mean(dim=tuple(range(1, pred.ndim))).sqrt()
            self._calls.append((t, gap))
        else:
            self._calls.append((t, int(pred.shape[0])))
        del self._calls[: -self.KEEP]

    def __call__(self) -> list[float | None]:
        """Per-image gaps of the latest pipeline call (None each where it was not guided); clears the record."""
        calls, self._calls = self._calls, []
        if not calls:
            return []
        times = [float(t) for t, _ in calls]  # one transfer per read, not per step

        def size(g):
            return g if isinstance(g, int) else -g.shape[0]  # unguided n, guided -n: either change starts a call

        first = 0
        for i in range(1, len(calls)):
            if times[i] > times[i - 1] or size(calls[i][1]) != size(calls[i - 1][1]):
                first = i
        latest = [g for _, g in calls[first:]]
        if isinstance(latest[0], int):
            return [None] * latest[0]
        used = latest[: self.steps]
        return (torch.stack(used).mean(dim=0)).cpu().tolist()

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> GuidanceGap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def record_guidance_gap(pipe, steps: int = 5) -> GuidanceGap:
    """Hook ``pipe.unet`` (a diffusers Stable Diffusion / SDXL pipeline) to record each image's guidance gap."""
    return GuidanceGap(pipe, steps)
