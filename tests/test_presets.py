"""Model presets are data: every entry builds or names its source, bad names fail with the valid ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medisyn.config import load_config
from medisyn.configtools import ConfigError
from medisyn.presets import get_preset, preset_names


def test_registry_lists_every_kind():
    assert preset_names("diffusion") == ["sdxl", "sdxl-random", "tiny"]
    assert preset_names("embedder") == ["biomedclip", "tiny-embedder"]
    assert get_preset("sdxl")["pretrained"] == {"base": "stabilityai/stable-diffusion-xl-base-1.0",
                                                "vae": "madebyollin/sdxl-vae-fp16-fix"}  # fmt: skip
    assert get_preset("biomedclip")["open_clip"].startswith("hf-hub:microsoft/BiomedCLIP")


@pytest.mark.parametrize("name", [n for n in preset_names("diffusion") if "build" in get_preset(n)])
def test_build_presets_have_sdxl_shapes(name):
    from medisyn.models import _check_shapes

    spec = get_preset(name)["build"]
    _check_shapes(name, spec["unet"], spec["text_encoder"], spec["text_encoder_2"])
    assert spec["unet"]["addition_embed_type"] == "text_time" and len(spec["vae"]["block_out_channels"]) == 4


def test_inconsistent_preset_is_refused():
    from medisyn.models import _check_shapes

    spec = get_preset("tiny")["build"]
    spec["text_encoder_2"]["hidden_size"] = 48
    with pytest.raises(ValueError, match=r"preset 'mine': unet.cross_attention_dim 64 must equal .* \(80\)"):
        _check_shapes("mine", spec["unet"], spec["text_encoder"], spec["text_encoder_2"])


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(
        ConfigError, match="model.preset: unknown preset 'sdxl-turbo'; expected one of sdxl, sdxl-random"
    ):
        load_config(None, ["model.preset=sdxl-turbo"])
    with pytest.raises(ConfigError, match="audit_memorization.embedder: unknown embedder 'clip'; expected one of"):
        load_config(None, ["audit_memorization.embedder=clip"])
    ok = load_config(None, ["audit_memorization.embedder=local-dir:/models/biomedclip"])
    assert ok.audit_memorization.embedder == "local-dir:/models/biomedclip"
    with pytest.raises(ValueError, match="unknown embedder preset 'tiny'; expected one of biomedclip, tiny-embedder"):
        get_preset("tiny", "embedder")


def test_pretrained_preset_without_weights_names_the_key(tmp_path):
    from medisyn.config import ModelConfig
    from medisyn.models import build_pipeline

    with pytest.raises(ValueError, match="preset 'sdxl' loads pretrained weights"):
        build_pipeline("sdxl")
    with pytest.raises(FileNotFoundError, match="model.vae: local directory '.*no-vae' does not exist"):
        from medisyn.models import load_vae

        load_vae(ModelConfig(preset="sdxl", vae=str(tmp_path / "no-vae")))


def test_tiny_embedder_embeds_images_deterministically():
    from medisyn.models import load_embedder

    model, preprocess = load_embedder("tiny-embedder")
    images = [Image.fromarray(np.full((96, 96, 3), v, np.uint8)) for v in (0, 128, 255)]
    batch = torch.stack([preprocess(im) for im in images])
    assert batch.shape == (3, 3, 224, 224)
    with torch.no_grad():
        a = model.encode_image(batch, normalize=True)
        b = load_embedder("tiny-embedder")[0].encode_image(batch, normalize=True)
    assert a.shape == (3, 64)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(a, b)  # same preset, same seed: same weights on every worker
    assert (a[0] - a[2]).abs().max() > 1e-4  # different images, different embeddings


def test_one_sampler_images_depend_only_on_their_seed(tiny_pipe):
    from medisyn.infer.sampling import generate_images

    kw = {"resolution": 64, "steps": 3, "guidance_scale": 7.0}
    pair = generate_images(tiny_pipe, ["Dermoscopy image showing melanoma.", "Fundus photograph showing glaucoma."],
                           [11, 12], **kw)  # fmt: skip
    alone = generate_images(tiny_pipe, ["Fundus photograph showing glaucoma."], [12], **kw)
    assert pair[1].dtype == np.uint8 and pair[1].shape == (64, 64, 3)
    assert np.abs(pair[1].astype(int) - alone[0].astype(int)).max() <= 1  # batch-mates do not matter
    assert np.abs(pair[0].astype(int) - pair[1].astype(int)).max() > 0
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        generate_images(tiny_pipe, ["a", "b"], [1], **kw)


def test_size_conditioning_changes_the_image_and_grouping_does_not(tiny_pipe):
    from medisyn.infer.sampling import generate_images

    kw = {"resolution": 64, "steps": 3, "guidance_scale": 7.0}
    prompts = ["Dermoscopy image showing melanoma.", "Fundus photograph showing glaucoma."]
    mixed = generate_images(tiny_pipe, prompts, [11, 12], original_sizes=[(300, 400), (64, 64)], **kw)
    alone = generate_images(tiny_pipe, prompts[1:], [12], **kw)  # no sizes: the output size
    assert np.abs(mixed[1].astype(int) - alone[0].astype(int)).max() <= 1  # its own group, same pixels
    other = generate_images(tiny_pipe, prompts[:1], [11], original_sizes=[(1024, 1024)], **kw)
    assert np.abs(mixed[0].astype(int) - other[0].astype(int)).max() > 0  # SDXL's time ids reach the U-Net
    with pytest.raises(ValueError, match="2 prompts but 1 original sizes"):
        generate_images(tiny_pipe, prompts, [1, 2], original_sizes=[(64, 64)], **kw)


def test_crop_conditioning_is_the_centre_crop_training_saw(tiny_pipe):
    """Ingest centre-crops every image, so a wide source trained with a crop corner of (0, x>0);
    sampling conditions on that corner, not SDXL's (0, 0), which only square sources had."""
    import torch

    from medisyn.infer.sampling import crop_conditioning, generate_images
    from medisyn.ingest.transforms import crop_box

    for size in [(192, 256), (180, 320), (256, 160), (512, 512), (225, 300)]:
        at_ingest = np.asarray(crop_box(*size, 512).crop_top_left)  # what the corpus records
        for resolution in (64, 128, 512):
            cache = tuple(np.rint(at_ingest * resolution / 512).astype(int))  # what train.cache trains on
            assert np.abs(np.subtract(crop_conditioning(size, resolution), cache)).max() <= 1, (size, resolution)
    assert crop_conditioning((192, 256), 128) == (0, 21) and crop_conditioning((256, 160), 64) == (19, 0)
    assert crop_conditioning((512, 512), 128) == (0, 0)

    prompt = "Optical coherence tomography image showing drusen."
    kw = {"resolution": 64, "steps": 3, "guidance_scale": 3.0}
    ours = generate_images(tiny_pipe, [prompt], [5], original_sizes=[(192, 256)], **kw)[0]

    def direct(crop):
        return tiny_pipe(prompt, negative_prompt="", height=64, width=64, original_size=(192, 256),
                         crops_coords_top_left=crop, target_size=(64, 64), num_inference_steps=3, guidance_scale=3.0,
                         generator=torch.Generator().manual_seed(5), output_type="np").images[0]  # fmt: skip

    assert np.abs(ours.astype(int) - (direct((0, 10)) * 255).round().astype(int)).max() <= 1
    assert np.abs(ours.astype(int) - (direct((0, 0)) * 255).round().astype(int)).max() > 1
