"""Textual inversion on the tiny random-weight pipeline: invariants, file format, resume, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file

import offline_models
import ptp_utils
import textual_inversion as ti

TOKEN = "<thing>"


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one mixed-precision setting per process; each test starts from none."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a.png", "b.JPG", "c.webp"]):
        pixels = rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    return folder


def make_config(folder, output_dir, **overrides):
    settings = dict(
        target_folder=str(folder),
        placeholder_tokens=[TOKEN],
        initializer_token="ball",
        learning_rate=5e-2,
        num_inversion_steps=3,
        batch_size=2,
        gradient_accumulation_steps=2,
        show_every=0,
        checkpoint_every=0,
        num_sampling_steps=3,
        output_dir=str(output_dir),
        resolution=32,
    )
    return ti.TextualInversionConfig(**{**settings, **overrides})


def embedding_weight(wrapper):
    return wrapper.text_encoder.get_input_embeddings().weight


def test_dataset_reads_every_image_kind_and_center_crops(tmp_path, image_folder):
    # A 96x32 image black | white | black: the shorter side is already 32, the centre crop is all white.
    pixels = np.zeros((32, 96, 3), dtype=np.uint8)
    pixels[:, 32:64] = 255
    Image.fromarray(pixels).save(image_folder / "d.jpeg")
    (image_folder / "notes.txt").write_text("not an image")

    dataset = ti.UnlabeledImageFolderDataset(image_folder, None, ti.center_crop_transform(32))

    assert len(dataset) == 4
    assert all(dataset[i].shape == (3, 32, 32) for i in range(4))
    assert torch.equal(dataset[3], torch.ones(3, 32, 32))
    assert len(ti.UnlabeledImageFolderDataset(image_folder, 2, ti.center_crop_transform(32))) == 2


def test_unreadable_files_are_skipped_with_a_warning(image_folder):
    (image_folder / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="Skipping unreadable image .*broken.png"):
        dataset = ti.UnlabeledImageFolderDataset(image_folder)
    assert len(dataset) == 3


def test_a_folder_of_unreadable_files_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with (
        pytest.warns(UserWarning, match="Skipping"),
        pytest.raises(ValueError, match="None of the 1 image files"),
    ):
        ti.UnlabeledImageFolderDataset(tmp_path)


def test_a_missing_or_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ti.UnlabeledImageFolderDataset(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="No images in"):
        ti.UnlabeledImageFolderDataset(tmp_path)


def test_a_concept_of_no_vectors_is_refused():
    with pytest.raises(ValueError, match="at least one vector"):
        ti.multi_vector_tokens(TOKEN, 0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(placeholder_tokens=["dog"]), "already in the tokenizer's vocabulary"),
        (dict(initializer_token="red ball"), "is 2 tokens"),
        (dict(resolution=33), "not a multiple of the VAE's downsampling factor 2"),
        (dict(placeholder_tokens=[TOKEN, "<other>"]), "diffusers' names"),
        (dict(placeholder_tokens=["<Thing>"]), "lowercases"),
        (dict(resume_from="latest"), "No checkpoint"),
        (dict(target_folder="/nonexistent/folder"), "does not exist"),
        (dict(prompt_templates=["a {}", "a photo"]), r"needs \{\} where the placeholder goes.*'a photo'"),
        (dict(prompt_templates=[]), r"needs \{\} where the placeholder goes"),
    ],
)
def test_bad_settings_fail_before_touching_the_pipeline(
    tiny_pipe, tmp_path, image_folder, overrides, message
):
    wrapper = ti.StableDiffusionWrapper(tiny_pipe)
    weight_before = embedding_weight(wrapper).detach().clone()
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        ti.textual_inversion(wrapper, make_config(image_folder, tmp_path / "out", **overrides))
    assert len(wrapper.tokenizer) == len(weight_before)
    assert torch.equal(embedding_weight(wrapper), weight_before)


def test_loss_goes_down_on_a_fixed_batch(tiny_pipe, tmp_path, image_folder):
    wrapper = ti.StableDiffusionWrapper(tiny_pipe)
    config = make_config(image_folder, tmp_path, learning_rate=1e-1)
    optimizer = ti.prepare_for_textual_inversion(wrapper, config)
    images = torch.stack(list(ti.UnlabeledImageFolderDataset(image_folder, 2, ti.center_crop_transform(32))))
    torch.manual_seed(0)
    latents = wrapper.encode_image_to_latents(images)
    timesteps = torch.tensor([100, 700])

    def fixed_batch_loss():
        torch.manual_seed(1)  # the same noise every time
        embeddings, _ = wrapper.encode_prompt([f"a photo of a {TOKEN}"] * 2)
        return ti.compute_standard_diffusion_loss(wrapper, latents, timesteps, embeddings)

    losses = []
    for _ in range(15):
        loss = fixed_batch_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert fixed_batch_loss().item() < 0.98 * losses[0], losses


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_only_placeholder_rows_change(tiny_pipe, tmp_path, image_folder, mixed_precision):
    wrapper = ti.StableDiffusionWrapper(tiny_pipe)
    modules = {"unet": wrapper.unet, "vae": wrapper.vae, "text_encoder": wrapper.text_encoder}

    def parameters():
        embedding = embedding_weight(wrapper)
        named = (m.named_parameters(prefix=key) for key, m in modules.items())
        return {name: p for group in named for name, p in group if p is not embedding}

    frozen = {name: p.detach().clone() for name, p in parameters().items()}
    rows_before = embedding_weight(wrapper).detach().clone()
    tokens = ti.multi_vector_tokens(TOKEN, 2)
    config = make_config(image_folder, tmp_path, placeholder_tokens=tokens, mixed_precision=mixed_precision)
    ti.textual_inversion(wrapper, config)

    weight = embedding_weight(wrapper)
    assert weight.dtype == torch.float32
    assert torch.equal(weight[: len(rows_before)].cpu(), rows_before)
    initializer_row = weight[wrapper.tokenizer.convert_tokens_to_ids("ball</w>")]
    assert all(not torch.equal(row, initializer_row) for row in weight[len(rows_before) :])
    half = mixed_precision == "bf16"
    assert wrapper.unet.dtype == wrapper.vae.dtype == (torch.bfloat16 if half else torch.float32)
    after = parameters()
    assert after.keys() == frozen.keys()
    for name, p in after.items():
        assert torch.equal(p.cpu(), frozen[name].to(p.dtype)), name
    assert len(wrapper([f"a photo of {TOKEN}"], num_inference_steps=2)) == 1


@pytest.mark.parametrize("num_vectors", [1, 3])
def test_saved_embeddings_reproduce_the_wrapper_in_a_stock_pipeline(
    tiny_pipe, tmp_path, image_folder, num_vectors
):
    wrapper = ti.StableDiffusionWrapper(tiny_pipe)
    tokens = ti.multi_vector_tokens(TOKEN, num_vectors)
    ti.textual_inversion(wrapper, make_config(image_folder, tmp_path, placeholder_tokens=tokens))

    saved = load_file(tmp_path / ti.EMBEDS_FILE)
    learned = embedding_weight(wrapper)[wrapper.tokenizer.convert_tokens_to_ids(tokens)].cpu()
    assert list(saved) == [TOKEN]
    assert torch.equal(saved[TOKEN], learned)

    prompt = f"a photo of {TOKEN} on a table"
    ours = wrapper([prompt], generator=torch.Generator().manual_seed(3), num_inference_steps=3)
    # Training ran wherever accelerate put it; the fresh pipelines run there too.
    stock = offline_models.make_tiny_pipeline(seed=0).to(wrapper.device)
    stock.load_textual_inversion(tmp_path / ti.EMBEDS_FILE)
    theirs = stock(prompt, generator=torch.Generator().manual_seed(3), num_inference_steps=3).images
    reloaded = ti.StableDiffusionWrapper(offline_models.make_tiny_pipeline(seed=0).to(wrapper.device))
    reloaded.load_textual_inversion(tmp_path / ti.EMBEDS_FILE)
    again = reloaded([prompt], generator=torch.Generator().manual_seed(3), num_inference_steps=3)
    untrained = (
        offline_models.make_tiny_pipeline(seed=0)
        .to(wrapper.device)(prompt, generator=torch.Generator().manual_seed(3), num_inference_steps=3)
        .images
    )

    assert np.array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
    assert np.array_equal(np.asarray(ours[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(untrained[0]))


def test_resume_after_an_interrupt_equals_an_uninterrupted_run(tmp_path, image_folder):
    def run(output_dir, steps, resume_from=None):
        wrapper = ti.StableDiffusionWrapper(offline_models.make_tiny_pipeline(seed=0))
        config = make_config(
            image_folder, output_dir, num_inversion_steps=steps, checkpoint_every=2, resume_from=resume_from
        )
        ti.textual_inversion(wrapper, config)
        return embedding_weight(wrapper)[-1].detach().cpu()

    uninterrupted = run(tmp_path / "straight", 5)
    interrupted = run(tmp_path / "resumed", 3)  # stops after step 3; the last checkpoint is step 2
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step_000002"]
    resumed = run(tmp_path / "resumed", 5, resume_from="latest")

    assert not torch.equal(interrupted, uninterrupted)
    if torch.cuda.is_available():
        # accelerate trained on the GPU, whose sums are not bit-reproducible by default (cuDNN's
        # algorithm choice, atomics); on an H100 the two runs differed by under 1e-3.
        torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=2e-3)
    else:
        assert torch.equal(resumed, uninterrupted)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == [
        "step_000002",
        "step_000004",
    ]


def test_compiled_models_learn_the_same_embeddings(tmp_path, image_folder, eager_compile):
    def train(output_dir, **overrides):
        wrapper = ti.StableDiffusionWrapper(offline_models.make_tiny_pipeline(seed=0))
        ti.textual_inversion(wrapper, make_config(image_folder, output_dir, **overrides))
        return wrapper

    plain = embedding_weight(train(tmp_path / "plain"))[-1].detach().cpu()
    wrapper = train(tmp_path / "compiled", compile=True)
    compiled = embedding_weight(wrapper)[-1].detach().cpu()
    assert len(wrapper([f"a photo of {TOKEN}"], num_inference_steps=2)) == 1  # the compiled models sample
    assert sorted(eager_compile) == ["CLIPTextModel", "UNet2DConditionModel"]  # the plain run compiled none
    if torch.cuda.is_available():  # CUDA's sums are not bit-reproducible by default (see the resume test)
        torch.testing.assert_close(compiled, plain, rtol=0, atol=2e-3)
    else:
        assert torch.equal(compiled, plain)
    untrained = offline_models.make_tiny_pipeline(seed=0)
    initializer = embedding_weight(untrained)[untrained.tokenizer.convert_tokens_to_ids("ball</w>")]
    assert not torch.equal(plain, initializer)


def test_two_processes_draw_own_batches_and_learn_the_same_embeddings(tmp_path, image_folder, tokenizer):
    """`accelerate launch`'s several-process path, as two CPU processes (torchrun, gloo): each draws
    its own batches, the gradients are averaged, so both end with the same matrix."""
    worker = Path(__file__).with_name("ti_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, str(image_folder), str(tmp_path)], env=env, check=True, timeout=600)

    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["losses"] != ranks[1]["losses"]
    assert torch.equal(ranks[0]["after"], ranks[1]["after"])
    for rank in ranks:
        assert torch.equal(rank["after"][: len(rank["before"])], rank["before"])
    trained = ranks[0]["after"][len(ranks[0]["before"]) :]
    initializer = ranks[0]["before"][tokenizer.convert_tokens_to_ids("ball</w>")]
    assert not torch.equal(trained[0], initializer)
    assert torch.equal(load_file(tmp_path / ti.EMBEDS_FILE)[TOKEN], trained)


def test_validation_sampling_writes_a_grid(tiny_pipe, tmp_path):
    wrapper = ti.StableDiffusionWrapper(tiny_pipe)
    config = make_config(tmp_path, tmp_path, placeholder_tokens=["<x>"], num_sampling_steps=2)
    images = ti.validation_sampling(wrapper, config, step=7)
    grid = Image.open(tmp_path / "samples" / "step_000007.png")
    assert len(images) == ti.NUM_VALIDATION_IMAGES
    assert grid.size == (32 * ti.NUM_VALIDATION_IMAGES, 32)
    assert ti.show_images(images).size == grid.size


def test_command_line_trains_the_tiny_pipeline(tmp_path, image_folder, monkeypatch, capsys):
    output_dir = tmp_path / "out"
    argv = ["textual_inversion.py", "--images", str(image_folder), "--token", TOKEN, "--init", "ball"]
    argv += ["--model", "tiny", "--steps", "3", "--grad-accum", "1", "--num-vectors", "2"]
    argv += ["--output-dir", str(output_dir), "--show-every", "2", "--sampling-steps", "2"]
    argv += ["--templates", "a {}", "a {} in the center"]
    monkeypatch.setattr(sys, "argv", argv)
    configs = []
    real_prepare = ti.prepare_for_textual_inversion

    def prepare_and_record(wrapper, config):
        configs.append(config)
        return real_prepare(wrapper, config)

    monkeypatch.setattr(ti, "prepare_for_textual_inversion", prepare_and_record)
    ti.main()
    assert configs[0].prompt_templates == ["a {}", "a {} in the center"]
    assert load_file(output_dir / ti.EMBEDS_FILE)[TOKEN].shape == (2, 32)
    grids = sorted((output_dir / "samples").iterdir())
    assert [grid.name for grid in grids] == [
        "step_000002.png",
        "step_000003.png",
    ]  # every 2 steps, and the end
    assert Image.open(grids[-1]).size == (32 * ti.NUM_VALIDATION_IMAGES, 32)
    assert "sample images" in capsys.readouterr().err  # the sampler's progress bar


def test_an_unreachable_model_says_how_to_work_offline():
    with pytest.raises(OSError, match="HF_HUB_OFFLINE=1.*'tiny'"):
        ptp_utils.load_pipeline("nobody/no-such-model", device="cpu")


@pytest.mark.parametrize("num_vectors", [1, 2])
def test_sdxl_learns_a_row_in_both_encoders_that_the_stock_calls_load(tmp_path, image_folder, num_vectors):
    wrapper = ti.StableDiffusionWrapper(offline_models.make_sdxl_tiny_pipeline())
    rows_before = [e.get_input_embeddings().weight.detach().clone() for e in wrapper.text_encoders]
    tokens = ti.multi_vector_tokens(TOKEN, num_vectors)
    ti.textual_inversion(wrapper, make_config(image_folder, tmp_path, placeholder_tokens=tokens))

    saved = load_file(tmp_path / ti.EMBEDS_FILE)
    assert set(saved) == {"clip_l", "clip_g"}
    for key, tokenizer, text_encoder, before in zip(
        ("clip_l", "clip_g"), wrapper.tokenizers, wrapper.text_encoders, rows_before
    ):
        weight = text_encoder.get_input_embeddings().weight.detach().cpu()
        assert torch.equal(weight[: len(before)], before)  # every other row as it was
        assert torch.equal(saved[key], weight[tokenizer.convert_tokens_to_ids(tokens)])
        initializer_row = weight[tokenizer.convert_tokens_to_ids("ball</w>")]
        assert all(not torch.equal(row, initializer_row) for row in saved[key])  # trained

    prompt = f"a photo of {TOKEN} on a table"
    ours = wrapper([prompt], generator=torch.Generator().manual_seed(3), num_inference_steps=3)
    # diffusers' documented SDXL loading: one call per text encoder, with its tokenizer.
    stock = offline_models.make_sdxl_tiny_pipeline().to(wrapper.device)
    embeddings = load_file(tmp_path / ti.EMBEDS_FILE)
    stock.load_textual_inversion(
        embeddings["clip_l"], token=TOKEN, text_encoder=stock.text_encoder, tokenizer=stock.tokenizer
    )
    stock.load_textual_inversion(
        embeddings["clip_g"], token=TOKEN, text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2
    )
    sampling = dict(num_inference_steps=3, guidance_scale=ti.GUIDANCE_SCALE)  # SDXL's default is 5
    theirs = stock(prompt, generator=torch.Generator().manual_seed(3), **sampling).images
    reloaded = ti.StableDiffusionWrapper(offline_models.make_sdxl_tiny_pipeline().to(wrapper.device))
    reloaded.load_textual_inversion(tmp_path / ti.EMBEDS_FILE, token=TOKEN)
    again = reloaded([prompt], generator=torch.Generator().manual_seed(3), num_inference_steps=3)
    untrained = offline_models.make_sdxl_tiny_pipeline().to(wrapper.device)
    before = untrained(prompt, generator=torch.Generator().manual_seed(3), **sampling).images

    assert np.array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))
    assert np.array_equal(np.asarray(ours[0]), np.asarray(again[0]))
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(before[0]))


def test_sdxl_training_conditions_as_the_pipeline_does():
    pipe = offline_models.make_sdxl_tiny_pipeline()
    wrapper = ti.StableDiffusionWrapper(pipe)
    prompts = ["a photo of a ball", "a cat"]
    with torch.no_grad():
        embeddings, added = wrapper.encode_prompt(prompts)
        expected, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(embeddings, expected)
    torch.testing.assert_close(added["text_embeds"], pooled)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor  # (original size, crop corner, target size)
    assert added["time_ids"].tolist() == [[size, size, 0, 0, size, size]] * 2


def test_v_prediction_loss_regresses_the_velocity():
    wrapper = ti.StableDiffusionWrapper(offline_models.make_sd2_tiny_pipeline())
    assert wrapper.scheduler.config.prediction_type == "v_prediction"
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([100, 700])
    with torch.no_grad():
        embeddings, _ = wrapper.encode_prompt(["a photo of a ball"] * 2)
        torch.manual_seed(1)
        loss = ti.compute_standard_diffusion_loss(wrapper, latents, timesteps, embeddings)
        torch.manual_seed(1)
        noise = torch.randn_like(latents)  # the loss's own draw
        prediction = wrapper.predict_noise(
            timesteps, wrapper.scheduler.add_noise(latents, noise, timesteps), embeddings
        )
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x_0 (Salimans & Ho 2022), written out here.
    alpha_bar = wrapper.scheduler.alphas_cumprod[timesteps][:, None, None, None]
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prediction, velocity))
    assert not torch.allclose(loss, torch.nn.functional.mse_loss(prediction, noise))
