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


def make_controller(kind, prompts, cross, self_, tokenizer, scale=1.0, local_blend=None):
    """An edit of `prompts`: replace, refine, reweight (the target's word "cat" scaled by `scale`),
    or reweight on top of refine."""
    settings = dict(local_blend=local_blend, tokenizer=tokenizer)
    if kind == "replace":
        return p2p.AttentionReplace(prompts, STEPS, cross, self_, **settings)
    if kind == "refine":
        return p2p.AttentionRefine(prompts, STEPS, cross, self_, **settings)
    equalizer = p2p.get_equalizer(prompts[1], "cat", [scale], tokenizer)
    inner = (
        p2p.AttentionRefine(prompts, STEPS, cross, self_, tokenizer=tokenizer) if "refine" in kind else None
    )
    return p2p.AttentionReweight(prompts, STEPS, cross, self_, equalizer, controller=inner, **settings)


def run(pipe, prompts, controller, **kwargs):
    images, _ = p2p.text2image_ldm(pipe, prompts, controller, STEPS, latent=noise(pipe), **kwargs)
    return images


EDIT_KINDS = ["replace", "refine", "reweight", "reweight+refine"]


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_identical_prompts_give_identical_images(tiny_pipe, kind):
    images = run(
        tiny_pipe, [SOURCE, SOURCE], make_controller(kind, [SOURCE, SOURCE], 0.8, 0.4, tiny_pipe.tokenizer)
    )
    assert np.array_equal(images[0], images[1])


def test_edit_changes_the_target_and_keeps_the_source(tiny_pipe):
    edited = edit(tiny_pipe, [SOURCE, TARGET])
    alone = plain(tiny_pipe, [SOURCE])
    assert_images_close(edited[0], alone[0])
    assert not np.array_equal(edited[1], plain(tiny_pipe, [TARGET])[0])


# A refinement's target has one more word; the reweightings scale "cat" by 3.
EDIT_TARGETS = {"replace": TARGET, "refine": "a fluffy cat riding a bicycle", "reweight": SOURCE}
EDIT_TARGETS["reweight+refine"] = EDIT_TARGETS["refine"]


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_zero_replace_steps_is_plain_generation(tiny_pipe, kind):
    prompts = [SOURCE, EDIT_TARGETS[kind]]
    edited = run(tiny_pipe, prompts, make_controller(kind, prompts, 0.0, 0.0, tiny_pipe.tokenizer, scale=3.0))
    assert_images_close(edited[1], plain(tiny_pipe, prompts[1:])[0])


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_full_injection_moves_the_target(tiny_pipe, kind):
    prompts = [SOURCE, EDIT_TARGETS[kind]]
    edited = run(tiny_pipe, prompts, make_controller(kind, prompts, 1.0, 0.0, tiny_pipe.tokenizer, scale=3.0))
    assert not np.array_equal(edited[1], plain(tiny_pipe, prompts[1:])[0])


def test_reweighting_by_ones_is_no_reweighting(tiny_pipe):
    images = run(
        tiny_pipe,
        [SOURCE, SOURCE],
        make_controller("reweight", [SOURCE, SOURCE], 0.8, 0.4, tiny_pipe.tokenizer),
    )
    alone = plain(tiny_pipe, [SOURCE])[0]
    assert_images_close(images[0], alone)
    assert_images_close(images[1], alone)


@pytest.mark.parametrize("inner", [p2p.AttentionReplace, p2p.AttentionRefine])
def test_reweighting_by_ones_on_top_of_an_edit_is_the_edit(tiny_pipe, inner):
    prompts = [SOURCE, TARGET] if inner is p2p.AttentionReplace else [SOURCE, "a fluffy cat riding a bicycle"]
    settings = dict(
        num_steps=STEPS, cross_replace_steps=0.8, self_replace_steps=0.4, tokenizer=tiny_pipe.tokenizer
    )
    reweight = p2p.AttentionReweight(
        prompts, equalizer=torch.ones(1, 77), controller=inner(prompts, **settings), **settings
    )
    assert np.array_equal(
        run(tiny_pipe, prompts, reweight), run(tiny_pipe, prompts, inner(prompts, **settings))
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_edits_run_in_the_pipelines_dtype(tiny_pipe, dtype):
    # The community pipeline fails here with "expected scalar type Half but found Float".
    tiny_pipe.to(dtype=dtype)
    for kind in ("replace", "refine", "reweight+refine"):
        prompts = [SOURCE, EDIT_TARGETS[kind]]
        blend = p2p.LocalBlend(prompts, ["cat", "cat"], tiny_pipe.tokenizer, threshold=-1.0)
        controller = make_controller(
            kind, prompts, 1.0, 0.4, tiny_pipe.tokenizer, scale=2.0, local_blend=blend
        )
        edited = run(tiny_pipe, prompts, controller)
        assert not np.array_equal(edited[1], plain(tiny_pipe, prompts[1:])[0])
        stored = [item for items in controller.attention_store.values() for item in items]
        assert stored and all(item.dtype == dtype for item in stored)
        assert list(controller.tensors_by_dtype) == [dtype]  # the edit's tensors, converted once


def test_low_resource_gives_the_same_images(tiny_pipe):
    assert_images_close(
        edit(tiny_pipe, [SOURCE, TARGET], low_resource=True), edit(tiny_pipe, [SOURCE, TARGET])
    )


def recording(controller_class):
    """The controller class, recording the cross-attention of every call: as computed, and as the layer
    then used it."""

    class Recording(controller_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.records = []

        def forward(self, attn, is_cross, place_in_unet):
            before = attn.clone()
            after = super().forward(attn, is_cross, place_in_unet)
            if is_cross:
                self.records.append((self.cur_step, before, after.clone()))
            return after

    return Recording


def source_and_targets(controller):
    """Per recorded layer: the source's map as computed, the targets' as computed and as used."""
    for _, before, after in controller.records:
        before, after = (x.unflatten(0, (controller.batch_size, -1)) for x in (before, after))
        torch.testing.assert_close(after[0], before[0])  # the source is never edited
        yield before[0], before[1:], after[1:]


def test_full_cross_replacement_maps_the_source_attention_at_every_layer_and_step(tiny_pipe):
    prompts = ["A lion eating", "A hippopotamus eating"]
    controller = recording(p2p.AttentionReplace)(prompts, STEPS, 1.0, 0.0, tokenizer=tiny_pipe.tokenizer)
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


def test_full_refinement_takes_the_aligned_source_maps_and_keeps_the_added_ones(tiny_pipe):
    # BOS a cat riding a bicycle EOS -> BOS a fluffy cat riding a bicycle EOS
    prompts = [SOURCE, "a fluffy cat riding a bicycle"]
    controller = recording(p2p.AttentionRefine)(prompts, STEPS, 1.0, 0.0, tokenizer=tiny_pipe.tokenizer)
    p2p.text2image_ldm(tiny_pipe, prompts, controller, STEPS, latent=noise(tiny_pipe))
    assert len(controller.records) == STEPS * controller.num_att_layers // 2
    for source, (target_before,), (target,) in source_and_targets(controller):
        torch.testing.assert_close(target[..., :2], source[..., :2])  # BOS, a
        torch.testing.assert_close(target[..., 2], target_before[..., 2])  # fluffy: its own map
        torch.testing.assert_close(target[..., 3:8], source[..., 2:7])  # cat riding a bicycle EOS
        torch.testing.assert_close(target[..., 8:], source[..., 7:76])  # padding


def test_full_reweighting_scales_the_source_maps_alone_or_on_top_of_a_swap(tiny_pipe):
    equalizer = torch.ones(1, 77)
    equalizer[0, 2], equalizer[0, 5] = 3.0, 0.5  # cat, bicycle/motorcycle
    for prompts, inner in (([SOURCE, SOURCE], None), ([SOURCE, TARGET], p2p.AttentionReplace)):
        settings = dict(prompts=prompts, num_steps=STEPS, cross_replace_steps=1.0, self_replace_steps=0.0)
        controller = recording(p2p.AttentionReweight)(
            **settings,
            equalizer=equalizer,
            controller=inner and inner(**settings, tokenizer=tiny_pipe.tokenizer),
            tokenizer=tiny_pipe.tokenizer,
        )
        p2p.text2image_ldm(tiny_pipe, prompts, controller, STEPS, latent=noise(tiny_pipe))
        assert len(controller.records) == STEPS * controller.num_att_layers // 2
        for source, _, (target,) in source_and_targets(controller):
            # A one-token swap: the swap's mapper is the identity, so both take the source's maps, scaled.
            torch.testing.assert_close(target, source * equalizer[0])


def test_attention_is_materialised_only_where_read(tiny_pipe, monkeypatch):
    calls = []
    original = Attention.get_attention_scores

    def counting(self, query, key, mask=None):
        assert query.shape[0] == 2 * self.heads  # the two prompts only, never the unconditional half
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
    controller.latent_size = (32, 32)  # 64 queries: 8x8, a level where self-attention is replaced
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


@pytest.mark.parametrize("kind", ["replace", "refine"])
def test_local_blend_above_one_keeps_the_source_and_below_zero_blends_nothing(tiny_pipe, kind):
    prompts = [SOURCE, EDIT_TARGETS[kind]]

    def blended(threshold):
        blend = p2p.LocalBlend(prompts, ["cat", "cat"], tiny_pipe.tokenizer, threshold=threshold)
        return run(
            tiny_pipe,
            prompts,
            make_controller(kind, prompts, 0.8, 0.4, tiny_pipe.tokenizer, local_blend=blend),
        )

    kept = blended(1.1)
    assert np.array_equal(kept[0], kept[1])
    unblended = run(tiny_pipe, prompts, make_controller(kind, prompts, 0.8, 0.4, tiny_pipe.tokenizer))
    assert_images_close(blended(-1.0), unblended)


def test_local_blend_at_a_non_square_size(tiny_pipe):
    # 32x48 pixels: attention maps of 16x24 and 8x12 queries (the paper's code assumes 16x16).
    prompts = [SOURCE, TARGET]
    latent = torch.randn(1, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    blend = p2p.LocalBlend(prompts, ["bicycle", "motorcycle"], tiny_pipe.tokenizer, threshold=1.1)
    controller = p2p.AttentionReplace(
        prompts, STEPS, 0.8, 0.4, local_blend=blend, tokenizer=tiny_pipe.tokenizer
    )
    images, _ = p2p.text2image_ldm(tiny_pipe, prompts, controller, STEPS, latent=latent, height=32, width=48)
    assert images.shape == (2, 32, 48, 3)
    assert np.array_equal(images[0], images[1])


def test_attention_map_size_follows_the_latent():
    assert p2p.attention_map_size(24, (4, 6)) == (4, 6)
    assert p2p.attention_map_size(6, (4, 6)) == (2, 3)
    assert p2p.attention_map_size(33 * 25, (65, 49)) == (33, 25)  # odd sizes round up, as the UNet does
    with pytest.raises(ValueError, match="No attention map of a 4x6 latent has 8 queries"):
        p2p.attention_map_size(8, (4, 6))


def blend_latents(blend, maps, step=0, num_steps=1):
    """`blend` applied to a source of zeros and a target of ones, latents of 4x6, with stored cross-attention
    maps of shape (prompts, height, width, tokens) (one head); returns the target's first channel."""
    store = {"down_cross": [m.flatten(1, 2) for m in maps], "mid_cross": [], "up_cross": []}
    x_t = torch.stack([torch.zeros(4, 4, 6), torch.ones(4, 4, 6)])
    blended = blend(x_t, store, step, num_steps)
    assert torch.equal(blended[0], x_t[0])
    assert all(torch.equal(channel, blended[1, 0]) for channel in blended[1])
    return blended[1, 0]


def block(*pixels):
    """A 4x6 mask of each pixel and its neighbours (the blend's one-pixel margin)."""
    mask = torch.zeros(4, 6)
    for row, col in pixels:
        mask[max(row - 1, 0) : row + 2, max(col - 1, 0) : col + 2] = 1
    return mask


CAT, BICYCLE = 2, 5  # token positions in SOURCE


def test_local_blend_region_at_each_maps_own_resolution(tokenizer):
    blend = p2p.LocalBlend([SOURCE, SOURCE], ["cat", "cat"], tokenizer, threshold=0.5)
    fine, coarse = torch.zeros(2, 4, 6, 77), torch.zeros(2, 2, 3, 77)
    fine[:, 1, 4, CAT] = 1  # row 1, column 4 of a 4x6 map (row 2, column 2 if read as 6x4)
    torch.testing.assert_close(blend_latents(blend, [fine, coarse]), block((1, 4)))


def test_local_blend_thresholds_of_source_and_target(tokenizer):
    maps = torch.zeros(2, 4, 6, 77)
    maps[0, 1, 4, CAT], maps[0, 3, 0, CAT] = 1.0, 0.5  # the source's cat: strong, and weak
    maps[1, 0, 0, CAT] = 1.0  # the target's cat
    prompts = [SOURCE, SOURCE]
    source_only = p2p.LocalBlend(prompts, ["cat", "cat"], tokenizer, threshold=(0.4, 1.1))
    torch.testing.assert_close(blend_latents(source_only, [maps]), block((1, 4), (3, 0)))
    target_only = p2p.LocalBlend(prompts, ["cat", "cat"], tokenizer, threshold=(1.1, 0.4))
    torch.testing.assert_close(blend_latents(target_only, [maps]), block((0, 0)))
    both = p2p.LocalBlend(prompts, ["cat", "cat"], tokenizer, threshold=0.6)
    torch.testing.assert_close(blend_latents(both, [maps]), block((1, 4), (0, 0)))


def test_local_blend_keeps_the_substruct_words_out(tokenizer):
    maps = torch.zeros(2, 4, 6, 77)
    maps[:, 1, 4, CAT] = 1
    maps[:, 1, 3, BICYCLE] = maps[:, 0, 5, BICYCLE] = 1
    blend = p2p.LocalBlend(
        [SOURCE, SOURCE], ["cat", "cat"], tokenizer, substruct_words=["bicycle", "bicycle"]
    )
    expected = block((1, 4))
    expected[1, 3] = expected[0, 5] = 0  # no margin around the region kept out
    torch.testing.assert_close(blend_latents(blend, [maps]), expected)


def test_local_blend_starts_at_its_share_of_the_steps(tokenizer):
    maps = torch.zeros(2, 4, 6, 77)
    maps[:, 1, 4, CAT] = 1
    blend = p2p.LocalBlend([SOURCE, SOURCE], ["cat", "cat"], tokenizer, start_blend=0.5)
    torch.testing.assert_close(blend_latents(blend, [maps], step=1, num_steps=4), torch.ones(4, 6))
    assert blend.mask is None
    torch.testing.assert_close(blend_latents(blend, [maps], step=2, num_steps=4), block((1, 4)))
    assert blend.mask.shape == (1, 1, 4, 6)
    assert torch.equal(blend.mask[0, 0], block((1, 4)).bool())  # the region the target kept its own


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(words=["cat", "dog"]), "The word 'dog' is not in 'a cat riding a bicycle'"),
        (dict(words=["cat"]), "one entry of words per prompt"),
        (dict(substruct_words=["cat", ["bicycle", "car"]]), "The word 'car' is not in"),
        (dict(threshold=(0.1, 0.2, 0.3)), "a number or a .source, target. pair"),
        (dict(start_blend=1.5), r"start_blend is a fraction of the steps in \[0, 1\]"),
    ],
)
def test_bad_local_blend_settings_raise(tokenizer, kwargs, message):
    with pytest.raises(ValueError, match=message):
        p2p.LocalBlend(
            **{"prompts": [SOURCE, SOURCE], "words": ["cat", "cat"], "tokenizer": tokenizer, **kwargs}
        )


def test_equalizer_scales_every_token_of_the_selected_words(tokenizer):
    text = "A hippopotamus eating a cat"  # BOS a hippo potam us eating a cat EOS
    # Several words, one value per row: row i scales all of them by values[i].
    equalizer = p2p.get_equalizer(text, ("hippopotamus", 4), (2.0, 0.5), tokenizer)
    expected = torch.ones(2, 77)
    expected[0, [2, 3, 4, 7]], expected[1, [2, 3, 4, 7]] = 2.0, 0.5
    torch.testing.assert_close(equalizer, expected)
    expected = torch.ones(1, 77)
    expected[0, [1, 6]] = 3.0  # "a": every occurrence
    torch.testing.assert_close(p2p.get_equalizer(text, "a", [3.0], tokenizer), expected)
    with pytest.raises(ValueError, match="The word 'dog' is not in 'A hippopotamus eating a cat'"):
        p2p.get_equalizer(text, ["cat", "dog"], [2.0], tokenizer)
    with pytest.raises(ValueError, match="Word index 5 is out of range: 'A hippopotamus eating a cat' has 5"):
        p2p.get_equalizer(text, 5, [2.0], tokenizer)


def test_bad_reweight_settings_raise(tokenizer):
    settings = dict(num_steps=STEPS, cross_replace_steps=0.8, self_replace_steps=0.4, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"equalizer must have shape .* = \(1, 77\), got \(2, 77\)"):
        p2p.AttentionReweight([SOURCE, TARGET], equalizer=torch.ones(2, 77), **settings)
    with pytest.raises(ValueError, match=r"got \(77,\)"):
        p2p.AttentionReweight([SOURCE, TARGET], equalizer=torch.ones(77), **settings)
    other = p2p.AttentionReplace([SOURCE, "a dog riding a bicycle"], **settings)
    with pytest.raises(ValueError, match="built on the same prompts"):
        p2p.AttentionReweight([SOURCE, TARGET], equalizer=torch.ones(1, 77), controller=other, **settings)


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


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_cross_replace_steps_naming_no_target_word_raise(tokenizer, kind):
    prompts = [SOURCE, EDIT_TARGETS[kind]]
    with pytest.raises(ValueError, match="'motorbike', which is not in the target"):
        make_controller(kind, prompts, {"default_": 0.8, "motorbike": (0.0, 0.4)}, 0.4, tokenizer)


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


def test_shared_steps_give_the_targets_the_source_latents_for_that_share_of_the_steps(tiny_pipe):
    prompts = [SOURCE, "a fluffy cat riding a bicycle"]
    controller = p2p.AttentionRefine(prompts, STEPS, 0.8, 0.4, tokenizer=tiny_pipe.tokenizer)
    controller.shared_steps = 0.5
    latents, step_callback = [], controller.step_callback
    controller.step_callback = lambda x_t: latents.append(step_callback(x_t)) or latents[-1]
    p2p.text2image_ldm(tiny_pipe, prompts, controller, STEPS, latent=noise(tiny_pipe))
    assert [torch.equal(x_t[0], x_t[1]) for x_t in latents] == [True, True, False, False]


def test_command_line_refinement_shares_refine_shared_steps_unless_told(tmp_path, monkeypatch):
    monkeypatch.setattr(p2p, "REFINE_SHARED_STEPS", 1.0)  # all steps shared: the target is the source
    out = tmp_path / "edit.png"
    args = ["--model", "tiny", "--steps", "3", "--out", str(out), "--source", SOURCE]
    for extra, same in (([], True), (["--shared-steps", "0"], False)):
        p2p.main([*args, "--target", "a fluffy cat riding a bicycle", *extra])
        grid = np.asarray(Image.open(out))
        gap = int(grid.shape[0] * 0.02)
        assert np.array_equal(grid[:32, :32], grid[:32, 32 + gap : 64 + gap]) == same


def test_command_line_sweep_draws_the_source_and_one_image_per_scale(tmp_path):
    out = tmp_path / "sweep.png"
    p2p.main(
        ["--model", "tiny", "--steps", "3", "--out", str(out), "--source", SOURCE, "--display-size", "64"]
        + ["--reweight-sweep", "cat=0,1,3", "--reweight", "bicycle=2"]
    )
    grid = np.asarray(Image.open(out))
    gap = int(grid.shape[0] * 0.02)
    assert grid.shape[1] == 4 * 64 + 3 * gap
    tiles = [grid[:64, k * (64 + gap) : k * (64 + gap) + 64] for k in range(4)]
    # One prompt against itself: the scales change the image, and cat x1 with bicycle x2 is not the source.
    assert all(not np.array_equal(tiles[0], tile) for tile in tiles[1:])
    p2p.main(
        ["--model", "tiny", "--steps", "3", "--out", str(out), "--source", SOURCE, "--display-size", "64"]
        + ["--reweight-sweep", "cat=1,3"]
    )
    grid = np.asarray(Image.open(out))
    source, scale_1 = grid[:64, :64], grid[:64, 64 + gap : 2 * 64 + gap]
    assert np.array_equal(source, scale_1)  # reweighting by 1 leaves the prompt's image as it is
    # Nearest-neighbour enlargement: every generated pixel is a 2x2 block.
    assert np.array_equal(source, source[::2, ::2].repeat(2, 0).repeat(2, 1))


@pytest.mark.parametrize("value", ["0.2,0.5,0.8", "most", "0.8,0.2"])
def test_replace_steps_other_than_a_fraction_or_a_range_are_refused(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        p2p.main(["--model", "tiny", "--cross-replace-steps", value])
    assert exit_info.value.code == 2
    assert 'give a fraction such as "0.8" or a range "0.2,0.8" within [0, 1]' in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--blend-words", "cat", "dog"],
            "--blend-words: 'dog' is not a word of the prompt 'a cat riding a motorcycle'",
        ),
        (
            ["--blend-words", "dog", "cat"],
            "--blend-words: 'dog' is not a word of the prompt 'a cat riding a bicycle'",
        ),
        (["--reweight-sweep", "dog=1,2"], "--reweight-sweep: 'dog' is not a word of the prompt"),
        (["--target", "cat " * 80], "--target: the prompt has 82 tokens"),
    ],
)
def test_command_line_words_that_are_not_in_the_prompts_are_refused(tmp_path, capsys, args, message):
    out = tmp_path / "edit.png"
    with pytest.raises(SystemExit) as exit_info:
        p2p.main(["--model", "tiny", "--out", str(out), "--source", SOURCE, "--target", TARGET, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_unreachable_model_says_what_failed_and_the_ways_out(tmp_path):
    with pytest.raises(OSError) as error:
        p2p.load_model("no-such-user/no-such-model", device="cpu")
    what, ways_out = str(error.value).splitlines()
    assert what.startswith("Could not load the model 'no-such-user/no-such-model': it is not a local folder")
    assert ways_out.startswith("Ways out: `hf download no-such-user/no-such-model` where there is internet")
    assert "a local pipeline folder" in ways_out and ways_out.endswith(
        "'shapes', 'sd2-tiny', 'sdxl-tiny', 'sdxl-random'."
    )
    with pytest.raises(
        OSError, match="the folder holds no diffusers pipeline .no model_index.json."
    ) as error:
        p2p.load_model(str(tmp_path), device="cpu")
    assert len(str(error.value).splitlines()) == 2


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
