"""Prompt-to-Prompt on a tiny random-weight Stable Diffusion pipeline: equalities and invariants, offline."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from diffusers.models.attention_processor import Attention
from PIL import Image

import prompt2prompt as p2p
import ptp_utils

STEPS = 4
SOURCE, TARGET = "a cat riding a bicycle", "a cat riding a motorcycle"


def noise(pipe, seed=0):
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def edit(pipe, prompts, cross=0.8, self_=0.4, local_blend=None, **kwargs):
    controller = p2p.AttentionReplace(
        prompts, STEPS, cross, self_, local_blend=local_blend, tokenizer=pipe.tokenizer
    )
    images, _ = p2p.text2image_ldm(pipe, prompts, controller, STEPS, latent=noise(pipe), **kwargs)
    return images


def plain(pipe, prompts, **kwargs):
    images, _ = p2p.text2image_ldm(pipe, prompts, p2p.EmptyControl(), STEPS, latent=noise(pipe), **kwargs)
    return images


def assert_images_close(a, b, max_levels=1):
    """Equal up to float rounding of different batch shapes: at most `max_levels` of 255 apart."""
    assert a.shape == b.shape and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= max_levels


@pytest.mark.parametrize("scheduler_class", [EulerDiscreteScheduler, DPMSolverMultistepScheduler, None])
def test_empty_control_equals_the_diffusers_pipeline(tiny_pipe, scheduler_class):
    if scheduler_class is not None:
        tiny_pipe.scheduler = scheduler_class.from_config(tiny_pipe.scheduler.config)
    prompts = [SOURCE, TARGET]
    ours, x_t = p2p.text2image_ldm(tiny_pipe, prompts, p2p.EmptyControl(), STEPS, latent=noise(tiny_pipe))
    theirs = tiny_pipe(
        prompts,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        latents=x_t.expand(2, -1, -1, -1),
        output_type="np",
    ).images
    np.testing.assert_allclose(ours / 255.0, theirs, atol=1 / 255 + 1e-6)


def test_ancestral_scheduler_uses_the_generator_like_the_pipeline(tiny_pipe):
    tiny_pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    x_t = noise(tiny_pipe)
    ours, _ = p2p.text2image_ldm(
        tiny_pipe, [SOURCE], p2p.EmptyControl(), STEPS, latent=x_t, generator=torch.Generator().manual_seed(3)
    )
    theirs = tiny_pipe(
        [SOURCE],
        num_inference_steps=STEPS,
        latents=x_t,
        output_type="np",
        generator=torch.Generator().manual_seed(3),
    ).images
    np.testing.assert_allclose(ours / 255.0, theirs, atol=1 / 255 + 1e-6)


def test_shared_noise_comes_from_the_generator(tiny_pipe):
    images_a, x_t_a = p2p.text2image_ldm(
        tiny_pipe, [SOURCE], p2p.EmptyControl(), STEPS, generator=torch.Generator().manual_seed(5)
    )
    images_b, x_t_b = p2p.text2image_ldm(tiny_pipe, [SOURCE], p2p.EmptyControl(), STEPS, latent=x_t_a)
    assert x_t_a.shape == (1, 4, 16, 16)
    assert torch.equal(x_t_a, x_t_b)
    assert np.array_equal(images_a, images_b)


def test_identical_prompts_give_identical_images(tiny_pipe):
    images = edit(tiny_pipe, [SOURCE, SOURCE])
    assert np.array_equal(images[0], images[1])


def test_edit_changes_the_target_and_keeps_the_source(tiny_pipe):
    edited = edit(tiny_pipe, [SOURCE, TARGET])
    alone = plain(tiny_pipe, [SOURCE])
    assert_images_close(edited[0], alone[0])
    assert not np.array_equal(edited[1], plain(tiny_pipe, [TARGET])[0])


def test_zero_replace_steps_is_plain_generation(tiny_pipe):
    edited = edit(tiny_pipe, [SOURCE, TARGET], cross=0.0, self_=0.0)
    assert_images_close(edited[1], plain(tiny_pipe, [TARGET])[0])


def test_low_resource_gives_the_same_images(tiny_pipe):
    assert_images_close(
        edit(tiny_pipe, [SOURCE, TARGET], low_resource=True), edit(tiny_pipe, [SOURCE, TARGET])
    )


class RecordingReplace(p2p.AttentionReplace):
    """Records the cross-attention of every call: as computed, and as the layer then used it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def forward(self, attn, is_cross, place_in_unet):
        before = attn.clone()
        after = super().forward(attn, is_cross, place_in_unet)
        if is_cross:
            self.records.append((self.cur_step, before, after.clone()))
        return after


def test_full_cross_replacement_maps_the_source_attention_at_every_layer_and_step(tiny_pipe):
    prompts = ["A lion eating", "A hippopotamus eating"]
    controller = RecordingReplace(prompts, STEPS, 1.0, 0.0, tokenizer=tiny_pipe.tokenizer)
    p2p.text2image_ldm(tiny_pipe, prompts, controller, STEPS, latent=noise(tiny_pipe))
    num_cross_layers = controller.num_att_layers // 2
    assert [step for step, _, _ in controller.records] == [
        s for s in range(STEPS) for _ in range(num_cross_layers)
    ]
    mapper = controller.mapper[0]
    for _, before, after in controller.records:
        source, target = after.reshape(2, -1, *after.shape[1:])
        source_before = before.reshape(2, -1, *before.shape[1:])[0]
        torch.testing.assert_close(source, source_before)
        # hippo, potam and us each take a third of lion's attention; eating keeps eating's.
        torch.testing.assert_close(target[..., 2], source_before[..., 2] / 3)
        torch.testing.assert_close(target[..., 4], source_before[..., 2] / 3)
        torch.testing.assert_close(target[..., 5], source_before[..., 3])
        torch.testing.assert_close(target, source_before @ mapper)


def test_attention_is_materialised_only_where_read(tiny_pipe, monkeypatch):
    calls = []
    original = Attention.get_attention_scores

    def counting(self, query, key, mask=None):
        calls.append(key.shape[1] == 77)
        return original(self, query, key, mask)

    monkeypatch.setattr(Attention, "get_attention_scores", counting)
    plain(tiny_pipe, [SOURCE, TARGET])
    assert calls == []
    edit(tiny_pipe, [SOURCE, TARGET], cross=0.5, self_=0.25)
    layers_per_kind = len(tiny_pipe.unet.attn_processors) // 2
    # cross-attention in the first 2 of 4 steps, self-attention (all layers <= 16x16 here) in the first 1.
    assert calls.count(True) == 2 * layers_per_kind
    assert calls.count(False) == 1 * layers_per_kind


def test_per_layer_decisions_never_read_the_device(tokenizer):
    """On a GPU each read of a device tensor in the layer loop stalls the CPU until the GPU is idle.
    A meta tensor refuses every read, so deciding each layer of each step must succeed on one."""
    cross = {"default_": 0.5, "motorcycle": (0.25, 0.75)}
    controller = p2p.AttentionReplace(
        [SOURCE, TARGET], STEPS, cross, 0.25, tokenizer=tokenizer, device="meta"
    )
    decisions = []
    for controller.cur_step in range(STEPS):
        decisions.append([controller.needs_attention(is_cross, "down", 64) for is_cross in (True, False)])
    # Cross-attention: all words in steps 0-1, "motorcycle" in steps 1-2; self-attention: step 0.
    assert decisions == [[True, True], [True, False], [True, False], [False, False]]


def test_processors_are_restored_after_a_run_and_after_an_error(tiny_pipe):
    original = tiny_pipe.unet.attn_processors
    edit(tiny_pipe, [SOURCE, TARGET])
    assert tiny_pipe.unet.attn_processors == original

    class Failing(p2p.AttentionStore):
        def forward(self, attn, is_cross, place_in_unet):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        p2p.text2image_ldm(tiny_pipe, [SOURCE], Failing(), STEPS, latent=noise(tiny_pipe))
    assert tiny_pipe.unet.attn_processors == original


def test_register_reports_places_and_kinds(tiny_pipe):
    controller = p2p.EmptyControl()
    with ptp_utils.register_attention_control(tiny_pipe, controller):
        processors = tiny_pipe.unet.attn_processors
        assert controller.num_att_layers == len(processors) == 14  # down 2x2, mid 2, up 2x2x2
        places = {(p.place_in_unet, p.is_cross) for p in processors.values()}
        assert places == {(place, kind) for place in ("down", "mid", "up") for kind in (True, False)}
        assert all(p.is_cross == name.endswith("attn2.processor") for name, p in processors.items())


def test_local_blend_outside_the_words_keeps_the_source(tiny_pipe):
    prompts = [SOURCE, TARGET]
    nothing = p2p.LocalBlend(prompts, ["bicycle", "motorcycle"], tiny_pipe.tokenizer, threshold=1.1)
    blended = edit(tiny_pipe, prompts, local_blend=nothing)
    assert np.array_equal(blended[0], blended[1])
    everything = p2p.LocalBlend(prompts, ["bicycle", "motorcycle"], tiny_pipe.tokenizer, threshold=-1.0)
    assert_images_close(edit(tiny_pipe, prompts, local_blend=everything), edit(tiny_pipe, prompts))


def test_attention_store_and_cross_attention_figure(tiny_pipe, tmp_path):
    store = p2p.AttentionStore()
    images, _ = p2p.text2image_ldm(tiny_pipe, [SOURCE], store, STEPS, latent=noise(tiny_pipe))
    maps = ptp_utils.aggregate_attention(store, [SOURCE], 8, ["down", "mid", "up"], True, 0)
    assert maps.shape == (8, 8, 77)
    # Each query's attention over the 77 tokens is a distribution, and so is its average.
    torch.testing.assert_close(maps.sum(-1), torch.ones(8, 8))
    path = tmp_path / "attention.png"
    ptp_utils.show_cross_attention(
        store, [SOURCE], tiny_pipe.tokenizer, 8, ["down", "up"], image=images[0], save_path=path
    )
    num_tokens = len(tiny_pipe.tokenizer.encode(SOURCE))
    width, height = Image.open(path).size
    assert width == num_tokens * 32 and height > 32  # one 32 px tile per token
    with pytest.raises(ValueError, match="stored resolutions"):
        ptp_utils.aggregate_attention(store, [SOURCE], 5, ["down"], True, 0)


def test_view_images_grid_and_caption(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    grid = ptp_utils.view_images([image] * 5, num_rows=2, offset_ratio=0.1, save_path=tmp_path / "grid.png")
    assert grid.size == (3 * 30 + 2 * 2, 2 * 20 + 2)
    assert Image.open(tmp_path / "grid.png").size == grid.size
    captioned = ptp_utils.text_under_image(image, "a cat")
    assert captioned.shape[1] == 30 and captioned.shape[0] > 20
    assert np.array_equal(captioned[:20], image)


def test_time_words_alpha(tokenizer):
    prompts = ["A lion eating", "A hippopotamus eating"]
    alpha = ptp_utils.get_time_words_attention_alpha(prompts, 10, 0.5, tokenizer)
    assert alpha.shape == (11, 1, 1, 1, 77)
    assert alpha[:5].eq(1).all() and alpha[5:].eq(0).all()
    alpha = ptp_utils.get_time_words_attention_alpha(
        prompts, 10, {"default_": (0.2, 1.0), "hippopotamus": 0.3}, tokenizer
    ).flatten(1)
    assert alpha[:3, 2:5].eq(1).all() and alpha[3:, 2:5].eq(0).all()
    assert alpha[:2, 5].eq(0).all() and alpha[2:10, 5].eq(1).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=["a cat", "a big dog"]), "same number of words"),
        (dict(num_steps=0), "positive number"),
        (dict(cross_replace_steps=1.5), r"\[0, 1\]"),
        (dict(self_replace_steps=(0.6, 0.2)), "start <= end"),
        (dict(cross_replace_steps={"dog": 0.5}), "'dog', which is not in the target"),
    ],
)
def test_bad_edit_settings_raise(tokenizer, kwargs, message):
    settings = dict(
        prompts=[SOURCE, TARGET], num_steps=STEPS, cross_replace_steps=0.8, self_replace_steps=0.4
    )
    with pytest.raises(ValueError, match=message):
        p2p.AttentionReplace(**{**settings, **kwargs}, tokenizer=tokenizer)


def test_bad_generation_settings_raise(tiny_pipe):
    with pytest.raises(ValueError, match="Shorten it"):
        p2p.text2image_ldm(tiny_pipe, ["a cat " * 40], p2p.EmptyControl(), STEPS)
    with pytest.raises(ValueError, match="positive number"):
        p2p.text2image_ldm(tiny_pipe, [SOURCE], p2p.EmptyControl(), 0)
    controller = p2p.AttentionReplace([SOURCE, TARGET], STEPS + 1, 0.8, 0.4, tokenizer=tiny_pipe.tokenizer)
    with pytest.raises(ValueError, match=f"num_steps={STEPS}"):
        p2p.text2image_ldm(tiny_pipe, [SOURCE, TARGET], controller, STEPS)


def test_negative_prompt_replaces_the_unconditional_branch(tiny_pipe):
    x_t = noise(tiny_pipe)
    ours, _ = p2p.text2image_ldm(
        tiny_pipe, [SOURCE], p2p.EmptyControl(), STEPS, latent=x_t, negative_prompt="blurry"
    )
    theirs = tiny_pipe(
        [SOURCE], num_inference_steps=STEPS, latents=x_t, negative_prompt=["blurry"], output_type="np"
    ).images
    np.testing.assert_allclose(ours / 255.0, theirs, atol=1 / 255 + 1e-6)
    assert not np.array_equal(ours, plain(tiny_pipe, [SOURCE]))


def test_command_line_writes_the_side_by_side_edit(tmp_path):
    out = tmp_path / "edit.png"
    p2p.main(["--model", "tiny", "--steps", "3", "--out", str(out), "--source", SOURCE, "--target", TARGET])
    width, height = Image.open(out).size
    assert height > 32  # the images and the band with the prompts
    assert width == 2 * 32 + int(height * 0.02)  # two 32 px images and view_images' default gap
    with pytest.raises(SystemExit, match="same number of words"):
        p2p.main(["--model", "tiny", "--steps", "3", "--out", str(out), "--target", "a dog"])


@pytest.mark.parametrize("value", ["0.2,0.5,0.8", "most"])
def test_replace_steps_other_than_a_fraction_or_a_range_are_refused(value, capsys):
    with pytest.raises(SystemExit):
        p2p.main(["--model", "tiny", "--cross-replace-steps", value])
    assert 'give a fraction such as "0.8" or a range "0.2,0.8"' in capsys.readouterr().err


def test_unreachable_model_says_how_to_proceed_offline():
    with pytest.raises(OSError, match="(?s)needs internet.*offline models: 'tiny'"):
        p2p.load_model("no-such-user/no-such-model", device="cpu")


def test_shapes_model_without_its_folder_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.setattr(ptp_utils, "SHAPES_MODEL_DIR", tmp_path / "shapes")
    with pytest.raises(OSError, match="shapes_train.py"):
        p2p.load_model("shapes", device="cpu")


def test_shapes_model_loads_from_its_folder(tmp_path, monkeypatch, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "shapes")
    monkeypatch.setattr(ptp_utils, "SHAPES_MODEL_DIR", tmp_path / "shapes")
    model = p2p.load_model("shapes", device="cpu")
    for key, weight in tiny_pipe.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[key], weight), key
