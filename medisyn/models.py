"""Every network of the pipeline, from a preset (``medisyn/presets/*.json``) or a path.

A ``build`` preset (``tiny``, ``sdxl-random``) makes SDXL's very classes from the configs in
its file with seeded random weights — no download — so tests, CI and the CPU demo run the
real code path. A ``pretrained`` preset (``sdxl``) loads SDXL base 1.0 with the fp16-fix VAE
from hub ids, and ``model.base``/``model.vae`` point any preset at local directories of the
same layout. Every pipeline's unconditional branch is the encoding of ""
(``force_zeros_for_empty_prompt=False``), as training uses. Embedders for the memorization
audit come from ``embedder`` presets through open_clip.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from medisyn.config import ModelConfig
from medisyn.presets import get_preset

MAX_TOKENS = 77  # CLIP context length, as in SDXL

# Words the tiny tokenizer knows: the paper's caption templates and class phrases, the
# phantom repositories' ones, and common radiology/pathology words for user prompts.
# Anything else maps to <unk> — fine for tests, which only need the captions to differ.
CAPTION_TEXT = """
Chest CT pulmonary angiography image showing pulmonary embolism no presence of.
Brain MRI image showing glioma meningioma pituitary tumor no tumor.
Mammogram image showing no findings a benign mass a malignant mass calcification.
Frontal (AP) chest X-ray image showing lung opacity pleural effusion cardiomegaly edema and
no finding atelectasis pneumonia pneumothorax consolidation.
Breast ultrasound image showing normal tissue a benign lesion a malignant lesion.
Dermoscopy image showing melanoma seborrheic keratosis basal cell carcinoma melanocytic nevi nevus.
Clinical image showing psoriasis eczema acne.
Histopathological lymph node image showing metastasis at 40x magnification.
Optical coherence tomography image showing normal findings drusen choroidal neovascularization
diabetic macular edema.
Fundus photograph showing no abnormalities diabetic retinopathy glaucoma.
Laparoscopic cholecystectomy image during preparation Calot's triangle dissection clipping and
cutting gallbladder packaging cleaning coagulation dissection retraction.
Robot-assisted radical prostatectomy image of cutting the suture picking up the needle
positioning the needle tip pushing the needle through the tissue.
Gastrointestinal endoscopy image showing polyps esophagitis ulcerative colitis dyed lifted polyps.
radiology dermatology pathology ophthalmology surgery gastroenterology computed tomography
magnetic resonance imaging ultrasound microscopy fundoscopy photographs left right with without
small large mild moderate severe view axial sagittal coronal lateral PA
"""
SPECIAL_TOKENS = ("<pad>", "<unk>")  # ids 0 and 1; <bos> and <eos> come last so eos has the highest id


def caption_words(text: str = CAPTION_TEXT) -> list[str]:
    """Distinct lowercase words and punctuation of ``text``, split as the tokenizer splits."""
    pieces = re.findall(r"\w+|[^\w\s]+", text.lower())
    return sorted(set(pieces))


def build_tiny_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level CLIP-like tokenizer over the caption vocabulary; exact on save/reload.

    ``<eos>`` has the highest id: CLIP's text model takes the pooled embedding at the eos
    position (by id, or by argmax on legacy configs), so either rule finds it.
    """
    words = words or caption_words()
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words, "<bos>", "<eos>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def check_tokenizer(tokenizer, expected_vocab: int | None = None, name: str = "tokenizer") -> None:
    """Fail loudly on a degenerate tokenizer (offline hub loads can return one without raising)."""
    size = len(tokenizer)
    if size < 100 or (expected_vocab is not None and size != expected_vocab):
        raise RuntimeError(
            f"{name}: vocabulary has {size} entries (expected {expected_vocab or 'at least 100'}); "
            "the tokenizer files are missing or were not loaded"
        )
    ids = tokenizer("image showing", add_special_tokens=False).input_ids
    if len(set(ids)) < 2:
        raise RuntimeError(f"{name}: distinct words map to the same id {ids}; the tokenizer is degenerate")


def _text_encoder(spec: dict, tokenizer, cls):
    """A CLIP text encoder from a preset's sizes; vocabulary and special ids come from the tokenizer.

    ``query_key_init_scale`` (a build key, not a CLIP config key) multiplies the seeded query and
    key weights. At CLIP's own init a random encoder's attention is nearly uniform, so every
    position carries an average of the caption and captions reach the U-Net almost alike (tiny:
    mean cosine 0.90 between the demo's captions); sharper attention keeps them apart (0.57 at
    5×) at the same scale, and the demo model learns to follow its prompts (docs/PERFORMANCE.md).
    """
    spec = dict(spec)
    qk_scale = float(spec.pop("query_key_init_scale", 1.0))
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # CLIP pools at eos: it must be the tokenizer's
        pad_token_id=tokenizer.pad_token_id,
        **spec,
    )
    encoder = cls(config)
    if qk_scale != 1.0:
        with torch.no_grad():
            for name, weight in encoder.named_parameters():
                if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                    weight.mul_(qk_scale)
    return encoder


def _check_shapes(name: str, unet: dict, te1: dict, te2: dict) -> None:
    """SDXL's U-Net reads both encoders' states and encoder 2's pooled embedding: sizes must agree."""
    cross = te1["hidden_size"] + te2["hidden_size"]
    if unet["cross_attention_dim"] != cross:
        raise ValueError(
            f"preset {name!r}: unet.cross_attention_dim {unet['cross_attention_dim']} must equal the two text "
            f"encoders' hidden sizes summed ({cross})"
        )
    added = 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
    if unet["projection_class_embeddings_input_dim"] != added:
        raise ValueError(
            f"preset {name!r}: unet.projection_class_embeddings_input_dim "
            f"{unet['projection_class_embeddings_input_dim']} must be 6 x addition_time_embed_dim + "
            f"text_encoder_2.projection_dim ({added})"
        )


def scheduler_config(name: str = "sdxl-scheduler") -> dict:
    """A scheduler preset's settings (SDXL base 1.0's scheduler_config.json by default)."""
    return get_preset(name, "scheduler")["config"]


def build_unet(preset: str) -> UNet2DConditionModel:
    """A build preset's U-Net alone, random weights (benchmarks; no text encoders, no VAE)."""
    return UNet2DConditionModel(**get_preset(preset, "diffusion")["build"]["unet"])


def _build_text_encoders(spec: dict, seed: int) -> tuple:
    """A build preset's tokenizers and text encoders, made first after the seed: built alone (the
    caption cache) or in a pipeline, a preset and a seed give the same encoder weights."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    text_encoder = _text_encoder(spec["text_encoder"], tokenizer, CLIPTextModel)
    text_encoder_2 = _text_encoder(spec["text_encoder_2"], tokenizer_2, CLIPTextModelWithProjection)
    return tokenizer, tokenizer_2, text_encoder, text_encoder_2


def build_pipeline(preset: str = "tiny", seed: int = 0) -> StableDiffusionXLPipeline:
    """A ``build`` preset as a full SDXL pipeline with seeded random weights, offline.

    Components are made in a fixed order after one seed, so a preset and a seed always give
    the same weights, on every worker.
    """
    spec = get_preset(preset, "diffusion").get("build")
    if spec is None:
        raise ValueError(f"preset {preset!r} loads pretrained weights; it has no configs to build from")
    _check_shapes(preset, spec["unet"], spec["text_encoder"], spec["text_encoder_2"])
    tokenizer, tokenizer_2, text_encoder, text_encoder_2 = _build_text_encoders(spec, seed)
    unet = UNet2DConditionModel(**spec["unet"])
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**spec["vae"]),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**scheduler_config(spec["scheduler"])),
        force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _source(value: str, default: str, what: str) -> str:
    """A hub id or an existing local directory; a path-like value that does not exist is an error."""
    src = value or default
    if "://" in src:  # an object-store folder (s3://): a per-node local copy (storage.cached_copy)
        from medisyn.storage import cached_copy, diffusers_files

        try:  # only the weights from_pretrained loads (no fp16 variants, .bin or single-file checkpoints)
            return str(cached_copy(src, diffusers_files))
        except FileNotFoundError:
            raise FileNotFoundError(f"model.{what}: {src!r} does not exist") from None
    looks_local = src.startswith((".", "/", "~")) or src.count("/") != 1
    if looks_local and not Path(src).expanduser().is_dir():
        raise FileNotFoundError(f"model.{what}: local directory {src!r} does not exist")
    return str(Path(src).expanduser()) if looks_local else src


def _builds(cfg: ModelConfig) -> bool:
    """True when the networks come from the preset's configs (no ``base`` given, a build preset)."""
    return not cfg.base and "build" in get_preset(cfg.preset, "diffusion")


def _pretrained(cfg: ModelConfig) -> tuple[str, str]:
    """(base, vae) sources: ``model.base``/``model.vae`` or the preset's hub ids. A ``base`` that is
    a full exported pipeline carries its own VAE, so the preset's VAE applies only without one."""
    defaults = get_preset(cfg.preset, "diffusion").get("pretrained", {})
    if not (cfg.base or defaults.get("base")):
        raise ValueError(f"model.preset {cfg.preset!r} has no pretrained weights; set model.base to a model dir")
    base = _source(cfg.base, defaults.get("base", ""), "base")
    vae_default = "" if cfg.base else defaults.get("vae", "")
    vae = _source(cfg.vae, vae_default, "vae") if (cfg.vae or vae_default) else ""
    return base, vae


def with_prediction_type(scheduler, cfg: ModelConfig):
    """The scheduler, predicting what ``model.prediction_type`` says ("" keeps its own): training,
    sampling and the exported ``scheduler/`` must agree, or sampling decodes the wrong quantity."""
    if cfg.prediction_type and scheduler.config.prediction_type != cfg.prediction_type:
        return scheduler.__class__.from_config(scheduler.config, prediction_type=cfg.prediction_type)
    return scheduler


def load_pipeline(cfg: ModelConfig, torch_dtype: torch.dtype | None = None) -> StableDiffusionXLPipeline:
    """The pipeline a config names: a build preset from code, else hub ids or local dirs."""
    if _builds(cfg):
        pipe = build_pipeline(cfg.preset, cfg.seed)
        if cfg.vae:  # a VAE fitted to the corpus (the vae stage) replaces the preset's random one
            pipe.vae = AutoencoderKL.from_pretrained(_source(cfg.vae, "", "vae"))
        pipe.scheduler = with_prediction_type(pipe.scheduler, cfg)
        return pipe.to(dtype=torch_dtype) if torch_dtype else pipe
    base, vae = _pretrained(cfg)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype else {}
    if vae:
        kwargs["vae"] = AutoencoderKL.from_pretrained(vae, **kwargs)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, **kwargs)
    check_tokenizer(pipe.tokenizer, name=f"{base}/tokenizer")
    check_tokenizer(pipe.tokenizer_2, name=f"{base}/tokenizer_2")
    # Our convention (DESIGN §4): the unconditional branch is the encoding of "".
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    pipe.scheduler = with_prediction_type(pipe.scheduler, cfg)
    pipe.set_progress_bar_config(disable=True)
    return pipe


TEXT_PARTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")


def load_text_encoders(cfg: ModelConfig) -> tuple:
    """``(tokenizer, tokenizer_2, text_encoder, text_encoder_2)`` alone: all that encoding captions
    needs, without the U-Net and VAE (SDXL: 2.65 B of its 3.5 B parameters); the same weights and
    classes load_pipeline gives (a base's ``model_index.json`` names the classes)."""
    if _builds(cfg):
        spec = get_preset(cfg.preset, "diffusion")["build"]
        _check_shapes(cfg.preset, spec["unet"], spec["text_encoder"], spec["text_encoder_2"])
        return _build_text_encoders(spec, cfg.seed)
    import transformers

    base = _pretrained(cfg)[0]
    index = StableDiffusionXLPipeline.load_config(base)
    parts = tuple(getattr(transformers, index[name][1]).from_pretrained(base, subfolder=name) for name in TEXT_PARTS)
    check_tokenizer(parts[0], name=f"{base}/tokenizer")
    check_tokenizer(parts[1], name=f"{base}/tokenizer_2")
    return parts


def encode_captions(encoders: tuple, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt encoding, as ``StableDiffusionXLPipeline.encode_prompt`` computes it without
    guidance: both encoders' penultimate hidden states, concatenated, and encoder 2's pooled
    projection. ``encoders`` is what :func:`load_text_encoders` returns."""
    tokenizer, tokenizer_2, text_encoder, text_encoder_2 = encoders
    states = []
    for tokenize, encoder in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
        ids = tokenize(
            captions, padding="max_length", max_length=tokenize.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), out.text_embeds


def load_vae(cfg: ModelConfig) -> AutoencoderKL:
    """The frozen VAE alone (cache actors need nothing else); the same weights load_pipeline gives."""
    if _builds(cfg):
        if cfg.vae:
            return AutoencoderKL.from_pretrained(_source(cfg.vae, "", "vae"))
        return build_pipeline(cfg.preset, cfg.seed).vae
    base, vae = _pretrained(cfg)
    return AutoencoderKL.from_pretrained(vae) if vae else AutoencoderKL.from_pretrained(base, subfolder="vae")


def vae_scaling_factor(cfg: ModelConfig) -> float:
    """The latent scaling factor of the VAE :func:`load_vae` gives, from its config alone (no
    weights: a build preset's VAE is made after its U-Net, so building it builds the pipeline)."""
    default = inspect.signature(AutoencoderKL.__init__).parameters["scaling_factor"].default
    if _builds(cfg) and not cfg.vae:
        return float(get_preset(cfg.preset, "diffusion")["build"]["vae"].get("scaling_factor", default))
    if _builds(cfg):
        config = AutoencoderKL.load_config(_source(cfg.vae, "", "vae"))
    else:
        base, vae = _pretrained(cfg)
        config = AutoencoderKL.load_config(vae) if vae else AutoencoderKL.load_config(base, subfolder="vae")
    return float(config.get("scaling_factor", default))


def load_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """The U-Net to fine-tune: the preset's, or the one inside ``base``."""
    if _builds(cfg):
        return build_pipeline(cfg.preset, cfg.seed).unet
    return UNet2DConditionModel.from_pretrained(_pretrained(cfg)[0], subfolder="unet")


def load_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """The training noise schedule: the preset's scheduler, or the one inside ``base``, predicting
    what ``model.prediction_type`` says."""
    if _builds(cfg):
        spec = get_preset(cfg.preset, "diffusion")["build"]
        return with_prediction_type(DDPMScheduler.from_config(scheduler_config(spec["scheduler"])), cfg)
    return with_prediction_type(DDPMScheduler.from_pretrained(_pretrained(cfg)[0], subfolder="scheduler"), cfg)


def load_embedder(name: str, seed: int = 0):
    """(open_clip model in eval mode, its preprocessing transform) for an embedder preset or source.

    ``name`` is an embedder preset (``biomedclip``, ``tiny-embedder``) or an open_clip source
    (``hf-hub:org/repo``, ``local-dir:/path``) such as a local copy of BiomedCLIP.
    """
    import open_clip

    if name.startswith(("hf-hub:", "local-dir:")):
        entry = {"open_clip": name}
    else:
        entry = get_preset(name, "embedder")
    if "open_clip" in entry:
        model, _, preprocess = open_clip.create_model_and_transforms(entry["open_clip"])
    else:
        torch.manual_seed(seed)
        from open_clip.transform import PreprocessCfg, image_transform_v2

        model = open_clip.CLIP(**entry["open_clip_config"])
        preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(model)), is_train=False)
    return model.eval(), preprocess


def save_pipeline(pipe: StableDiffusionXLPipeline, out: str | Path) -> Path:
    """Save in the diffusers layout, loadable with ``StableDiffusionXLPipeline.from_pretrained``."""
    out = Path(out)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


# VAE helpers every stage that renders through the VAE shares (the fit, its reconstruction sheet,
# the fidelity check's decoder view), and the identity a cache and the fidelity check key it by.


def to_model_input(pixels, device):
    """uint8 NCHW -> float in [-1, 1], channels-last in memory, as the fit holds the VAE's weights
    (a permuted, non-contiguous input was ~5x slower; channels-last against contiguous NCHW, 1.35x
    faster a step of 8 at 128² on 2 cores: oneDNN's convolutions of 8-16 channels, docs/PERFORMANCE.md)."""
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


def reconstruct(vae, x):
    """Model-input images as ``vae`` renders them: encoded, the posterior's mode decoded (what a
    reconstruction is: no sampling noise). Float32 out, whatever the VAE's dtype."""
    return vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mode()).sample.float()


def to_uint8(images):
    """[-1, 1] NCHW tensor -> uint8 NHWC numpy, the layout PIL writes."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


VAE_FILES = ("config.json", "*.safetensors", "*.bin")  # what a VAE directory's encoding depends on


def dir_content(folder, patterns: tuple[str, ...] = VAE_FILES) -> list[list]:
    """``[[name, bytes, sha256], ...]`` of a directory's files matching ``patterns``, by name: what it
    holds, not where it sits or when it was written, so a copy elsewhere has the same content."""
    from medisyn import storage

    folder = storage.path(folder)
    files = sorted({p.name: p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}.items())
    out = []
    for name, path in files:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        out.append([name, path.stat().st_size, h.hexdigest()])
    return out


def model_identity(model: ModelConfig, resolution: int) -> str:
    """Folder name of a cache: which networks and which training resolution it belongs to.

    A VAE directory (a fitted one may be refit in place) is named by its files' names, sizes and
    digests, not by its path: a run directory moved or copied to a bucket keeps its cache. A hub
    id (or "", the preset's) is named as it is."""
    from medisyn import storage

    vae: str | dict = model.vae
    if vae and storage.path(vae).is_dir():
        vae = {"files": dir_content(vae)}
    key = json.dumps(
        {"preset": model.preset, "base": model.base, "vae": vae, "seed": model.seed, "resolution": resolution},
        sort_keys=True,
    )
    return f"{model.preset}-r{resolution}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
