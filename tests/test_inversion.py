"""Real pictures: DDIM, null-text and negative-prompt inversion, on the shipped Shapes World model
(a real denoiser: a random-weight UNet cannot reconstruct anything) and, for the plumbing, the tiny
random pipeline."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image
from safetensors.torch import save_file

import prompt2prompt as p2p
import ptp_utils
import shapes_world as sw

STEPS = 10  # DDIM steps of the inversions here: the model reconstructs at 10 as at 50, in seconds
INNER_STEPS = 5
GUIDANCE = 7.5
# The caption names no background: guidance at 7.5 then paints this gray picture's background black
# from DDIM inversion's x_T, which null-text and negative-prompt inversion must prevent.
SCENE = sw.Scene(
    [
        sw.ShapeObject("yellow", "diamond", "small", 17.3, 26.4, 7.6),
        sw.ShapeObject("red", "triangle", "large", 47.1, 42.5, 11.5),
    ],
    "gray",
    "a yellow diamond and a red triangle",
)
TARGET = "a yellow diamond and a red star"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(float) - b.astype(float)) ** 2)))


def assert_images_close(a, b, max_levels=2):
    assert a.shape == b.shape and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= max_levels


def reconstruct(pipe, x_t, uncond_embeddings=None, prompts=(SCENE.caption,), controller=None, **options):
    """The prompts' images from an inversion; `options` go to text2image_ldm (keep_source_tokens...)."""
    images, _ = p2p.text2image_ldm(
        pipe,
        list(prompts),
        controller or p2p.EmptyControl(),
        STEPS,
        GUIDANCE,
        latent=x_t,
        uncond_embeddings=uncond_embeddings,
        **options,
    )
    return images


def swap(pipe, x_t, uncond_embeddings, **options):
    """Source and edit of the word swap SCENE.caption -> TARGET from an inversion, the editor's injection."""
    prompts = [SCENE.caption, TARGET]
    controller = p2p.AttentionReplace(
        prompts, STEPS, p2p.CROSS_REPLACE_STEPS, p2p.SELF_REPLACE_STEPS, tokenizer=pipe.tokenizer
    )
    return reconstruct(pipe, x_t, uncond_embeddings, prompts, controller, **options)


@pytest.fixture(scope="module")
def shapes():
    model = p2p.load_model("shapes", device="cpu")
    model.set_progress_bar_config(disable=True)
    return model


@pytest.fixture(scope="module")
def picture():
    return sw.render(SCENE)


@pytest.fixture(scope="module")
def null_text(shapes, picture):
    return p2p.NullInversion(shapes, STEPS, GUIDANCE).invert(picture, SCENE.caption, INNER_STEPS)


def test_ddim_trajectory_runs_from_the_posterior_mean_to_x_t(tiny_pipe):
    picture = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    latents = p2p.ddim_inversion(tiny_pipe, picture, "a cat", STEPS)
    pixels = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        z_0 = tiny_pipe.vae.encode(pixels).latent_dist.mean * tiny_pipe.vae.config.scaling_factor
    assert len(latents) == STEPS + 1
    assert all(latent.shape == (1, 4, 16, 16) for latent in latents)
    torch.testing.assert_close(latents[0], z_0)
    assert not torch.equal(latents[-1], latents[0])


def test_null_text_and_negative_prompt_reconstruct_far_better_than_ddim_inversion(shapes, picture, null_text):
    ddim_x_t = p2p.ddim_inversion(shapes, picture, SCENE.caption, STEPS)[-1]
    ddim = psnr(reconstruct(shapes, ddim_x_t)[0], picture)
    negative_prompt = psnr(
        reconstruct(shapes, *p2p.negative_prompt_inversion(shapes, picture, SCENE.caption, STEPS))[0], picture
    )
    null = psnr(reconstruct(shapes, *null_text)[0], picture)
    vae = psnr(ptp_utils.latent2image(shapes.vae, p2p.image2latent(shapes, picture))[0], picture)
    assert ddim < 15, ddim  # the background turned black
    assert null > ddim + 10 and negative_prompt > ddim + 10, (null, negative_prompt, ddim)
    assert null > vae - 6 and negative_prompt > vae - 2, (null, negative_prompt, vae)


def test_null_embeddings_are_one_per_step_and_negative_prompt_uses_the_prompt(shapes, picture, null_text):
    x_t, uncond_embeddings = null_text
    assert x_t.shape == (1, 4, 16, 16)
    assert len(uncond_embeddings) == STEPS
    assert all(u.shape == (1, 77, 64) and u.dtype == torch.float32 for u in uncond_embeddings)
    assert not torch.equal(uncond_embeddings[0], uncond_embeddings[-1])  # each step keeps its own
    _, prompt_embeddings = p2p.negative_prompt_inversion(shapes, picture, SCENE.caption, STEPS)
    expected = p2p.encode_text(shapes, [SCENE.caption]).detach()
    assert len(prompt_embeddings) == STEPS
    assert all(torch.equal(u, expected) for u in prompt_embeddings)


def test_the_edit_source_is_the_reconstruction_and_identical_prompts_reproduce_it(shapes, null_text):
    (reconstruction,) = reconstruct(shapes, *null_text)
    source, edit = swap(shapes, *null_text)
    assert_images_close(source, reconstruction)
    assert np.abs(edit.astype(int) - reconstruction.astype(int)).max() > 64  # the triangle changed
    for image in reconstruct(shapes, *null_text, prompts=(SCENE.caption, SCENE.caption)):
        assert_images_close(image, reconstruction)


def test_kept_source_tokens_leave_only_the_changed_words_and_the_padding_their_own(tiny_pipe):
    prompts = [
        "a blue diamond on a black background",
        "a blue star on a black background",  # a word swapped: token 3
        "a blue fluffy diamond on a black background",  # a word added: token 3, the rest one later
    ]
    plain = p2p.encode_text(tiny_pipe, prompts)
    kept = p2p.with_source_tokens(tiny_pipe.tokenizer, prompts, plain)
    # Tokens: start, a, blue, diamond, on, a, black, background, end (0-8), then padding.
    assert not torch.allclose(plain[1, 4:9], plain[0, 4:9])  # the causal encoder: every later token changed
    torch.testing.assert_close(kept[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(kept[1, :3], plain[0, :3], rtol=0, atol=0)
    torch.testing.assert_close(kept[1, 3], plain[1, 3], rtol=0, atol=0)
    torch.testing.assert_close(kept[1, 4:9], plain[0, 4:9], rtol=0, atol=0)
    torch.testing.assert_close(kept[1, 9:], plain[1, 9:], rtol=0, atol=0)
    torch.testing.assert_close(kept[2, :3], plain[0, :3], rtol=0, atol=0)
    torch.testing.assert_close(kept[2, 3], plain[2, 3], rtol=0, atol=0)
    torch.testing.assert_close(kept[2, 4:10], plain[0, 3:9], rtol=0, atol=0)
    torch.testing.assert_close(kept[2, 10:], plain[2, 10:], rtol=0, atol=0)


def test_kept_source_tokens_keep_the_source_and_still_swap_the_word(shapes, null_text):
    (reconstruction,) = reconstruct(shapes, *null_text)
    edits = {}
    for keep in (False, True):
        source, edits[keep] = swap(shapes, *null_text, keep_source_tokens=keep)
        assert_images_close(source, reconstruction)
    edit = edits[True]
    assert np.abs(edit.astype(int) - edits[False].astype(int)).max() > 0
    assert np.abs(edit.astype(int) - reconstruction.astype(int)).max() > 64  # the triangle changed
    seen = sw.judge(edit)
    assert seen.background == SCENE.background
    assert sorted((o.colour, o.shape) for o in seen.objects) == [("red", "star"), ("yellow", "diamond")]


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_the_targets_take_their_share_of_each_null_embedding_and_the_source_all_of_it(
    shapes, null_text, weight
):
    x_t, uncond_embeddings = null_text
    empty = p2p.encode_text(shapes, [""])
    weighed = [empty + weight * (u - empty) for u in uncond_embeddings]
    prompts = (SCENE.caption, TARGET)
    source, target = reconstruct(shapes, *null_text, prompts=prompts, target_null_weight=weight)
    assert_images_close(source, reconstruct(shapes, *null_text)[0])
    assert_images_close(target, reconstruct(shapes, x_t, weighed, prompts=(TARGET,))[0])
    if weight == 0:  # the target alone under plain guidance: the empty prompt's null embedding
        assert_images_close(target, reconstruct(shapes, x_t, prompts=(TARGET,))[0])


def test_a_swap_with_half_the_null_embedding_keeps_the_source_and_swaps_the_word(shapes, null_text):
    (reconstruction,) = reconstruct(shapes, *null_text)
    source, edit = swap(shapes, *null_text, target_null_weight=0.5)
    assert_images_close(source, reconstruction)
    seen = sw.judge(edit)
    assert seen.background == SCENE.background
    assert sorted((o.colour, o.shape) for o in seen.objects) == [("red", "star"), ("yellow", "diamond")]


def test_target_null_weight_needs_the_null_embeddings_of_an_inversion(tiny_pipe):
    with pytest.raises(ValueError, match="target_null_weight weighs the null embeddings of an inversion"):
        p2p.text2image_ldm(tiny_pipe, ["a cat", "a dog"], p2p.EmptyControl(), STEPS, target_null_weight=0.5)


def test_uncond_embeddings_must_be_one_per_step(tiny_pipe):
    embeddings = [torch.zeros(1, 77, 32)] * (STEPS - 1)
    with pytest.raises(
        ValueError, match="uncond_embeddings holds 9 embeddings but num_inference_steps is 10"
    ):
        p2p.text2image_ldm(tiny_pipe, ["a cat"], p2p.EmptyControl(), STEPS, uncond_embeddings=embeddings)


def test_a_half_precision_pipeline_optimises_in_fp32(picture):
    pipe = p2p.load_model("shapes", device="cpu", dtype=torch.float16)
    pipe.set_progress_bar_config(disable=True)
    x_t, uncond_embeddings = p2p.NullInversion(pipe, STEPS, GUIDANCE).invert(
        picture, SCENE.caption, INNER_STEPS
    )
    assert pipe.unet.dtype == torch.float16 and x_t.dtype == torch.float16
    assert all(u.dtype == torch.float32 for u in uncond_embeddings)
    assert all(p.grad is None for p in pipe.unet.parameters())  # no gradient of the weights was kept
    ddim_x_t = p2p.ddim_inversion(pipe, picture, SCENE.caption, STEPS)[-1]
    null, ddim = (
        psnr(reconstruct(pipe, x_t, uncond_embeddings)[0], picture),
        psnr(reconstruct(pipe, ddim_x_t)[0], picture),
    )
    assert null > ddim + 10, (null, ddim)


def reparametrised(prediction_type: str):
    """The shipped model made to predict v or x_0 instead of the noise: the same denoiser."""
    pipe = p2p.load_model("shapes", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    alphas_cumprod = pipe.scheduler.alphas_cumprod

    def predict(unet, args, kwargs, output):
        sample, timestep = args[:2]
        alpha = alphas_cumprod[timestep]
        noise = output.sample
        x_0 = (sample - (1 - alpha) ** 0.5 * noise) / alpha**0.5
        v = alpha**0.5 * noise - (1 - alpha) ** 0.5 * x_0
        return UNet2DConditionOutput(sample=v if prediction_type == "v_prediction" else x_0)

    pipe.unet.register_forward_hook(predict, with_kwargs=True)
    return pipe


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_sample_prediction_invert_as_the_same_noise_model(shapes, picture, null_text, prediction_type):
    pipe = reparametrised(prediction_type)
    latents = p2p.ddim_inversion(pipe, picture, SCENE.caption, STEPS)
    for ours, epsilon in zip(latents, p2p.ddim_inversion(shapes, picture, SCENE.caption, STEPS), strict=True):
        torch.testing.assert_close(ours, epsilon, atol=1e-4, rtol=1e-4)
    assert_images_close(reconstruct(pipe, *null_text), reconstruct(shapes, *null_text), max_levels=1)


def test_saved_and_loaded_inversions_give_the_same_edit(shapes, null_text, tmp_path):
    before = swap(shapes, *null_text)
    p2p.save_inversion(tmp_path / "inversion.safetensors", *null_text)
    x_t, uncond_embeddings = p2p.load_inversion(tmp_path / "inversion.safetensors")
    assert torch.equal(x_t, null_text[0]) and len(uncond_embeddings) == STEPS
    after = swap(shapes, x_t, uncond_embeddings)
    assert np.array_equal(before, after)


def test_a_file_that_is_not_an_inversion_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not tensors")
    save_file({"weight": torch.zeros(3)}, tmp_path / "weights.safetensors")
    save_file(
        {"x_t": torch.zeros(4, 16, 16), "uncond_embeddings": torch.zeros(2, 77, 8)},
        tmp_path / "flat.safetensors",
    )
    for name, message in [
        ("missing.safetensors", "Cannot read the inversion"),
        ("notes.txt", "Cannot read the inversion"),
        ("weights.safetensors", "is not a saved inversion"),
        ("flat.safetensors", "is not a saved inversion"),
    ]:
        with pytest.raises(ValueError, match=message):
            p2p.load_inversion(tmp_path / name)


def test_an_unreadable_image_is_refused(tiny_pipe, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for image in [tmp_path / "broken.png", str(tmp_path / "missing.jpg")]:
        with pytest.raises(ValueError, match="Cannot read the image"):
            p2p.ddim_inversion(tiny_pipe, image, "a cat", STEPS)
    with pytest.raises(ValueError, match="must be uint8"):
        p2p.load_image(tiny_pipe, np.zeros((32, 32, 3)))
    with pytest.raises(TypeError, match="not Tensor"):
        p2p.load_image(tiny_pipe, torch.zeros(32, 32, 3))


def test_grey_rgba_and_oblong_pictures_are_converted_and_centre_cropped(tiny_pipe, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    centre = rgb[:, 8:40]
    assert np.array_equal(np.asarray(p2p.load_image(tiny_pipe, rgb)), centre)
    rgba = Image.fromarray(np.dstack([rgb, np.full((32, 48), 128, np.uint8)]), "RGBA")
    rgba.save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(p2p.load_image(tiny_pipe, tmp_path / "rgba.png")), centre)
    grey = rgb[..., 0]
    loaded = np.asarray(p2p.load_image(tiny_pipe, Image.fromarray(grey)))
    assert loaded.shape == (32, 32, 3)
    assert all(np.array_equal(loaded[..., c], grey[:, 8:40]) for c in range(3))
    torch.testing.assert_close(p2p.image2latent(tiny_pipe, rgba), p2p.image2latent(tiny_pipe, centre))


def test_another_scheduler_is_replaced_by_ddim_with_a_warning(tiny_pipe):
    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    picture = np.zeros((32, 32, 3), np.uint8)
    with pytest.warns(UserWarning, match="EulerDiscreteScheduler is replaced by DDIMScheduler"):
        p2p.negative_prompt_inversion(tiny_pipe, picture, "a cat", STEPS)
    assert type(tiny_pipe.scheduler) is DDIMScheduler
    assert tiny_pipe.scheduler.config.beta_schedule == "scaled_linear"


CLI_STEPS = "5"  # the command line's inversions here: few steps, as the round trip is what is tested


def edit_on_the_command_line(tmp_path, name, *args):
    """Run prompt2prompt.py's main on the shapes model, the scene's triangle made a star; returns the
    figure it wrote."""
    out = tmp_path / f"{name}.png"
    model = ["--model", "shapes", "--device", "cpu", "--steps", CLI_STEPS]
    p2p.main([*model, "--source", SCENE.caption, "--target", TARGET, "--out", str(out), *args])
    return np.asarray(Image.open(out))


def tile(figure, k, size=sw.IMAGE_SIZE):
    """Image k of a one-row figure of `size`-wide images (view_images' gaps between them)."""
    gap = (figure.shape[1] - 3 * size) // 2
    return figure[:size, k * (size + gap) : k * (size + gap) + size]


@pytest.mark.parametrize("inversion", ["null-text", "ddim"])
def test_a_saved_inversion_loaded_on_the_command_line_gives_the_same_edit(picture, tmp_path, inversion):
    Image.fromarray(picture).save(tmp_path / "photo.png")
    photo, inversion_file = str(tmp_path / "photo.png"), str(tmp_path / "inversion.safetensors")
    inverted = edit_on_the_command_line(
        tmp_path, "inverted", "--image", photo, "--inversion", inversion, "--save-inversion", inversion_file
    )
    loaded = edit_on_the_command_line(
        tmp_path, "loaded", "--image", photo, "--load-inversion", inversion_file
    )
    assert np.array_equal(inverted, loaded)
    # input | reconstruction | edit: the triangle became a star, the reconstruction stays nearer the input
    reconstruction, edit = tile(inverted, 1), tile(inverted, 2)
    assert np.array_equal(tile(inverted, 0), picture)
    assert np.abs(edit.astype(int) - reconstruction.astype(int)).max() > 64
    assert psnr(reconstruction, picture) > psnr(edit, picture) + 1


@pytest.mark.parametrize(
    "flags, options",
    [
        (["--keep-source-tokens"], dict(keep_source_tokens=True)),
        (["--target-null-weight", "0.5"], dict(target_null_weight=0.5)),
    ],
)
def test_edit_flags_for_pictures_on_the_command_line_give_the_same_edit(
    shapes, picture, null_text, tmp_path, flags, options
):
    Image.fromarray(picture).save(tmp_path / "photo.png")
    p2p.save_inversion(tmp_path / "inversion.safetensors", *null_text)
    loaded = [
        "--image",
        str(tmp_path / "photo.png"),
        "--load-inversion",
        str(tmp_path / "inversion.safetensors"),
    ]
    figure = edit_on_the_command_line(tmp_path, "edit", *loaded, "--steps", str(STEPS), *flags)
    _, edit = swap(shapes, *null_text, **options)
    assert np.array_equal(tile(figure, 2), edit)


def test_grey_and_rgba_pictures_are_converted_on_the_command_line(picture, tmp_path):
    rgb = Image.fromarray(picture)
    pictures = {"rgb": rgb, "rgba": rgb.convert("RGBA"), "grey": rgb.convert("L")}
    pictures["grey_as_rgb"] = pictures["grey"].convert("RGB")
    figures = {}
    for name, image in pictures.items():
        image.save(tmp_path / f"{name}_photo.png")
        figures[name] = edit_on_the_command_line(
            tmp_path, name, "--image", str(tmp_path / f"{name}_photo.png"), "--inversion", "negative-prompt"
        )
    assert np.array_equal(figures["rgba"], figures["rgb"])
    assert np.array_equal(figures["grey"], figures["grey_as_rgb"])
    assert np.array_equal(tile(figures["grey"], 0), np.asarray(pictures["grey_as_rgb"]))
    assert not np.array_equal(figures["grey"], figures["rgb"])
