"""Stable Diffusion 2.x and SDXL: the offline pipelines, loading, generation equal to diffusers' own
pipelines, every edit and inversion, on tiny random-weight models of each family."""

import pytest
from accelerate import init_empty_weights
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

import prompt2prompt as p2p
import ptp_utils


@pytest.fixture(scope="module")
def sd2_pipe():
    return ptp_utils.make_sd2_tiny_pipeline()


@pytest.fixture(scope="module")
def sdxl_pipe():
    return ptp_utils.make_sdxl_tiny_pipeline()


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
