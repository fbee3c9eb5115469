"""Prompt fidelity: the classifier check that synthetic images show what was prompted."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medisyn.audit.fidelity import class_key, prompt_fidelity, thumbnails


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _part(images: list[bytes], specialty: list[str], classes: list[str] | None = None) -> dict:
    return {"features": thumbnails(images, 8), "specialty": specialty, "class": classes or specialty}


def _colour(rgb, rng, n):
    return [_png(np.clip(np.array(rgb) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)) for _ in range(n)]


def test_separable_classes_score_full_marks_and_noise_scores_chance():
    rng = np.random.default_rng(0)
    train = _part(_colour((200, 40, 40), rng, 30) + _colour((40, 40, 200), rng, 30), ["red"] * 30 + ["blue"] * 30)
    test = _part(_colour((200, 40, 40), rng, 20) + _colour((40, 40, 200), rng, 20), ["red"] * 20 + ["blue"] * 20)
    good = _part(_colour((190, 50, 40), rng, 20) + _colour((50, 40, 190), rng, 20), ["red"] * 20 + ["blue"] * 20)
    swapped = _part(_colour((40, 40, 200), rng, 20), ["red"] * 20)  # asked for red, made blue
    out = prompt_fidelity(train, test, {"good": good, "swapped": swapped})
    assert out["real_test"]["specialty"]["share"] == 1.0
    assert out["sets"]["good"]["specialty"]["share"] == 1.0
    assert out["sets"]["good"]["specialty"]["by_label"] == {
        "blue": {"n": 20, "share": 1.0},
        "red": {"n": 20, "share": 1.0},
    }
    assert out["sets"]["swapped"]["specialty"]["share"] == 0.0

    noise = [_png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(400)]
    labels = list(rng.choice(["a", "b"], 400))
    out = prompt_fidelity(_part(noise[:200], labels[:200]), _part(noise[200:300], labels[200:300]),
                          {"noise": _part(noise[300:], labels[300:])})  # fmt: skip
    for share in (out["real_test"]["specialty"]["share"], out["sets"]["noise"]["specialty"]["share"]):
        assert 0.3 < share < 0.7  # nothing to learn: chance


def test_fidelity_needs_two_real_classes_and_keys_ignore_label_order():
    rng = np.random.default_rng(0)
    one = _part(_colour((200, 40, 40), rng, 4), ["red"] * 4)
    with pytest.raises(ValueError, match="1 class"):
        prompt_fidelity(one, one, {})
    assert class_key("radiology", "X-ray", ["edema", "cardiomegaly"]) == class_key(
        "radiology", "X-ray", ["cardiomegaly", "edema"]
    )


def test_embedder_features_are_unit_length_and_feed_the_same_check():
    from medisyn.audit.fidelity import embeddings

    rng = np.random.default_rng(0)
    images = _colour((200, 40, 40), rng, 6) + _colour((40, 40, 200), rng, 6)
    e = embeddings(images, "tiny-embedder", batch_size=5)  # the demo's offline embedder, in batches
    assert e.shape == (12, 64)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    part = {"features": e, "specialty": ["red"] * 6 + ["blue"] * 6, "class": ["red"] * 6 + ["blue"] * 6}
    assert prompt_fidelity(part, part, {"same": part})["sets"]["same"]["specialty"]["n"] == 12


def test_decoded_gives_each_image_as_the_vae_renders_it_at_the_training_resolution():
    """The classifier's second view of the real images: resized, encoded, the posterior mode decoded."""
    import torch

    from medisyn.audit.fidelity import decoded
    from medisyn.images import decode_batch
    from medisyn.models import build_pipeline

    rng = np.random.default_rng(0)
    odd = _png(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))  # not square
    images = _colour((200, 40, 40), rng, 3) + [odd]
    vae = build_pipeline("tiny", 0).vae.eval()
    out = decoded(images, vae, 32, batch_size=3)  # two batches
    assert len(out) == 4
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in out])
    assert pixels.shape == (4, 32, 32, 3) and pixels.dtype == np.uint8
    with torch.no_grad():
        x = torch.from_numpy(decode_batch({"image": images}, 32)["pixels"] / np.float32(127.5) - 1)
        want = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    want = ((want + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(pixels - want).max() <= 1.0  # the same image, channels last, rounded to uint8
    assert np.abs(pixels.astype(float) - ((x.permute(0, 2, 3, 1).numpy() + 1) * 127.5)).mean() > 5  # not the input
