"""Stable Diffusion pipelines with random weights, built without a download.

The tiny pipelines of SD 1.x, 2.x and SDXL (32x32 images, for tests: they prove the plumbing, not
the pictures), the full SD 1.x and SDXL architectures (for benchmarks: the real sizes and costs),
and the real CLIP tokenizer, built from the vocabulary file that open_clip_torch ships.
`ptp_utils.load_pipeline` gives each by its short name; shapes_train.py builds Shapes World's model
from the same parts.

diffusers and transformers are imported by the functions that use them.

    python offline_models.py --model sd1-random
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import cli

import torch

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# Stable Diffusion 1.x's noise schedule and DDIM settings, shared by every pipeline we build.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
# SD 2.x's and SDXL's OpenCLIP tokenizers pad with "!" (id 0); SD 1.x's CLIP tokenizer with its end token.
OPENCLIP_PAD_TOKEN = "!"
CLIP_MAX_LENGTH = 77
# The latents' scale of SD 1.x's and 2.x's VAE, and of SDXL's.
SD_VAE_SCALING_FACTOR, SDXL_VAE_SCALING_FACTOR = 0.18215, 0.13025
# OpenAI's CLIP ViT-L/14 text encoder: SD 1.x's, and SDXL's first.
CLIP_VIT_L_SIZES = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The CLIP vocabulary: 256 byte symbols, the same with an end-of-word marker, 48,894 merges, BOS, EOS.
CLIP_NUM_MERGES = 49152 - 256 - 2


def offline_clip_tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer of Stable Diffusion 1.x (49,408 tokens), built without network.

    open_clip_torch ships the BPE merges; the vocabulary follows from them exactly as CLIP
    defines it. Only the data file is read, so open_clip itself (and torchvision) need not import.
    `pad_token` OPENCLIP_PAD_TOKEN gives the tokenizer of SD 2.x and SDXL's second text encoder.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline CLIP tokenizer needs the vocabulary file of open_clip_torch: "
            "run `pip install --no-deps open_clip_torch`."
        )
    bpe_path = Path(spec.submodule_search_locations[0]) / CLIP_BPE_FILE
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : CLIP_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_symbols = list(bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    padding = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        model_max_length=CLIP_MAX_LENGTH,
        **padding,
    )


def make_clip_text_encoder(
    tokenizer: CLIPTokenizer, with_projection: bool = False, **sizes
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A randomly initialised CLIP text encoder of the given sizes that reads `tokenizer`'s ids;
    `with_projection`: the one that also returns the projected pooled embedding (SDXL's second)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_model = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return text_model(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sizes,
        )
    )


def make_tiny_pipeline(seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline with random weights, small enough for a CPU test (32x32 images).

    Same classes and wiring as SD 1.x (AutoencoderKL, a cross-attention UNet with down, mid and
    up attention, a CLIP text encoder, the real CLIP tokenizer, SD's schedule): it proves the
    plumbing, not the pictures.
    """
    from diffusers import UNet2DConditionModel

    tokenizer = tokenizer or offline_clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = make_tiny_vae()
    text_encoder = make_clip_text_encoder(
        tokenizer, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    pipe = assemble_pipeline(vae, text_encoder, unet, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sd1_random_pipeline() -> StableDiffusionPipeline:
    """Stable Diffusion 1.x's architecture (CompVis/stable-diffusion-v1-4's configs) with random weights.

    For benchmarks without a download: same sizes, same cost, no pictures.
    """
    from diffusers import UNet2DConditionModel

    tokenizer = offline_clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = make_sd_vae(sample_size=512)
    text_encoder = make_clip_text_encoder(tokenizer, **CLIP_VIT_L_SIZES)
    return assemble_pipeline(vae, text_encoder, unet, tokenizer)


def make_sd2_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A Stable Diffusion 2.x-like pipeline with random weights, small enough for a CPU test (32x32).

    What sets SD 2.x apart from 1.x, in miniature: v-prediction, linear projections in the
    transformer blocks, a head dimension per block, the OpenCLIP tokenizer's "!" padding, and
    attention at three latent resolutions (16, 8 and 4; SD 2.x at 768 px: 96 to 12).
    """
    from diffusers import UNet2DConditionModel

    tokenizer = offline_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        norm_num_groups=16,
    )
    text_encoder = make_clip_text_encoder(
        tokenizer,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="gelu",
    )
    pipe = assemble_pipeline(make_tiny_vae(), text_encoder, unet, tokenizer, prediction_type="v_prediction")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """An SDXL-like pipeline with random weights, small enough for a CPU test (32x32 images).

    SDXL's wiring in miniature (after diffusers' own tiny SDXL test model): two text encoders
    (CLIP and CLIP with projection, their hidden states concatenated for cross-attention), the
    pooled embedding and the size and crop time ids added to the timestep embedding, no
    attention at the finest level, several transformer blocks per level at the coarser ones.
    """
    from diffusers import UNet2DConditionModel

    tokenizer = offline_clip_tokenizer()
    tokenizer_2 = offline_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN)
    torch.manual_seed(seed)
    text_encoder_sizes = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    text_encoder = make_clip_text_encoder(tokenizer, **text_encoder_sizes)
    text_encoder_2 = make_clip_text_encoder(
        tokenizer_2, with_projection=True, hidden_act="gelu", projection_dim=32, **text_encoder_sizes
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        cross_attention_dim=32 + 32,  # both text encoders' hidden states
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # six time ids (original size, crop corner, target size) and the pooled projection
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=16,
    )
    pipe = assemble_pipeline(
        make_tiny_vae(), text_encoder, unet, tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_sdxl_random_pipeline() -> StableDiffusionXLPipeline:
    """SDXL base's architecture (stabilityai/stable-diffusion-xl-base-1.0's configs) with random weights:
    about 3.5 billion parameters, 70 transformer blocks, for benchmarks without a download."""
    from diffusers import UNet2DConditionModel

    tokenizer = offline_clip_tokenizer()
    tokenizer_2 = offline_clip_tokenizer(pad_token=OPENCLIP_PAD_TOKEN)
    unet = UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 * 256 + 1280
    )
    vae = make_sd_vae(sample_size=1024, scaling_factor=SDXL_VAE_SCALING_FACTOR)
    text_encoder = make_clip_text_encoder(tokenizer, **CLIP_VIT_L_SIZES)
    text_encoder_2 = make_clip_text_encoder(
        tokenizer_2,
        with_projection=True,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        hidden_act="gelu",
        projection_dim=1280,
    )
    return assemble_pipeline(
        vae, text_encoder, unet, tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2
    )


def make_sd_vae(sample_size: int, scaling_factor: float = SD_VAE_SCALING_FACTOR) -> AutoencoderKL:
    """Stable Diffusion's VAE (four levels, a latent pixel is 8x8 image pixels) with random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def make_tiny_vae() -> AutoencoderKL:
    """The tiny pipelines' VAE: random weights, two levels (a latent pixel is 2x2 image pixels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        sample_size=32,
    )


def assemble_pipeline(
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    tokenizer: CLIPTokenizer,
    prediction_type: str = "epsilon",
    text_encoder_2: CLIPTextModelWithProjection | None = None,
    tokenizer_2: CLIPTokenizer | None = None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The parts as a Stable Diffusion pipeline (an SDXL one with `text_encoder_2`) with SD's schedule
    (DDIM sampling, the model's `prediction_type`), no safety checker, no watermark."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    if text_encoder_2 is not None:
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
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


# The offline models that are built rather than loaded, by their short names in ptp_utils.OFFLINE_MODELS.
RANDOM_PIPELINES = {
    "tiny": make_tiny_pipeline,
    "sd1-random": make_sd1_random_pipeline,
    "sd2-tiny": make_sd2_tiny_pipeline,
    "sdxl-tiny": make_sdxl_tiny_pipeline,
    "sdxl-random": make_sdxl_random_pipeline,
}


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=RANDOM_PIPELINES, default="tiny", help="the pipeline to build")
    args = parser.parse_args()
    pipe = RANDOM_PIPELINES[args.model]()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    print(f"{args.model}: {type(pipe).__name__}, {size}x{size} images")
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            millions = sum(p.numel() for p in component.parameters()) / 1e6
            print(f"  {name}: {type(component).__name__}, {millions:,.2f}M parameters")
        elif component is not None:
            print(f"  {name}: {type(component).__name__}")


if __name__ == "__main__":
    main()
