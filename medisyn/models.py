"""Every network of the pipeline, from a preset or a path.

``sdxl`` loads SDXL base 1.0 (text encoders, tokenizers, U-Net, scheduler) with the
fp16-fix VAE, from hub ids or local directories of the same layout. ``tiny`` builds the
very same classes from small configs in code — no download — so tests, CI and the CPU demo
run the real code path. Both give a :class:`StableDiffusionXLPipeline` whose unconditional
branch is the encoding of "" (``force_zeros_for_empty_prompt=False``), as training uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from medisyn.config import ModelConfig

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE = "madebyollin/sdxl-vae-fp16-fix"
MAX_TOKENS = 77  # CLIP context length, as in SDXL

# Scheduler settings of SDXL base 1.0 (its scheduler_config.json), shared by both presets.
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
    use_karras_sigmas=False,
)

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
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=MAX_TOKENS,
    )


def check_tokenizer(tokenizer, expected_vocab: int | None = None, name: str = "tokenizer") -> None:
    """Fail loudly on a degenerate tokenizer (offline hub loads can return one without raising)."""
    size = len(tokenizer)
    if size < 100 or (expected_vocab is not None and size != expected_vocab):
        raise RuntimeError(f"{name}: vocabulary has {size} entries (expected {expected_vocab or 'at least 100'}); "
                           "the tokenizer files are missing or were not loaded")
    ids = tokenizer("image showing", add_special_tokens=False).input_ids
    if len(set(ids)) < 2:
        raise RuntimeError(f"{name}: distinct words map to the same id {ids}; the tokenizer is degenerate")


def tiny_text_encoder_config(tokenizer: PreTrainedTokenizerFast, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, hidden_act="gelu",
        projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def tiny_unet(cross_attention_dim: int = 64, pooled_dim: int = 32) -> UNet2DConditionModel:
    """SDXL's U-Net layout (text-time conditioning, linear projections) at ~3 M parameters."""
    time_dim = 8
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=cross_attention_dim, use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        # SDXL: 6 time ids (original size, crop top-left, target size) x time_dim + pooled text
        projection_class_embeddings_input_dim=6 * time_dim + pooled_dim,
    )


# SDXL base 1.0's U-Net (unet/config.json): 2.57 B parameters. Built from this dict with random
# weights, it gives the real architecture for benchmarks without a download.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def sdxl_random_unet() -> UNet2DConditionModel:
    """The real SDXL U-Net architecture with random weights (benchmarks; no download)."""
    return UNet2DConditionModel(**SDXL_UNET)


def tiny_vae() -> AutoencoderKL:
    """Four levels, so the latent factor is 8 as in SDXL's VAE (and scaling factor 0.13025)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=128, scaling_factor=0.13025, force_upcast=False,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """The ``tiny`` preset: SDXL's classes with random weights, built offline in about a second."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    text_encoder = CLIPTextModel(tiny_text_encoder_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(tiny_text_encoder_config(tokenizer_2))
    cross_dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    unet = tiny_unet(cross_attention_dim=cross_dim, pooled_dim=text_encoder_2.config.projection_dim)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), force_zeros_for_empty_prompt=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _source(value: str, default: str, what: str) -> str:
    """A hub id or an existing local directory; a path-like value that does not exist is an error."""
    src = value or default
    looks_local = src.startswith((".", "/", "~")) or src.count("/") != 1
    if looks_local and not Path(src).expanduser().is_dir():
        raise FileNotFoundError(f"model.{what}: local directory {src!r} does not exist")
    return str(Path(src).expanduser()) if looks_local else src


def load_pipeline(cfg: ModelConfig, torch_dtype: torch.dtype | None = None) -> StableDiffusionXLPipeline:
    """The pipeline a config names: ``tiny`` from code, ``sdxl`` from hub ids or local dirs.

    A ``base`` that holds a full exported pipeline (e.g. a fine-tuned run's export) also
    carries its own VAE; ``vae`` then overrides it only when set explicitly.
    """
    if cfg.preset == "tiny" and not cfg.base:
        pipe = build_tiny_pipeline(cfg.seed)
        return pipe.to(dtype=torch_dtype) if torch_dtype else pipe
    base = _source(cfg.base, SDXL_BASE, "base")
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype else {}
    if cfg.vae or cfg.preset == "sdxl" and not cfg.base:
        kwargs["vae"] = AutoencoderKL.from_pretrained(_source(cfg.vae, SDXL_VAE, "vae"), **kwargs)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, **kwargs)
    check_tokenizer(pipe.tokenizer, name=f"{base}/tokenizer")
    check_tokenizer(pipe.tokenizer_2, name=f"{base}/tokenizer_2")
    # Our convention (DESIGN §4): the unconditional branch is the encoding of "".
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vae(cfg: ModelConfig) -> AutoencoderKL:
    """The frozen VAE alone (cache actors need nothing else)."""
    if cfg.preset == "tiny" and not cfg.base:
        return build_tiny_pipeline(cfg.seed).vae
    if cfg.vae or not cfg.base:
        return AutoencoderKL.from_pretrained(_source(cfg.vae, SDXL_VAE, "vae"))
    return AutoencoderKL.from_pretrained(_source(cfg.base, SDXL_BASE, "base"), subfolder="vae")


def load_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    """The U-Net to fine-tune: the preset's, or the one inside ``base``."""
    if cfg.preset == "tiny" and not cfg.base:
        return build_tiny_pipeline(cfg.seed).unet
    return UNet2DConditionModel.from_pretrained(_source(cfg.base, SDXL_BASE, "base"), subfolder="unet")


def save_pipeline(pipe: StableDiffusionXLPipeline, out: str | Path) -> Path:
    """Save in the diffusers layout, loadable with ``StableDiffusionXLPipeline.from_pretrained``."""
    out = Path(out)
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
