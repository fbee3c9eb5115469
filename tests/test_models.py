"""The tiny preset is SDXL's classes, offline; it round-trips through plain diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from medisyn.config import ModelConfig
from medisyn.models import build_tiny_tokenizer, check_tokenizer, load_pipeline, save_pipeline

PROMPT = "Optical coherence tomography image showing drusen."


def _generate(pipe, prompt=PROMPT, seed=0, **kw):
    kw = {"negative_prompt": "", **kw}
    g = torch.Generator().manual_seed(seed)
    return pipe(
        prompt, height=64, width=64, num_inference_steps=4, guidance_scale=7.0, generator=g, output_type="np", **kw
    ).images[0]


def test_tiny_has_sdxl_shapes(tiny_pipe):
    unet, te1, te2 = tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.text_encoder_2
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert (
        unet.config.projection_class_embeddings_input_dim
        == 6 * unet.config.addition_time_embed_dim + te2.config.projection_dim
    )
    assert tiny_pipe.vae_scale_factor == 8
    assert 1e6 < sum(p.numel() for p in unet.parameters()) < 1e7


def test_tokenizer_covers_every_phantom_caption():
    from medisyn.phantoms import REPOSITORIES

    tok = build_tiny_tokenizer()
    unk = tok.unk_token_id
    for repo in REPOSITORIES:
        for phrase in repo.classes.values():
            ids = tok(repo.template.format(label=phrase)).input_ids
            assert unk not in ids, f"{repo.name}: {tok.convert_ids_to_tokens(ids)}"
    ids = tok("Laparoscopic cholecystectomy image during Calot's triangle dissection.").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.eos_token_id == len(tok) - 1  # CLIP pools at the eos position; highest id keeps argmax right too
    assert tok("", padding="max_length", max_length=77).input_ids[:2] == [tok.bos_token_id, tok.eos_token_id]


def test_sharpened_attention_keeps_the_random_encoders_captions_apart():
    """tiny.json's query_key_init_scale: the phantom captions' encodings are far less alike than at
    CLIP's own init, at the same scale (what the demo model needs to follow its prompts)."""
    import copy

    from medisyn.models import _build_text_encoders, encode_captions
    from medisyn.phantoms import REPOSITORIES
    from medisyn.presets import get_preset

    captions = sorted({r.template.format(label=p) for r in REPOSITORIES for p in r.classes.values()})
    spec = get_preset("tiny", "diffusion")["build"]
    assert spec["text_encoder"]["query_key_init_scale"] == spec["text_encoder_2"]["query_key_init_scale"] == 5.0
    plain = copy.deepcopy(spec)
    for key in ("text_encoder", "text_encoder_2"):
        plain[key].pop("query_key_init_scale")

    def similarity(s):
        encoders = _build_text_encoders(s, 0)
        with torch.no_grad():
            states, _ = encode_captions(encoders, captions)
        unit = torch.nn.functional.normalize(states.flatten(1), dim=1)
        cos = unit @ unit.T
        off = cos[~torch.eye(len(captions), dtype=torch.bool)]
        return off.mean().item(), states.std().item(), encoders

    sharp, sharp_std, encoders = similarity(spec)
    blunt, blunt_std, plain_encoders = similarity(plain)
    assert len(captions) > 20 and blunt > 0.85 and sharp < 0.7
    assert 0.5 < sharp_std / blunt_std < 2  # apart, not blown up
    q = "encoder.layers.0.self_attn.q_proj.weight"
    v = "encoder.layers.0.self_attn.v_proj.weight"
    w_sharp, w_plain = dict(encoders[2].named_parameters()), dict(plain_encoders[2].named_parameters())
    assert torch.allclose(w_sharp[q], 5.0 * w_plain[q]) and torch.equal(w_sharp[v], w_plain[v])  # same seed, q/k only


def test_pooled_embedding_taken_at_eos(tiny_pipe):
    tok, te2 = tiny_pipe.tokenizer_2, tiny_pipe.text_encoder_2
    batch = tok(
        ["Dermoscopy image showing melanoma.", "Dermoscopy image showing melanoma. no"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = te2(batch.input_ids, output_hidden_states=True)
    eos = (batch.input_ids == tok.eos_token_id).int().argmax(-1)
    expected = te2.text_projection(te2.text_model.final_layer_norm(out.hidden_states[-1])[torch.arange(2), eos])
    torch.testing.assert_close(out.text_embeds, expected)


def test_save_load_with_plain_diffusers_and_generate(tiny_pipe, tmp_path):
    save_pipeline(tiny_pipe, tmp_path / "tiny")
    loaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "tiny")
    assert loaded.config.force_zeros_for_empty_prompt is False
    check_tokenizer(loaded.tokenizer, expected_vocab=len(tiny_pipe.tokenizer))
    assert loaded.tokenizer(PROMPT).input_ids == tiny_pipe.tokenizer(PROMPT).input_ids
    a, b = _generate(tiny_pipe), _generate(loaded)
    assert a.shape == (64, 64, 3) and np.isfinite(a).all() and a.std() > 1e-3
    np.testing.assert_allclose(a, b, atol=1e-5)
    # the same path through our loader (a local dir as `base`)
    c = _generate(load_pipeline(ModelConfig(preset="sdxl", base=str(tmp_path / "tiny"))))
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_prompt_and_unconditional_branch_matter(tiny_pipe):
    base = _generate(tiny_pipe)
    assert np.abs(base - _generate(tiny_pipe, prompt="Dermoscopy image showing melanoma.")).max() > 1e-4
    # negative_prompt=None with force_zeros would use zeros; our pipelines encode "" either way
    np.testing.assert_allclose(base, _generate(tiny_pipe, negative_prompt=None), atol=1e-6)
    tiny_pipe.register_to_config(force_zeros_for_empty_prompt=True)
    try:
        zeros = _generate(tiny_pipe, negative_prompt=None)
    finally:
        tiny_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    assert np.abs(base - zeros).max() > 1e-4


def test_tiny_preset_via_config_is_deterministic():
    a = load_pipeline(ModelConfig(preset="tiny", seed=3))
    b = load_pipeline(ModelConfig(preset="tiny", seed=3))
    for (n, p), (_, q) in zip(a.unet.named_parameters(), b.unet.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_missing_local_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.base: local directory '.*nowhere' does not exist"):
        load_pipeline(ModelConfig(preset="sdxl", base=str(tmp_path / "nowhere")))


def test_degenerate_tokenizer_is_refused():
    tok = build_tiny_tokenizer(words=["image"])  # every other word becomes <unk>
    with pytest.raises(RuntimeError, match="vocabulary has 5 entries"):
        check_tokenizer(tok)
    big_but_blind = build_tiny_tokenizer(words=[f"w{i}" for i in range(200)])
    with pytest.raises(RuntimeError, match="distinct words map to the same id"):
        check_tokenizer(big_but_blind)


@pytest.mark.gpu
def test_tiny_pipeline_bf16_on_cuda():
    from medisyn.models import build_pipeline

    pipe = build_pipeline("tiny").to("cuda", torch.bfloat16)
    g = torch.Generator("cuda").manual_seed(0)
    img = pipe(
        PROMPT, negative_prompt="", height=64, width=64, num_inference_steps=4, generator=g, output_type="np"
    ).images[0]
    assert np.isfinite(img).all() and img.std() > 1e-3


def test_sdxl_random_unet_is_the_real_architecture():
    from diffusers import UNet2DConditionModel

    from medisyn.presets import get_preset

    with torch.device("meta"):  # no memory: shapes only
        unet = UNet2DConditionModel(**get_preset("sdxl-random")["build"]["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684  # SDXL base 1.0's U-Net
