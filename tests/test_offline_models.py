"""The offline pipelines have the architectures they are named after."""

from accelerate import init_empty_weights

import offline_models


def test_sd1_random_has_stable_diffusion_1s_architecture():
    with init_empty_weights():  # the configs, without a billion parameters' memory
        pipe = offline_models.make_sd1_random_pipeline()
    # CompVis/stable-diffusion-v1-4: 16 transformer blocks (a self- and a cross-attention layer each),
    # an 859.5M-parameter UNet, CLIP ViT-L/14's 123.1M-parameter text encoder, an 83.7M-parameter VAE.
    assert len(pipe.unet.attn_processors) == 2 * 16
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in pipe.text_encoder.parameters()) == 123_060_480
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_653_863
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 512
    assert pipe.vae.config.scaling_factor == 0.18215
