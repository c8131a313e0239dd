"""Models the project builds itself from configs (tiny ones, and one of SD 1.5's shape), so everything runs offline.

Each embedded model has an id ``embedded:<name>``; it is built once, seeded, saved in the
library's own format (diffusers / transformers) under the cache folder and from then on
loaded by the same ``from_pretrained`` path a hub id or local folder takes. Weights are
random: these bases exercise the code path, not image quality. A builder draws from its own
stream (``BUILD_SEED``) and leaves the caller's torch random state as it found it, so a
training run that builds a model into a cold cache continues exactly as one with a warm cache.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from conceptflow.errors import ModelUnavailableError
from conceptflow.fileio import atomic_directory
from conceptflow.models.tokenizer import build_clip_tokenizer

EMBEDDED_PREFIX = "embedded:"
BUILD_SEED = 0
# Bump when a builder changes so old caches are not reused.
EMBEDDED_VERSION = "1"


def seeded_build(builder: Callable) -> Callable:
    """``builder`` run on torch's stream seeded with ``BUILD_SEED``; the caller's stream is
    restored afterwards (``torch.random.fork_rng``), as if nothing had been built."""
    @functools.wraps(builder)
    def build(*args, **kwargs):
        with torch.random.fork_rng():
            torch.manual_seed(BUILD_SEED)
            return builder(*args, **kwargs)
    return build


def cache_root() -> Path:
    """Where embedded models are built: $CONCEPTFLOW_CACHE or ~/.cache/conceptflow."""
    return Path(os.environ.get("CONCEPTFLOW_CACHE", Path.home() / ".cache" / "conceptflow"))


def _tiny_text_config(hidden: int = 32, layers: int = 2, intermediate: int = 37, heads: int = 4) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


@dataclass(frozen=True)
class TinySDSize:
    """Sizes of the tiny SD-1.x architecture; the defaults are ``embedded:tiny-sd``'s.

    The toy base (``recipes.toy.pretrain``) uses the same builder with its own sizes.
    """

    unet_channels: tuple[int, ...] = (32, 64)
    unet_layers_per_block: int = 1
    unet_attention_heads: int = 8  # diffusers' ``attention_head_dim`` is the number of heads
    text_hidden: int = 32
    text_layers: int = 2
    text_intermediate: int = 37
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: x4 down, 64 px -> 16x16 latents
    image_size: int = 64


@seeded_build
def build_tiny_sd_pipeline(tokenizer, size: TinySDSize = TinySDSize()):
    """An untrained (seeded) tiny SD-1.x ``StableDiffusionPipeline`` of the given sizes."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(size.unet_channels)
    vae_downsampling = 2 ** (len(size.vae_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=size.image_size // vae_downsampling,
        in_channels=4,
        out_channels=4,
        block_out_channels=size.unet_channels,
        layers_per_block=size.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * levels,
        up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=size.text_hidden,
        attention_head_dim=size.unet_attention_heads,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(size.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(size.vae_channels),
        block_out_channels=size.vae_channels,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=size.image_size,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_text_config(
        size.text_hidden, size.text_layers, size.text_intermediate, size.text_heads)))
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd(folder: Path, size: TinySDSize = TinySDSize()) -> None:
    """An SD-1.x-architecture pipeline: 64 px images, x4 VAE (16x16 latents), 2-level UNet.

    Cross-attention sits in both down blocks, the mid block and both up blocks, so the
    layer-wise token embeddings, attention hooks and the mid/early-decoder edits of the
    samplers all have somewhere to act (7 cross-attention layers; SD 1.5 has 16).
    """
    tokenizer = build_clip_tokenizer(folder / "tokenizer_build")
    pipeline = build_tiny_sd_pipeline(tokenizer, size)
    pipeline.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer_build")


@seeded_build
def build_tiny_clip(folder: Path) -> None:
    """A CLIPModel + CLIPProcessor (32 px images) with the real CLIP vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = CLIPConfig(
        text_config=_tiny_text_config(),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=32,
        ),
        projection_dim=32,
    )
    model = CLIPModel(config)
    tokenizer = build_clip_tokenizer(folder / "tokenizer_build")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    shutil.rmtree(folder / "tokenizer_build")


@seeded_build
def build_tiny_dino(folder: Path) -> None:
    """A ViT (the DINO v1 architecture, as facebook/dino-vits16) + its image processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    model = ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  image_size=32, patch_size=8),
        add_pooling_layer=False,
    )
    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)


# ---------------------------------------------------------------- SD-1.5-shaped (random weights)
# The configs of runwayml/stable-diffusion-v1-5 (unet/, vae/, text_encoder/, scheduler/ config.json),
# written out here so that nothing is fetched from a hub.
SD15_UNET_CONFIG: dict = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD15_VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
# CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14), as SD 1.5's text_encoder.
SD15_TEXT_CONFIG: dict = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SD15_SCHEDULER_CONFIG: dict = dict(  # PNDM, as SD 1.5 ships; DDIM/DPM-Solver read the same fields
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)
SD15_STORAGE_DTYPE = torch.float16  # on disk; ``from_pretrained(torch_dtype=...)`` casts on load


@seeded_build
def build_sd15_shaped_pipeline(tokenizer):
    """A ``StableDiffusionPipeline`` with SD 1.5's architecture and random (seeded) float32 weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(SD15_VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel.from_config(SD15_UNET_CONFIG),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_sd15_shaped(folder: Path) -> None:
    """SD 1.5's architecture with random weights, as a diffusers folder (``embedded:sd15-shaped``).

    UNet 860 M parameters (16 cross-attention layers, 320/640/1280/1280, 64x64 latents at 512 px),
    VAE 84 M (x8, scaling 0.18215), CLIP ViT-L/14 text encoder 123 M, the real CLIP tokenizer,
    SD 1.5's PNDM scheduler config. Weights are stored in float16 (~2 GB instead of ~4 GB;
    loading casts to the dtype asked for), so a float32 load sees float16-rounded random weights.
    Loaded by the same ``from_pretrained`` path as ``runwayml/stable-diffusion-v1-5``: shapes and
    memory are real, images are noise.
    """
    tokenizer = build_clip_tokenizer(folder / "tokenizer_build")
    pipeline = build_sd15_shaped_pipeline(tokenizer)
    pipeline.to(SD15_STORAGE_DTYPE)
    pipeline.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer_build")


EMBEDDED_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-sd": build_tiny_sd,
    "tiny-clip": build_tiny_clip,
    "tiny-dino": build_tiny_dino,
    "sd15-shaped": build_sd15_shaped,
}


def embedded_model_path(model_id: str) -> Path:
    """Build ``embedded:<name>`` into the cache once (atomically) and return its folder."""
    name = model_id.removeprefix(EMBEDDED_PREFIX)
    if name not in EMBEDDED_BUILDERS:
        raise ModelUnavailableError(
            f"unknown embedded model {model_id!r}; available: "
            + ", ".join(EMBEDDED_PREFIX + n for n in EMBEDDED_BUILDERS)
        )
    folder = cache_root() / f"{name}-v{EMBEDDED_VERSION}"
    if not (folder / ".complete").is_file():
        with atomic_directory(folder, keep_existing=True) as staging:  # a concurrent builder may finish first
            EMBEDDED_BUILDERS[name](staging)
            (staging / ".complete").write_text(model_id + "\n")
        if not (folder / ".complete").is_file():
            raise ModelUnavailableError(f"{folder} is not a finished build of {model_id}: delete it to rebuild")
    return folder
