"""Stable Diffusion 2.x and SDXL: the offline pipelines, loading, generation equal to diffusers' own
pipelines, every edit and inversion, on tiny random-weight models of each family."""

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import Attention

import offline_models
import prompt2prompt as p2p
import ptp_utils

STEPS = 3
PROMPTS = ["a cat riding a bicycle", "a dog"]


@pytest.fixture(scope="module")
def sd2_pipe():
    return offline_models.make_sd2_tiny_pipeline()


@pytest.fixture(scope="module")
def sdxl_pipe():
    return offline_models.make_sdxl_tiny_pipeline()


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
        pipe = offline_models.make_sdxl_random_pipeline()
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


@pytest.mark.parametrize(
    "latent_side, sides, stored_sides, self_replaced_sides",
    [
        # SD 1.x at 512 px: the paper's 32x32 and 16x16 limits.
        (64, [64, 32, 16, 8], [32, 16, 8], [16, 8]),
        (96, [96, 48, 24, 12], [48, 24, 12], [24, 12]),  # SD 2.x at 768 px
        (128, [64, 32], [64, 32], [32]),  # SDXL at 1024 px: no attention at the latent's own size
        (16, [16, 8], [16, 8], [16, 8]),  # Shapes World: maps within the paper's 32x32 and 16x16 qualify
    ],
)
def test_resolution_rules_follow_the_latent(tokenizer, latent_side, sides, stored_sides, self_replaced_sides):
    store = p2p.AttentionStore()
    edit = p2p.AttentionReplace(PROMPTS[:1] * 2, STEPS, 0.0, 1.0, tokenizer=tokenizer)
    for controller in (store, edit):
        controller.latent_size = (latent_side, latent_side)
    assert [side for side in sides if store.needs_attention(True, "up", side**2)] == stored_sides
    assert [side for side in sides if edit.needs_attention(False, "up", side**2)] == self_replaced_sides


def make_edit(kind, pipe, prompts, cross=0.8, self_=0.4, local_blend=None, scale=1.0):
    settings = dict(
        prompts=prompts,
        num_steps=STEPS,
        cross_replace_steps=cross,
        self_replace_steps=self_,
        local_blend=local_blend,
        tokenizer=pipe.tokenizer,
    )
    if kind == "reweight":
        equalizer = p2p.get_equalizer(prompts[1], "cat", [scale], pipe.tokenizer)
        return p2p.AttentionReweight(equalizer=equalizer, **settings)
    return {"replace": p2p.AttentionReplace, "refine": p2p.AttentionRefine}[kind](**settings)


EDIT_KINDS = ["replace", "refine", "reweight", "blend"]


def edit_controller(kind, pipe, prompts, cross=0.8, self_=0.4, scale=1.0):
    if kind == "blend":
        blend = p2p.LocalBlend(prompts, ["cat", "cat"], pipe.tokenizer)
        return make_edit("replace", pipe, prompts, cross, self_, local_blend=blend)
    return make_edit(kind, pipe, prompts, cross, self_, scale=scale)


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_identical_prompts_give_identical_images(pipe, kind):
    prompts = [PROMPTS[0]] * 2
    images = generate(pipe, prompts, edit_controller(kind, pipe, prompts))
    assert np.array_equal(images[0], images[1])
    assert_images_close(images[:1], generate(pipe, prompts[:1]))


@pytest.mark.parametrize("kind", ["replace", "refine", "reweight"])
def test_zero_injection_steps_is_plain_generation(pipe, kind):
    prompts = (
        [PROMPTS[0], "a cat riding a motorcycle"]
        if kind != "refine"
        else [PROMPTS[0], "a big cat riding a bicycle"]
    )
    # Reweighting scales the injected maps: none injected, none scaled.
    controller = edit_controller(kind, pipe, prompts, cross=0.0, self_=0.0, scale=3.0)
    assert_images_close(generate(pipe, prompts, controller), generate(pipe, prompts))


def test_controller_counts_every_layer_and_step_and_processors_are_restored(pipe):
    original = pipe.unet.attn_processors
    controller = edit_controller("blend", pipe, [PROMPTS[0], "a cat riding a motorcycle"])
    generate(pipe, controller.prompts, controller, low_resource=True)
    assert controller.num_att_layers == len(original)
    assert (controller.cur_step, controller.cur_att_layer) == (STEPS, 0)
    assert pipe.unet.attn_processors == original


@pytest.mark.parametrize(
    "family, num_layers, num_self_replaced",
    [
        ("sd2", 2 * 10, 4),  # 3 + 1 + 6 transformer blocks; 4x4: down 1, mid 1, up 2
        ("sdxl", 2 * 11, 8),  # 3 + 2 + 6 transformer blocks; 4x4: down 2, mid 2, up 4
    ],
)
def test_self_attention_is_replaced_at_the_coarse_levels(
    request, monkeypatch, family, num_layers, num_self_replaced
):
    # The tiny models' maps all fit the paper's 16x16: without that floor, the relative rule alone.
    monkeypatch.setattr(p2p, "SELF_REPLACE_MIN_SIDE", 1)
    pipe = request.getfixturevalue(f"{family}_pipe")
    calls = []
    original = Attention.get_attention_scores

    def counting(self, query, key, mask=None):
        calls.append(key.shape[1] == 77)
        return original(self, query, key, mask)

    monkeypatch.setattr(Attention, "get_attention_scores", counting)
    prompts = [PROMPTS[0], "a cat riding a motorcycle"]
    controller = make_edit("replace", pipe, prompts, cross=0.0, self_=1 / STEPS)  # self-attention, step 0
    generate(pipe, prompts, controller)
    assert controller.num_att_layers == num_layers
    assert calls == [False] * num_self_replaced


def test_attention_store_and_figure_at_half_the_latents_side(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(p2p, "STORED_MAPS_MIN_SIDE", 1)  # the relative rule alone, as in the test above
    store = p2p.AttentionStore()
    images = generate(pipe, PROMPTS[:1], store)
    maps = ptp_utils.aggregate_attention(store, PROMPTS[:1], 8, ["down", "mid", "up"], True, 0)
    torch.testing.assert_close(maps.sum(-1), torch.ones(8, 8))
    ptp_utils.show_cross_attention(
        store, PROMPTS[:1], pipe.tokenizer, 4, ["down", "up"], image=images[0], save_path=tmp_path / "a.png"
    )
    with pytest.raises(ValueError, match=r"stored resolutions: \[4, 8\]"):
        ptp_utils.aggregate_attention(store, PROMPTS[:1], 16, ["down"], True, 0)


def test_null_text_and_negative_prompt_inversion_run(pipe):
    picture = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    prompt = PROMPTS[0]
    x_t, null_embeddings = p2p.NullInversion(pipe, STEPS).invert(picture, prompt, num_inner_steps=2)
    with torch.no_grad():
        context, _ = p2p.encode_conditions(pipe, [prompt], None)
    assert len(null_embeddings) == STEPS and null_embeddings[0].shape == context[:1].shape
    assert not torch.equal(null_embeddings[0], context[:1].float())  # optimised
    x_t_negative, negative_embeddings = p2p.negative_prompt_inversion(pipe, picture, prompt, STEPS)
    torch.testing.assert_close(x_t_negative, x_t)  # the same DDIM inversion
    for uncond_embeddings in (null_embeddings, negative_embeddings):
        prompts = [prompt, "a cat riding a motorcycle"]
        controller = make_edit("replace", pipe, prompts)
        images, _ = p2p.text2image_ldm(
            pipe, prompts, controller, STEPS, latent=x_t, uncond_embeddings=uncond_embeddings
        )
        assert images.shape == (2, 32, 32, 3)


@pytest.mark.parametrize(
    "family, folder_name, pipeline_class",
    [
        # Folder names that say the other family: the class comes from model_index.json alone.
        ("sd2", "stable-diffusion-xl-base-1.0", StableDiffusionPipeline),
        ("sdxl", "stable-diffusion-v1-5", StableDiffusionXLPipeline),
    ],
)
def test_a_saved_pipeline_loads_by_path_as_a_hub_id_does(
    request, monkeypatch, tmp_path, family, folder_name, pipeline_class
):
    pipe = request.getfixturevalue(f"{family}_pipe")
    pipe.save_pretrained(tmp_path / folder_name)
    read_configs = []
    load_config = DiffusionPipeline.load_config

    def spying(model_id, *args, **kwargs):
        read_configs.append(str(model_id))
        return load_config(model_id, *args, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "load_config", spying)
    loaded = p2p.load_model(str(tmp_path / folder_name), device="cpu")
    with pytest.raises(OSError, match="not in the Hugging Face cache"):
        p2p.load_model("no-such-user/no-such-model", device="cpu")
    # One path for both: the pipeline's model_index.json, read by diffusers for a folder or a hub id.
    assert list(dict.fromkeys(read_configs)) == [str(tmp_path / folder_name), "no-such-user/no-such-model"]
    assert type(loaded) is pipeline_class
    assert loaded.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    assert loaded.tokenizer.pad_token == pipe.tokenizer.pad_token
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            loaded_weights = getattr(loaded, name).state_dict()
            for key, weight in component.state_dict().items():
                assert torch.equal(loaded_weights[key], weight), (name, key)
    loaded.set_progress_bar_config(disable=True)
    # The same weights; a CPU's matrix kernels may still round differently at another memory alignment.
    assert_images_close(generate(loaded, PROMPTS), generate(pipe, PROMPTS))


def test_a_pipeline_of_another_class_is_refused_by_name(tmp_path):
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1"}'
    )
    with pytest.raises(OSError, match="is a FluxPipeline; the package runs StableDiffusionPipeline and"):
        p2p.load_model(str(tmp_path), device="cpu")


def test_a_controller_without_the_latents_size_says_so():
    controller = p2p.AttentionStore()
    with pytest.raises(ValueError, match="set controller.latent_size"):
        controller.needs_attention(True, "up", 64)
