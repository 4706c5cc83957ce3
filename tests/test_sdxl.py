"""Stable Diffusion 2.x and SDXL: the offline pipelines, loading, generation equal to diffusers' own
pipelines, every edit and inversion, on tiny random-weight models of each family."""

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import prompt2prompt as p2p
import ptp_utils

STEPS = 3
PROMPTS = ["a cat riding a bicycle", "a dog"]


@pytest.fixture(scope="module")
def sd2_pipe():
    return ptp_utils.make_sd2_tiny_pipeline()


@pytest.fixture(scope="module")
def sdxl_pipe():
    return ptp_utils.make_sdxl_tiny_pipeline()


@pytest.fixture(params=["sd2", "sdxl"])
def pipe(request):
    """Each family's tiny pipeline (shared by the module's tests: they leave it as they found it)."""
    return request.getfixturevalue(f"{request.param}_pipe")


def noise(seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def generate(pipe, prompts, controller=None, **kwargs):
    controller = controller or p2p.EmptyControl()
    images, _ = p2p.text2image_ldm(pipe, prompts, controller, STEPS, latent=noise(), **kwargs)
    return images


def assert_images_close(a, b, max_levels=1):
    """Equal up to float rounding of different batch shapes: at most `max_levels` of 255 apart."""
    assert a.shape == b.shape and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= max_levels


def test_sd2_tiny_has_sd2s_distinctive_settings(sd2_pipe):
    assert type(sd2_pipe) is StableDiffusionPipeline
    assert sd2_pipe.scheduler.config.prediction_type == "v_prediction"
    assert sd2_pipe.unet.config.use_linear_projection
    assert isinstance(sd2_pipe.unet.config.attention_head_dim, (tuple, list))
    # OpenCLIP's tokenizer pads with "!", id 0, as SD 2.x's tokenizer files say.
    assert sd2_pipe.tokenizer.pad_token == "!" and sd2_pipe.tokenizer.pad_token_id == 0
    ids = ptp_utils.tokenize_prompts(sd2_pipe.tokenizer, ["a cat"])[0].tolist()
    assert ids[3:5] == [sd2_pipe.tokenizer.eos_token_id, 0]


def test_sdxl_tiny_has_two_text_encoders_and_time_ids(sdxl_pipe):
    assert type(sdxl_pipe) is StableDiffusionXLPipeline
    assert sdxl_pipe.tokenizer.pad_token == "<|endoftext|>" and sdxl_pipe.tokenizer_2.pad_token == "!"
    unet = sdxl_pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    hidden_sizes = sdxl_pipe.text_encoder.config.hidden_size + sdxl_pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == hidden_sizes
    num_time_ids = 6  # original size, crop corner, target size
    assert unet.projection_class_embeddings_input_dim == (
        num_time_ids * unet.addition_time_embed_dim + sdxl_pipe.text_encoder_2.config.projection_dim
    )


def test_sdxl_random_has_sdxl_bases_architecture():
    with init_empty_weights():  # the configs, without 3.5 billion parameters' memory
        pipe = ptp_utils.make_sdxl_random_pipeline()
    # SDXL base: 70 transformer blocks (a self- and a cross-attention layer each), a 2.57B-parameter
    # UNet, OpenCLIP ViT-bigG's 694.7M-parameter text encoder with projection.
    assert len(pipe.unet.attn_processors) == 2 * 70
    assert sum(p.numel() for p in pipe.unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in pipe.text_encoder_2.parameters()) == 694_659_840
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 1024


@pytest.mark.parametrize(
    "name, pipeline_class",
    [("sd2-tiny", StableDiffusionPipeline), ("sdxl-tiny", StableDiffusionXLPipeline)],
)
def test_offline_names_load_their_family(name, pipeline_class):
    assert type(p2p.load_model(name, device="cpu")) is pipeline_class


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_empty_control_equals_the_diffusers_pipeline(pipe, negative_prompt):
    # SD 2.x: v-prediction through StableDiffusionPipeline; SDXL: two encoders, pooled embedding and
    # time ids through StableDiffusionXLPipeline; no negative prompt means SDXL's zeros.
    negative_prompts = None if negative_prompt is None else [negative_prompt] * len(PROMPTS)
    stock = pipe(
        PROMPTS,
        negative_prompt=negative_prompts,
        num_inference_steps=STEPS,
        guidance_scale=ptp_utils.GUIDANCE_SCALE,
        latents=noise().expand(len(PROMPTS), -1, -1, -1),
        output_type="np",
    ).images
    ours = generate(pipe, PROMPTS, negative_prompt=negative_prompt)
    assert_images_close(ours, (stock * 255).round().astype(np.uint8))


def test_low_resource_gives_the_same_images(pipe):
    assert_images_close(generate(pipe, PROMPTS, low_resource=True), generate(pipe, PROMPTS))


def test_sdxl_uncond_embeddings_replace_the_negative_text_embeddings(sdxl_pipe):
    negative = "blurry"
    with torch.no_grad():
        negative_embeddings = p2p.encode_text(sdxl_pipe, [negative])
    # The negative prompt's own hidden states at every step: its images (the pooled embedding is its own).
    replaced = generate(
        sdxl_pipe, PROMPTS, negative_prompt=negative, uncond_embeddings=[negative_embeddings] * STEPS
    )
    assert np.array_equal(replaced, generate(sdxl_pipe, PROMPTS, negative_prompt=negative))
    other = [torch.randn_like(negative_embeddings)] * STEPS
    assert not np.array_equal(generate(sdxl_pipe, PROMPTS, uncond_embeddings=other), replaced)


def test_sdxl_prompt_over_77_tokens_is_refused(sdxl_pipe):
    with pytest.raises(ValueError, match="more than the 77"):
        generate(sdxl_pipe, ["a cat " * 40, "a dog"])
    with pytest.raises(ValueError, match="more than the 77"):
        generate(sdxl_pipe, PROMPTS, negative_prompt="blurry " * 80)
