"""Diffusers plumbing and image helpers for Prompt-to-Prompt (Hertz et al. 2022).

The attention processors that let a controller read and edit attention, one denoising step
with classifier-free guidance, latent <-> image conversions, image grids with captions, and
the attention-map figures. Also the offline pieces: the real CLIP tokenizer built from the
vocabulary that open_clip_torch ships, and a tiny random-weight Stable Diffusion pipeline.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

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
CLIP_MAX_LENGTH = 77
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# The CLIP vocabulary: 256 byte symbols, the same with an end-of-word marker, 48,894 merges, BOS, EOS.
CLIP_NUM_MERGES = 49152 - 256 - 2


def offline_clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer of Stable Diffusion 1.x (49,408 tokens), built without network.

    open_clip_torch ships the BPE merges; the vocabulary follows from them exactly as CLIP
    defines it. Only the data file is read, so open_clip itself (and torchvision) need not import.
    """
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
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)}, merges=merges, model_max_length=CLIP_MAX_LENGTH
    )


def make_tiny_pipeline(seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> StableDiffusionPipeline:
    """A Stable Diffusion pipeline with random weights, small enough for a CPU test (32x32 images).

    Same classes and wiring as SD 1.x (AutoencoderKL, a cross-attention UNet with down, mid and
    up attention, a CLIP text encoder, the real CLIP tokenizer, SD's schedule): it proves the
    plumbing, not the pictures.
    """
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
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        sample_size=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
