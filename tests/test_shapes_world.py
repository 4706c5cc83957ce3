"""Shapes World: the data set, the judge, and the training of the small model (tiny configuration)."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
from diffusers.training_utils import compute_snr
from PIL import Image

import shapes_train
import shapes_world as sw
from offline_models import SD_SCHEDULER_CONFIG
from ptp_utils import tokenize_prompts


def test_judge_reads_ground_truth_images():
    report = sw.judge_accuracy(n=150, seed=7)
    assert report["objects"] > 200
    assert report["count"] == 1.0
    assert report["background"] == 1.0
    assert report["all"] >= 0.98, report


def test_judge_mask_covers_the_drawn_object():
    obj = sw.ShapeObject("blue", "square", "large", x=30.0, y=34.0, radius=12.0)
    scene = sw.Scene([obj], "white", "a large blue square")
    seen = sw.judge(sw.render(scene))
    assert [(o.colour, o.shape, o.size) for o in seen.objects] == [("blue", "square", "large")]
    assert seen.background == "white"
    rows, cols = np.nonzero(seen.objects[0].mask)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (22, 45, 18, 41)
    assert seen.objects[0].mask.sum() == 24 * 24


def test_layout_iou_of_two_squares_half_on_top_of_each_other():
    def judged_square(x: float) -> sw.Judgement:
        obj = sw.ShapeObject("blue", "square", "large", x=x, y=34.0, radius=12.0)
        return sw.judge(sw.render(sw.Scene([obj], "white", "a large blue square")))

    # Two 24x24 squares 12 pixels apart: 24x12 shared, 2 * 576 - 288 in all.
    assert sw.layout_iou(judged_square(30.0), judged_square(42.0)) == pytest.approx(288 / 864)
    assert sw.layout_iou(judged_square(30.0), judged_square(30.0)) == 1.0
    empty = sw.judge(sw.render(sw.Scene([], "white", "")))
    assert sw.layout_iou(empty, empty) == 1.0
    assert sw.layout_iou(empty, judged_square(30.0)) == 0.0


def test_uint8_images_survive_the_round_trip_through_the_diffusers_range():
    images = np.stack([sw.render(sw.sample_scene(sw.scene_rng(5, i))) for i in range(4)])
    assert np.array_equal(sw.to_uint8(sw.to_tensor(images)), images)


def test_judge_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match=r"\(64, 64, 3\)"):
        sw.judge(np.zeros((32, 32, 3), dtype=np.uint8))


def test_captions_in_plain_english():
    red = sw.ShapeObject("red", "circle", "large", 32, 32, 12)
    blue = sw.ShapeObject("blue", "square", "small", 16, 32, 7)
    yellow = sw.ShapeObject("yellow", "star", "large", 48, 32, 12)
    orange = sw.ShapeObject("orange", "diamond", "small", 32, 32, 7)
    assert sw.make_caption([red], "gray", with_background=False) == "a large red circle"
    assert (
        sw.make_caption([blue, yellow], "black", with_size=False)
        == "a blue square and a yellow star on a black background"
    )
    assert sw.make_caption([orange], "white", "on the left", False, False) == "an orange diamond on the left"


def test_data_set_is_deterministic_by_seed():
    images, captions = sw.make_batch(3, range(6))
    again, again_captions = sw.make_batch(3, range(6))
    assert torch.equal(images, again) and captions == again_captions
    # An item does not depend on the batch it is drawn in.
    alone, alone_caption = sw.make_batch(3, [4])
    assert torch.equal(alone[0], images[4]) and alone_caption[0] == captions[4]
    item, item_caption = sw.ShapesWorld(length=10, seed=3)[4]
    assert torch.equal(item, images[4]) and item_caption == captions[4]
    other, other_captions = sw.make_batch(4, range(6))
    assert not torch.equal(images, other)
    assert images.shape == (6, 3, 64, 64) and images.min() >= -1 and images.max() <= 1


def test_data_set_index_out_of_range():
    with pytest.raises(IndexError, match="length 10"):
        sw.ShapesWorld(length=10)[10]


def test_held_out_pair_never_in_training_scenes():
    colour, shape = sw.HELD_OUT
    for i in range(3000):
        scene = sw.sample_scene(sw.scene_rng(0, i))
        assert f"{colour} {shape}" not in scene.caption
        assert all((o.colour, o.shape) != sw.HELD_OUT for o in scene.objects)


def test_held_out_pair_can_be_rendered_for_textual_inversion():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scene = sw.held_out_scene(rng)
        assert "purple triangle" in scene.caption
        seen = sw.judge(sw.render(scene))
        assert [(o.colour, o.shape) for o in seen.objects] == [sw.HELD_OUT]


def test_held_out_pictures_make_a_concept_folder(tmp_path):
    paths = sw.save_held_out_images(tmp_path / "concept", n=3, seed=1)
    assert sorted(p.name for p in (tmp_path / "concept").iterdir()) == sorted(p.name for p in paths)
    for path in paths:
        image = np.asarray(Image.open(path))
        assert image.shape == (sw.IMAGE_SIZE, sw.IMAGE_SIZE, 3)
        assert [(o.colour, o.shape) for o in sw.judge(image).objects] == [sw.HELD_OUT]


@pytest.fixture(scope="module")
def tiny_models(tokenizer):
    torch.manual_seed(0)
    return shapes_train.build_models("tiny", tokenizer)


def _changed(params_before, module):
    return any(not torch.equal(a, b) for a, b in zip(params_before, module.parameters(), strict=True))


def test_one_training_step_of_the_autoencoder(tiny_models):
    vae, _, _ = tiny_models
    images, _ = sw.make_batch(0, range(2))
    assert vae.encode(images).latent_dist.mean.shape == (2, 4, 16, 16)
    before = [p.detach().clone() for p in vae.parameters()]
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    loss = shapes_train.vae_loss(vae, images, kl_weight=1e-6)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and _changed(before, vae)


def test_one_training_step_of_text_encoder_and_unet(tiny_models, tokenizer):
    vae, text_encoder, unet = tiny_models
    images, captions = sw.make_batch(0, range(2))
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample()
    before_unet = [p.detach().clone() for p in unet.parameters()]
    before_text = [p.detach().clone() for p in text_encoder.parameters()]
    optimizer = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=1e-3)
    scheduler = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    ids, empty = tokenize_prompts(tokenizer, captions), tokenize_prompts(tokenizer, [""])
    loss = shapes_train.diffusion_loss(unet, text_encoder, scheduler, latents, ids, empty, 0.1, 5.0)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert _changed(before_unet, unet) and _changed(before_text, text_encoder)


def test_min_snr_weighting_lowers_only_the_nearly_clean_timesteps(tiny_models, tokenizer):
    vae, text_encoder, unet = tiny_models
    images, captions = sw.make_batch(0, range(16))
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    scheduler = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    max_snr = float(compute_snr(scheduler, torch.tensor([0])))
    ids, empty = tokenize_prompts(tokenizer, captions), tokenize_prompts(tokenizer, [""])

    def loss(snr_gamma):
        torch.manual_seed(3)  # the same timesteps, noise and dropped captions for every gamma
        with torch.no_grad():
            return shapes_train.diffusion_loss(
                unet, text_encoder, scheduler, latents, ids, empty, 0.1, snr_gamma
            )

    plain = loss(float("inf"))
    assert loss(max_snr) == plain  # no timestep's SNR is above the cap: the plain noise loss
    assert loss(5.0) < plain  # 16 timesteps drawn: some are nearly clean (SNR > 5) and weigh less


def test_offset_noise_shifts_each_image_channel_as_a_whole():
    torch.manual_seed(0)
    latents = torch.zeros(4096, 4, 16, 16)
    for offset in (0.0, 0.3):
        noise = shapes_train.offset_noise(latents, offset)
        # A channel's mean over 256 values spreads 1/16 by itself; the shift adds offset^2 to its
        # variance and leaves the spread within the channel at 1.
        expected = (offset**2 + 1 / 256) ** 0.5
        assert noise.mean(dim=(2, 3)).std() == pytest.approx(expected, rel=0.03)
        assert (noise - noise.mean(dim=(2, 3), keepdim=True)).std() == pytest.approx(1.0, rel=0.01)


def test_unknown_preset_is_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="choose one of"):
        shapes_train.build_models("huge", tokenizer)


TINY_RUN = dict(
    preset="tiny",
    vae_steps=2,
    diffusion_steps=2,
    vae_batch_size=2,
    batch_size=2,
    warmup_steps=1,
    checkpoint_every=1,
    reconstruction_check=4,
    finetune_steps=0,
)


def _weights(pipe):
    return {
        f"{name}.{key}": value.float()
        for name in ("vae", "text_encoder", "unet")
        for key, value in getattr(pipe, name).state_dict().items()
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A whole tiny run, uninterrupted: its folder."""
    return shapes_train.train(tmp_path_factory.mktemp("whole"), shapes_train.TrainConfig(**TINY_RUN))


@pytest.fixture(scope="module")
def tiny_finetuned_run(tmp_path_factory):
    """The same, with two steps of stage 3 (fine-tuning with offset noise): its folder."""
    config = shapes_train.TrainConfig(**{**TINY_RUN, "finetune_steps": 2})
    return shapes_train.train(tmp_path_factory.mktemp("finetuned"), config)


def test_train_saves_a_pipeline_that_from_pretrained_loads(tiny_run):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_run)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe.safety_checker is None
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.vae.config.scaling_factor != 0.18215  # measured on this autoencoder's latents
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    on_disk = StableDiffusionPipeline.from_pretrained(tiny_run, torch_dtype=torch.float16)
    assert on_disk.unet.dtype == torch.float16
    assert json.loads((tiny_run.parent / "progress.json").read_text()) == {
        "step": 4,
        "checkpoint": "checkpoint-4",
    }
    assert sorted(p.name for p in tiny_run.parent.glob("checkpoint*")) == ["checkpoint-4"]


@pytest.mark.parametrize("finetune_steps", [0, 2])
def test_interrupted_training_resumes_to_the_same_model(finetune_steps, request, tmp_path, monkeypatch):
    calls = []
    real_make_batch = shapes_train.make_batch
    last_step = 3 + finetune_steps

    def make_batch_then_stop(seed, indices):
        calls.append(indices)
        # Calls: steps 0 and 1, stage 1's check (the latent scaling factor and the latents' spread),
        # then one a step: stop at the last step.
        if len(calls) == last_step + 3:
            raise KeyboardInterrupt
        return real_make_batch(seed, indices)

    config = shapes_train.TrainConfig(**{**TINY_RUN, "finetune_steps": finetune_steps})
    monkeypatch.setattr(shapes_train, "make_batch", make_batch_then_stop)
    with pytest.raises(KeyboardInterrupt):
        shapes_train.train(tmp_path, config)
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == last_step
    monkeypatch.setattr(shapes_train, "make_batch", real_make_batch)
    resumed = _weights(StableDiffusionPipeline.from_pretrained(shapes_train.train(tmp_path, config)))
    uninterrupted = request.getfixturevalue("tiny_finetuned_run" if finetune_steps else "tiny_run")
    whole = _weights(StableDiffusionPipeline.from_pretrained(uninterrupted))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], msg=key)


def test_a_run_killed_while_saving_resumes_from_the_previous_checkpoint(tiny_run, tmp_path, monkeypatch):
    real_save_state = shapes_train.Accelerator.save_state
    saves = []

    def save_then_stop(accelerator, folder):
        saves.append(folder)
        real_save_state(accelerator, folder)
        if len(saves) == 3:  # the state after step 3 is on disk, but not yet recorded as the checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(shapes_train.Accelerator, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        shapes_train.train(tmp_path, shapes_train.TrainConfig(**TINY_RUN))
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 2
    monkeypatch.setattr(shapes_train.Accelerator, "save_state", real_save_state)
    resumed = _weights(
        StableDiffusionPipeline.from_pretrained(
            shapes_train.train(tmp_path, shapes_train.TrainConfig(**TINY_RUN))
        )
    )
    for key, weight in _weights(StableDiffusionPipeline.from_pretrained(tiny_run)).items():
        torch.testing.assert_close(resumed[key], weight, msg=key)


def test_compiled_models_train_the_same_model(tiny_run, tmp_path, eager_compile):
    # The compiled text encoder and UNet keep their parameter names and compute what they did.
    compiled = shapes_train.train(tmp_path, shapes_train.TrainConfig(**TINY_RUN), compile_models=True)
    assert sorted(eager_compile) == ["CLIPTextModel", "UNet2DConditionModel"]
    whole = _weights(StableDiffusionPipeline.from_pretrained(tiny_run))
    for key, weight in _weights(StableDiffusionPipeline.from_pretrained(compiled)).items():
        torch.testing.assert_close(weight, whole[key], msg=key)


def test_worker_processes_train_the_same_model(tiny_run, tmp_path):
    with_workers = shapes_train.train(tmp_path, shapes_train.TrainConfig(**TINY_RUN), workers=2)
    whole = _weights(StableDiffusionPipeline.from_pretrained(tiny_run))
    for key, weight in _weights(StableDiffusionPipeline.from_pretrained(with_workers)).items():
        torch.testing.assert_close(weight, whole[key], msg=key)


def test_stage_one_alone_reports_its_latent_space(tmp_path, capsys):
    shapes_train.train(tmp_path, shapes_train.TrainConfig(**{**TINY_RUN, "diffusion_steps": 0}))
    assert "autoencoder done: the judge reads" in capsys.readouterr().out
    report = json.loads((tmp_path / "autoencoder.json").read_text())
    assert len(report["channel_std"]) == len(report["posterior_std"]) == shapes_train.LATENT_CHANNELS
    assert {f"noise_{level}" for level in shapes_train.LATENT_NOISE_LEVELS} <= report.keys()


@pytest.mark.parametrize("narrowest, warns", [(0.5, True), (2.0, False)])
def test_stage_one_check_warns_of_a_narrow_latent_channel(tiny_run, tmp_path, narrowest, warns):
    # The channels' spread is in scaled units: pick the scaling factor that puts the narrowest
    # channel at half, or twice, the threshold. Two steps of stage 1 reconstruct nothing, at any noise.
    vae = AutoencoderKL.from_pretrained(tiny_run, subfolder="vae", torch_dtype=torch.float32)
    config = shapes_train.TrainConfig(**{**TINY_RUN, "reconstruction_check": 1})
    unscaled = shapes_train.latent_report(vae, 1.0, 1, config.seed + shapes_train.RECONSTRUCTION_SEED_OFFSET)
    scale = narrowest * shapes_train.MIN_CHANNEL_STD / min(unscaled["channel_std"])
    lines = shapes_train.check_autoencoder(vae, scale, config, tmp_path)
    assert ("warning: a latent channel spreads less than" in lines) == warns
    report = json.loads((tmp_path / "autoencoder.json").read_text())
    assert report["noise_0.4"] < shapes_train.MIN_NOISY_READING
    assert min(report["channel_std"]) == pytest.approx(narrowest * shapes_train.MIN_CHANNEL_STD)


@pytest.mark.parametrize(
    "channel_std, reading, fragile",
    [
        ([0.12, 0.16, 1.69, 0.13], 0.17, True),  # run 15's autoencoder
        ([0.90, 0.99, 1.17, 0.12], 0.96, False),  # a narrow channel the decoder does without
        ([0.42, 0.41, 1.72, 0.42], 0.44, False),  # the shipped model's: no narrow channel
    ],
)
def test_a_latent_space_is_fragile_when_a_narrow_channel_matters(channel_std, reading, fragile):
    assert shapes_train.is_fragile({"channel_std": channel_std, "noise_0.4": reading}) == fragile


def test_resume_refuses_another_configuration(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(asdict(shapes_train.TrainConfig(**TINY_RUN))))
    with pytest.raises(ValueError, match="use a new --out"):
        shapes_train.train(tmp_path, shapes_train.TrainConfig(**{**TINY_RUN, "diffusion_steps": 3}))


def test_stage_two_can_reuse_a_trained_autoencoder(tiny_run, tmp_path):
    config = shapes_train.TrainConfig(**{**TINY_RUN, "vae_steps": 0, "vae_from": str(tiny_run)})
    reused = StableDiffusionPipeline.from_pretrained(shapes_train.train(tmp_path, config))
    trained = StableDiffusionPipeline.from_pretrained(tiny_run)
    for key, weight in trained.vae.state_dict().items():
        torch.testing.assert_close(reused.vae.state_dict()[key], weight, msg=key)
    # Measured again on the reused weights, which the folder keeps in fp16.
    assert reused.vae.config.scaling_factor == pytest.approx(trained.vae.config.scaling_factor, rel=1e-2)
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 2


def test_stage_two_can_start_from_a_trained_text_encoder_and_unet(tiny_run, tmp_path):
    # At learning rate 0 the fine-tuned weights are the starting ones, to the bit (fp16 both ways).
    config = shapes_train.TrainConfig(
        **{**TINY_RUN, "vae_steps": 0, "vae_from": str(tiny_run), "denoiser_from": str(tiny_run)},
        diffusion_lr=0.0,
    )
    tuned = _weights(StableDiffusionPipeline.from_pretrained(shapes_train.train(tmp_path, config)))
    for key, weight in _weights(StableDiffusionPipeline.from_pretrained(tiny_run)).items():
        assert torch.equal(tuned[key], weight), key


def test_fine_tuning_starts_from_the_averaged_weights_of_stage_two(tiny_run, tiny_finetuned_run, tmp_path):
    # At learning rate 0, stage 3 keeps what it starts from: stage 2's EMA weights, which are what a
    # run without stage 3 saves (to the bit, fp16 both ways); at its learning rate it moves them.
    config = shapes_train.TrainConfig(**{**TINY_RUN, "finetune_steps": 2, "finetune_lr": 0.0})
    frozen = _weights(StableDiffusionPipeline.from_pretrained(shapes_train.train(tmp_path, config)))
    tuned = _weights(StableDiffusionPipeline.from_pretrained(tiny_finetuned_run))
    for key, weight in _weights(StableDiffusionPipeline.from_pretrained(tiny_run)).items():
        assert torch.equal(frozen[key], weight), key
    assert not torch.equal(tuned["unet.conv_in.weight"], frozen["unet.conv_in.weight"])


def test_clipped_stage_one_gradients_barely_move_the_autoencoder(tiny_run, tmp_path):
    # Adam steps by about the learning rate whatever the gradient's scale, unless the gradient falls
    # far below its eps: clipped to a norm of 1e-12, stage 1 leaves the autoencoder nearly where it
    # started (at learning rate 0), while the unclipped run moves it.
    def autoencoder(folder):
        weights = _weights(StableDiffusionPipeline.from_pretrained(folder))
        return {key: weight for key, weight in weights.items() if key.startswith("vae.")}

    def moved(folder):
        return sum((weight - start[key]).abs().sum() for key, weight in autoencoder(folder).items())

    start = autoencoder(
        shapes_train.train(tmp_path / "start", shapes_train.TrainConfig(**TINY_RUN, vae_lr=0.0))
    )
    config = shapes_train.TrainConfig(**TINY_RUN, vae_max_grad_norm=1e-12)
    clipped = shapes_train.train(tmp_path / "clipped", config)
    assert moved(clipped) < 0.01 * moved(tiny_run)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(vae_steps=0), "--vae-steps N or --vae-from FOLDER"),
        (dict(checkpoint_every=0), "at least 1"),
        (dict(vae_steps=0, vae_from="/nonexistent"), "--vae-from /nonexistent: give a pipeline folder"),
        (dict(denoiser_from="/nonexistent"), "--denoiser-from /nonexistent: give a pipeline folder"),
    ],
)
def test_settings_that_cannot_train_are_refused(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        shapes_train.train(tmp_path, shapes_train.TrainConfig(**{**TINY_RUN, **overrides}))
    assert not (tmp_path / "config.json").exists()


def test_reusing_an_autoencoder_refuses_autoencoder_steps(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="--vae-steps 0"):
        shapes_train.train(tmp_path, shapes_train.TrainConfig(**{**TINY_RUN, "vae_from": str(tiny_run)}))
