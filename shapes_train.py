"""Train the Shapes World model: Stable Diffusion's architecture, small, from scratch, at 64x64.

Three parts, in up to three stages of one run:
  1. an AutoencoderKL that maps a 64x64 image to a 16x16x4 latent (squared-error reconstruction
     plus Stable Diffusion's tiny KL term);
  2. a CLIPTextModel (small, read with the real CLIP tokenizer) and a UNet2DConditionModel with
     cross-attention, trained together to predict the noise of SD's schedule on the frozen
     autoencoder's latents, the caption dropped 10% of the time for classifier-free guidance;
  3. the same two fine-tuned from stage 2's averaged weights with offset noise
     at a lower learning rate, so that the background follows the caption, not the noise.
The data (shapes_world.py) is drawn on the fly: batch k of the run is items k*B..(k+1)*B-1 of
the data set, so an interrupted run resumes on exactly the batches it had not seen.

The run saves its state (weights, optimisers, learning-rate schedules, EMA, RNG) to DIR/checkpoint-STEP
every --checkpoint-every steps and resumes from it when started again with the same --out; at
the end it writes a standard diffusers pipeline folder, DIR/pipeline, in fp16 safetensors.

    python shapes_train.py --out outputs/shapes_run     # the shipped model's recipe (docs/shapes_world.md)
    python shapes_train.py --out outputs/smoke --preset tiny --vae-steps 5 --diffusion-steps 5 \\
        --finetune-steps 5                                      # a smoke run, under a minute
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import cli

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from offline_models import (
    SD_SCHEDULER_CONFIG,
    assemble_pipeline,
    make_clip_text_encoder,
    offline_clip_tokenizer,
)
from ptp_utils import tokenize_prompts
from shapes_world import IMAGE_SIZE, judge_accuracy, make_batch, to_tensor, to_uint8

LATENT_SIZE = 16
LATENT_CHANNELS = 4
# Offsets of the run's seed for the data streams outside training, so that none repeats a batch.
SCALING_SEED_OFFSET, RECONSTRUCTION_SEED_OFFSET = 1, 2
SCALING_BATCH = 256  # images whose latents set the VAE's scaling_factor (SD: 0.18215, found the same way)
# Stage 1's check reads reconstructions from latents off by these many standard deviations, as a
# diffusion model's samples are, and the spread of each latent channel. The log's two weak models
# stood on autoencoders with a channel narrower than MIN_CHANNEL_STD whose decoders misread most
# objects at latent noise 0.4 (runs 12 and 15: smallest stds 0.18 and 0.12, 30% and 17% read right;
# adherence 40% and 45%). Those of runs 4 (reused by runs 6, 8, 9), 14 and 16 have no narrow
# channel (0.38, 0.41, 0.78) and gave 84-94%. A narrow channel alone is no harm where the decoder
# reads the picture from the others (a clipped stage 1 of seed 5: 0.12, and 96% read right at 0.4;
# docs/shapes_runs.md): the diffusion model's error drowns only what such a channel holds.
LATENT_NOISE_LEVELS = (0.0, 0.2, 0.4)
MIN_CHANNEL_STD = 0.25
MIN_NOISY_READING = 0.5  # at latent noise 0.4
# Reading the loss waits for the GPU; every step, that keeps the CPU from queueing the next one.
LOSS_DISPLAY_EVERY = 25
# Model sizes. "default" is the shipped model; "tiny" is for tests and smoke runs.
PRESETS = {
    "default": dict(
        vae=dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8),
        text=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4),
        unet=dict(
            block_out_channels=(32, 64, 128),
            layers_per_block=1,
            norm_num_groups=16,
            attention_head_dim=1,  # heads: a full-run step takes 0.76 s on 2 CPU cores, 1.00 s with 4
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        ),
    ),
    "tiny": dict(
        vae=dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=8),
        text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        unet=dict(
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
    ),
}


@dataclass
class TrainConfig:
    """Everything that defines a run; saved next to its checkpoint."""

    preset: str = "default"
    vae_steps: int = 2500
    diffusion_steps: int = 5600  # adherence 14, 24, 84% at 1,400, 2,800, 5,600 steps (docs/shapes_runs.md)
    vae_batch_size: int = 16
    batch_size: int = 32
    vae_lr: float = 2e-3
    vae_max_grad_norm: float = 0.0  # stage 1's gradient clipping threshold; 0: none
    diffusion_lr: float = 1e-3
    warmup_steps: int = 100
    kl_weight: float = 1e-3
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    noise_offset: float = 0.0  # stage 2's; runs 8 and 9 (fine-tuning runs) used 0.3
    finetune_steps: int = 5400  # stage 3: from stage 2's EMA weights, fresh optimizer and EMA; 0: none
    finetune_lr: float = 3e-4
    finetune_noise_offset: float = 0.3
    ema_max_decay: float = 0.999
    checkpoint_every: int = 250
    reconstruction_check: int = 200  # images whose reconstructions the judge reads after stage 1
    seed: int = 0
    vae_from: str = ""  # a pipeline folder whose autoencoder stage 2 reuses, instead of stage 1
    denoiser_from: str = ""  # a pipeline folder whose text encoder and UNet stage 2 fine-tunes


# The command line: each TrainConfig field is a flag, with its range (an argparse type) and help.
CONFIG_FLAGS = {
    "preset": (str, "model sizes: default (the shipped model) or tiny (tests and smoke runs)"),
    "vae_steps": (cli.non_negative_int, "stage 1 steps (the autoencoder); 0 with --vae-from"),
    "diffusion_steps": (cli.non_negative_int, "stage 2 steps (text encoder and UNet)"),
    "vae_batch_size": (cli.positive_int, "images per stage 1 step"),
    "batch_size": (cli.positive_int, "images per stage 2 and stage 3 step"),
    "vae_lr": (cli.non_negative_float, "stage 1's peak learning rate (cosine schedule)"),
    "vae_max_grad_norm": (cli.non_negative_float, "stage 1's gradient clipping threshold; 0: none"),
    "diffusion_lr": (cli.non_negative_float, "stage 2's peak learning rate (cosine schedule)"),
    "warmup_steps": (
        cli.non_negative_int,
        "steps of linear learning-rate warm-up at the start of each stage",
    ),
    "kl_weight": (cli.non_negative_float, "weight of stage 1's KL term (Stable Diffusion: 1e-6)"),
    "caption_dropout": (
        cli.fraction,
        "share of captions replaced by the empty one, for classifier-free guidance",
    ),
    "snr_gamma": (cli.positive_float, "min-SNR loss weighting: the cap on a timestep's weight"),
    "noise_offset": (cli.non_negative_float, "stage 2's offset noise (standard deviation of the shift)"),
    "finetune_steps": (
        cli.non_negative_int,
        "stage 3 steps (fine-tuning from stage 2's averaged weights, with offset noise); 0: none",
    ),
    "finetune_lr": (cli.non_negative_float, "stage 3's peak learning rate (cosine schedule)"),
    "finetune_noise_offset": (cli.non_negative_float, "stage 3's offset noise"),
    "ema_max_decay": (cli.fraction, "highest decay of the weights' moving average, which the pipeline gets"),
    "checkpoint_every": (cli.positive_int, "steps between checkpoints"),
    "reconstruction_check": (
        cli.non_negative_int,
        "images whose reconstructions the judge reads after stage 1; 0: no check",
    ),
    "seed": (int, "seed of the weights and of the data set's items"),
    "vae_from": (
        str,
        "a pipeline folder whose autoencoder stage 2 reuses, instead of stage 1 (default: none)",
    ),
    "denoiser_from": (
        str,
        "a pipeline folder whose text encoder and UNet stage 2 fine-tunes (default: fresh ones)",
    ),
}


def build_models(
    preset: str, tokenizer: CLIPTokenizer
) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """The three parts, with Stable Diffusion's classes and wiring, at the preset's size."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    sizes = PRESETS[preset]
    levels = len(sizes["vae"]["block_out_channels"])
    if IMAGE_SIZE // 2 ** (levels - 1) != LATENT_SIZE:
        raise ValueError(
            f"the VAE needs {levels} levels to map {IMAGE_SIZE}px images to {LATENT_SIZE}px latents"
        )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        mid_block_add_attention=False,  # at 16x16 it costs more time than flat shapes need
        **sizes["vae"],
    )
    text_encoder = make_clip_text_encoder(tokenizer, **sizes["text"])
    unet = UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        cross_attention_dim=sizes["text"]["hidden_size"],
        **sizes["unet"],
    )
    return vae, text_encoder, unet


class Stage(NamedTuple):
    """One stage of a run: its steps, the parameters it trains, its peak learning rate and offset noise."""

    steps: int
    params: list[torch.nn.Parameter]
    lr: float
    noise_offset: float


class TrainingBatches(torch.utils.data.Dataset):
    """Item k is what step k of a run trains on: items k*B..(k+1)*B-1 of the data set, B the stage's
    batch size, as images and the captions' token ids.

    Steps index the data, so an interrupted run resumes on exactly the batches it had not seen, and
    a DataLoader's worker processes can draw batches ahead of the model (on a GPU the drawing and
    the tokenizing, not the model, would otherwise set the pace).
    """

    def __init__(self, config: TrainConfig, tokenizer: CLIPTokenizer):
        self.config, self.tokenizer = config, tokenizer

    def __len__(self) -> int:
        return self.config.vae_steps + self.config.diffusion_steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.config.vae_batch_size if step < self.config.vae_steps else self.config.batch_size
        images, captions = make_batch(self.config.seed, range(step * size, (step + 1) * size))
        return images, tokenize_prompts(self.tokenizer, captions)


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Stage 1: reconstruct the images through a sampled latent, with a small pull towards N(0, 1).

    Both terms are summed over each image, as in Stable Diffusion's autoencoder. The KL weight
    sets how much noise the posterior carries, and so how far off a latent may be before the
    decoder draws another picture (bench/shapes_autoencoder.py; docs/shapes_world.md, "Training"): at
    SD's 1e-6 the decoder misreads over half the objects once the latent is off by 0.2 of its spread, well
    within a small diffusion model's error; at 1e-3, the default, it still reads 89% right there
    (with it and a diffusion learning rate of 1e-3, a full run's adherence rose from 14% to 24%);
    with the error averaged over pixels (a KL weight 12,288 times larger) three of the four
    channels collapse to noise.
    Squared error rather than SD's L1: L1 pulls equally on every pixel, so that the flat
    background, already right, drowns out the small objects that are not.
    """
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample()).sample
    squared_error = (reconstruction - images).pow(2).sum(dim=(1, 2, 3))
    return (squared_error + kl_weight * posterior.kl()).mean()


def offset_noise(latents: torch.Tensor, offset: float) -> torch.Tensor:
    """Gaussian noise shaped like the latents, each image's channels shifted by N(0, offset^2).

    Offset noise (Guttenberg 2023; diffusers' train_text_to_image --noise_offset). SD's schedule
    keeps sqrt(alpha_bar) = 0.068 of the image at t = 999, so that a latent channel's mean (here
    the background: one channel's image means spread 1.34) shows through the noise; a model
    trained on that takes the background from the mean of its starting noise, not from the
    caption (run 6 drew the seed's background for 5 in 6 of "on a white background"). A shift of
    0.3, against the 1/16 spread of the mean of 16x16 noise values, leaves that mean telling next
    to nothing about the image. Trained with it from the start (run 7) the model drew every
    captioned background but fewer of the captioned objects, so the shipped model had it only in
    a fine-tuning stage (runs 8 and 9).
    """
    noise = torch.randn_like(latents)
    return noise + offset * torch.randn(*latents.shape[:2], 1, 1, device=latents.device, dtype=latents.dtype)


def diffusion_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    noise_scheduler: DDPMScheduler,
    latents: torch.Tensor,
    input_ids: torch.Tensor,
    empty_ids: torch.Tensor,
    caption_dropout: float,
    snr_gamma: float,
    noise_offset: float = 0.0,
) -> torch.Tensor:
    """Stage 2: the noise-prediction loss at a random timestep; dropped captions become "" (empty_ids)."""
    dropped = torch.rand(len(input_ids), device=input_ids.device) < caption_dropout
    input_ids = torch.where(dropped[:, None], empty_ids, input_ids)
    noise = offset_noise(latents, noise_offset)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=latents.device
    )
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    context = text_encoder(input_ids)[0]
    squared_error = (unet(noisy, timesteps, context).sample - noise).pow(2).mean(dim=(1, 2, 3))
    # The noise loss is the clean-latent loss weighted by the timestep's SNR; min-SNR weighting
    # (Hang et al. 2023) caps that weight at snr_gamma, so that the nearly clean timesteps (fine
    # detail) stop dominating the gradient of the noisy ones (layout, shape and colour).
    snr = compute_snr(noise_scheduler, timesteps)
    return (squared_error * snr.clamp(max=snr_gamma) / snr).mean()


def freeze_autoencoder(vae: AutoencoderKL, seed: int) -> float:
    """Stage 1 is over: the autoencoder stops learning; returns its latent scaling factor."""
    vae.requires_grad_(False).eval()
    return latent_scaling_factor(vae, seed)


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, seed: int) -> float:
    """1 / std of the latents, so that the diffusion model sees unit-variance data (SD's 0.18215)."""
    images, _ = make_batch(seed + SCALING_SEED_OFFSET, range(SCALING_BATCH))
    # Its own generator, so that a resumed run finds the same factor as an uninterrupted one.
    generator = torch.Generator(vae.device).manual_seed(seed)
    return float(1 / vae.encode(images.to(vae.device)).latent_dist.sample(generator).std())


@torch.no_grad()
def latent_report(
    vae: AutoencoderKL,
    scaling_factor: float,
    judged_images: int,
    seed: int,
    noise_levels: tuple[float, ...] = LATENT_NOISE_LEVELS,
) -> dict:
    """How much error the autoencoder's latent space tolerates (stage 1's check).

    channel_std: the spread of each channel of the scaled latents over 256 images (near 0: it carries
    nothing); posterior_std: the encoder's mean posterior spread per channel (near 1: collapsed to the
    prior, pure noise); noise_<s>: the share of objects the judge reads right in reconstructions of
    `judged_images` items of data-set `seed` whose scaled latents got Gaussian noise of s standard
    deviations before decoding (noise_0.0: plain reconstructions).
    """
    images, _ = make_batch(seed, range(SCALING_BATCH))
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    report = {
        "channel_std": (posterior.mean * scaling_factor).std(dim=(0, 2, 3)).tolist(),
        "posterior_std": (posterior.std * scaling_factor).mean(dim=(0, 2, 3)).tolist(),
    }
    generator = torch.Generator().manual_seed(seed)
    for level in noise_levels:

        def reconstruct(batch: np.ndarray, level: float = level) -> np.ndarray:
            latents = vae.encode(to_tensor(batch).to(vae.device, vae.dtype)).latent_dist.mean
            noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
            return to_uint8(vae.decode(latents + level / scaling_factor * noise).sample)

        report[f"noise_{level}"] = judge_accuracy(judged_images, seed, reconstruct)["all"]
    return report


def check_autoencoder(vae: AutoencoderKL, scaling_factor: float, config: TrainConfig, out: Path) -> str:
    """Stage 1's report (OUT/autoencoder.json) and what it means, as lines for the log."""
    report = latent_report(
        vae, scaling_factor, config.reconstruction_check, config.seed + RECONSTRUCTION_SEED_OFFSET
    )
    (out / "autoencoder.json").write_text(json.dumps(report, indent=1))
    readings = ", ".join(f"{report[f'noise_{level}']:.1%}" for level in LATENT_NOISE_LEVELS)
    levels = ", ".join(f"{level:g}" for level in LATENT_NOISE_LEVELS)
    stds = ", ".join(f"{std:.2f}" for std in report["channel_std"])
    lines = (
        f"autoencoder done: the judge reads {readings} of objects right at latent noise {levels}; "
        f"latent channel stds {stds}"
    )
    if is_fragile(report):
        lines += (
            f"\nwarning: a latent channel spreads less than {MIN_CHANNEL_STD} and under "
            f"{MIN_NOISY_READING:.0%} of objects are read right at latent noise 0.4; the training log's "
            "autoencoders like this gave weak models (docs/shapes_runs.md). To draw another, stop and "
            "start again with another --seed and --out: stage 1 is the first few minutes."
        )
    return lines


def is_fragile(report: dict) -> bool:
    """Whether a latent report looks like the weak models' autoencoders: a narrow channel that the
    decoder cannot do without (it misreads most objects once the latents are off by 0.4 std)."""
    return min(report["channel_std"]) < MIN_CHANNEL_STD and report["noise_0.4"] < MIN_NOISY_READING


def save_pipeline(pipe: StableDiffusionPipeline, folder: str | Path) -> int:
    """Write the pipeline in fp16 safetensors; returns the folder's size in bytes."""
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    # transformers loads a model in the dtype its config names, diffusers' models in fp32: name
    # fp32, so that from_pretrained(folder) without a dtype gives one consistent fp32 pipeline.
    config_file = Path(folder) / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dtype": "float32"}, indent=2))
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def report_timing(
    seconds: dict[str, list[tuple[float, float]]], config: TrainConfig, device: torch.device, path: Path
) -> None:
    """Median wall and CPU seconds per step of each stage, and the default run's length at that pace.

    The projection uses CPU seconds: on a machine with as many free cores as this process's
    threads, a run takes at most that long (less where the threads work in parallel).
    """
    report = {
        "preset": config.preset,
        "vae_batch_size": config.vae_batch_size,
        "batch_size": config.batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    for stage, times in seconds.items():
        if times:
            report[f"{stage}_wall_s"] = statistics.median(wall for wall, _ in times)
            report[f"{stage}_cpu_s"] = statistics.median(cpu for _, cpu in times)
    denoiser_cpu_s = report.get("diffusion_cpu_s", report.get("finetune_cpu_s"))
    if "vae_cpu_s" in report and denoiser_cpu_s:
        default = TrainConfig()
        denoiser_steps = default.diffusion_steps + default.finetune_steps  # the same step, another schedule
        report["default_run_cpu_minutes"] = (
            default.vae_steps * report["vae_cpu_s"] + denoiser_steps * denoiser_cpu_s
        ) / 60
    path.write_text(json.dumps(report, indent=1))
    print("timing:", json.dumps(report))


def save_checkpoint(accelerator: Accelerator, out: Path, step: int) -> None:
    """Save the run's state after `step` steps to out/checkpoint-STEP, then record it in out/progress.json.

    The record is replaced in one rename after the folder is complete, and only then is the previous
    folder deleted: a run killed while saving resumes from the previous checkpoint, never from a
    half-written one or from a new state under an old step.
    """
    progress_file = out / "progress.json"
    previous = json.loads(progress_file.read_text())["checkpoint"] if progress_file.exists() else None
    folder = f"checkpoint-{step}"
    accelerator.save_state(out / folder)
    partial = out / "progress.json.partial"
    partial.write_text(json.dumps({"step": step, "checkpoint": folder}))
    os.replace(partial, progress_file)
    if previous not in (None, folder):
        shutil.rmtree(out / previous)


def check_run(out: str | Path, config: TrainConfig) -> None:
    """Refuse, before anything is written, settings that cannot train and an --out that holds another run.

    The messages name the command line's flags.
    """
    if not config.vae_steps and not config.vae_from:
        raise ValueError("stage 2 needs a trained autoencoder: give --vae-steps N or --vae-from FOLDER")
    if config.vae_from and config.vae_steps:
        raise ValueError("--vae-from reuses a trained autoencoder: set --vae-steps 0")
    if config.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be at least 1 step, got {config.checkpoint_every}")
    for flag, folder, parts in (
        ("--vae-from", config.vae_from, ("vae",)),
        ("--denoiser-from", config.denoiser_from, ("text_encoder", "unet")),
    ):
        if folder and not all((Path(folder) / part).is_dir() for part in parts):
            raise ValueError(
                f"{flag} {folder}: give a pipeline folder, one with {'/ and '.join(parts)}/ in it"
            )
    config_file = Path(out) / "config.json"
    if config_file.exists() and json.loads(config_file.read_text()) != asdict(config):
        raise ValueError(f"{out} holds a run with another configuration ({config_file}): use a new --out")


def train(
    out: str | Path,
    config: TrainConfig,
    mixed_precision: str = "no",
    workers: int = 0,
    compile_models: bool = False,
) -> Path:
    """Stage 1 (autoencoder), stage 2 (text encoder and UNet), stage 3 (their fine-tuning with offset
    noise); resumes from the checkpoint that out/progress.json names.

    `workers` DataLoader processes draw the batches ahead of the model (0: in this process).
    `compile_models` runs the text encoder and UNet through torch.compile: on a GPU a step of this small
    model is bound by the CPU launching kernels, and compiling fuses many of them into one.
    """
    check_run(out, config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_file, progress_file = out / "config.json", out / "progress.json"
    config_file.write_text(json.dumps(asdict(config), indent=1))

    accelerator = Accelerator(mixed_precision=mixed_precision)
    torch.manual_seed(config.seed)
    tokenizer = offline_clip_tokenizer()
    vae, text_encoder, unet = build_models(config.preset, tokenizer)
    if config.vae_from:
        trained = AutoencoderKL.from_pretrained(config.vae_from, subfolder="vae", torch_dtype=torch.float32)
        vae.load_state_dict(trained.state_dict())
    if config.denoiser_from:
        folder, fp32 = config.denoiser_from, torch.float32
        trained_text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=fp32)
        trained_unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=fp32)
        text_encoder.load_state_dict(trained_text.state_dict())
        unet.load_state_dict(trained_unet.state_dict())
    denoiser_params = [*unet.parameters(), *text_encoder.parameters()]
    stages = {
        "vae": Stage(config.vae_steps, list(vae.parameters()), config.vae_lr, 0.0),
        "diffusion": Stage(config.diffusion_steps, denoiser_params, config.diffusion_lr, config.noise_offset),
        "finetune": Stage(
            config.finetune_steps, denoiser_params, config.finetune_lr, config.finetune_noise_offset
        ),
    }
    # One fused kernel per update instead of a dozen ops per tensor: 50 of a stage-2 step's 750 ms on
    # 2 CPU cores, most of it for the text encoder's 49,408-row embedding.
    optimizers = {name: torch.optim.AdamW(s.params, lr=s.lr, fused=True) for name, s in stages.items()}
    schedules = {
        name: get_cosine_schedule_with_warmup(optimizers[name], config.warmup_steps, s.steps)
        for name, s in stages.items()
    }
    vae, text_encoder, unet, *prepared = accelerator.prepare(
        vae, text_encoder, unet, *optimizers.values(), *schedules.values()
    )
    optimizers, schedules = (
        dict(zip(stages, prepared[: len(stages)])),
        dict(zip(stages, prepared[len(stages) :])),
    )

    def fresh_ema() -> EMAModel:
        # foreach: a few multi-tensor kernels per update on a GPU, not three per tensor.
        return EMAModel(denoiser_params, decay=config.ema_max_decay, use_ema_warmup=True, foreach=True)

    ema = fresh_ema()  # on the parameters' device
    accelerator.register_for_checkpointing(ema)
    noise_scheduler = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    if compile_models:
        # In place, so that parameter names, checkpoints and the saved folder stay as without it.
        text_encoder.compile()
        unet.compile()

    start = 0
    if progress_file.exists():
        progress = json.loads(progress_file.read_text())
        accelerator.load_state(out / progress["checkpoint"])
        ema.to(accelerator.device)  # EMAModel.load_state_dict leaves the averages on the CPU
        start = progress["step"]
    first_finetune_step = config.vae_steps + config.diffusion_steps
    total = first_finetune_step + config.finetune_steps
    batches = torch.utils.data.DataLoader(
        TrainingBatches(config, tokenizer),
        batch_size=None,  # each item is a whole batch
        sampler=range(start, total),
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        generator=torch.Generator(),  # leaves the global RNG, which checkpoints save, untouched
    )
    empty_ids = tokenize_prompts(tokenizer, [""]).to(accelerator.device)
    bar = tqdm(
        batches,
        initial=start,
        total=total,
        desc="shapes",
        disable=not accelerator.is_main_process,
    )
    scaling_factor = None
    # Wall and CPU seconds per step (drawing the batch included, checkpointing not), to plan runs.
    # On a shared machine the CPU seconds (all threads) are the better measure: the process's own
    # work, not its waiting.
    seconds = {name: [] for name in stages}
    started = time.perf_counter(), time.process_time()
    for step, (images, input_ids) in enumerate(bar, start):
        images = images.to(accelerator.device, non_blocking=True)
        input_ids = input_ids.to(accelerator.device, non_blocking=True)
        stage = (
            "vae" if step < config.vae_steps else "diffusion" if step < first_finetune_step else "finetune"
        )
        if stage == "vae":
            with accelerator.autocast():
                loss = vae_loss(vae, images, config.kl_weight)
        else:
            if step == first_finetune_step and step > config.vae_steps:
                # Fine-tuning starts from the averaged weights, which is what stage 2 would have
                # saved, with a fresh average (as runs 8 and 9 did from a saved folder).
                ema.copy_to(denoiser_params)
                ema.load_state_dict(fresh_ema().state_dict())
            if scaling_factor is None:  # a reused autoencoder, or a run resumed after stage 1
                scaling_factor = freeze_autoencoder(vae, config.seed)
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample() * scaling_factor
            with accelerator.autocast():
                loss = diffusion_loss(
                    unet,
                    text_encoder,
                    noise_scheduler,
                    latents,
                    input_ids,
                    empty_ids,
                    config.caption_dropout,
                    config.snr_gamma,
                    stages[stage].noise_offset,
                )
        accelerator.backward(loss)
        if stage == "vae" and config.vae_max_grad_norm:
            accelerator.clip_grad_norm_(stages["vae"].params, config.vae_max_grad_norm)
        optimizers[stage].step()
        schedules[stage].step()
        optimizers[stage].zero_grad()
        if stage != "vae":
            ema.step(denoiser_params)
        elif step + 1 == config.vae_steps:
            scaling_factor = freeze_autoencoder(vae, config.seed)
            if config.reconstruction_check:
                bar.write(check_autoencoder(vae, scaling_factor, config, out))
        if (step + 1) % LOSS_DISPLAY_EVERY == 0:
            bar.set_postfix(stage=stage, loss=f"{loss.item():.4f}", refresh=False)
        seconds[stage].append((time.perf_counter() - started[0], time.process_time() - started[1]))
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == total:
            save_checkpoint(accelerator, out, step + 1)
        started = time.perf_counter(), time.process_time()

    report_timing(seconds, config, accelerator.device, out / "timing.json")
    if scaling_factor is None:  # resumed after the last step: nothing left to train
        scaling_factor = latent_scaling_factor(vae, config.seed)
    vae, text_encoder, unet = (accelerator.unwrap_model(m) for m in (vae, text_encoder, unet))
    ema.copy_to(denoiser_params)
    vae.register_to_config(scaling_factor=scaling_factor)
    folder = out / "pipeline"
    size = save_pipeline(assemble_pipeline(vae, text_encoder, unet, tokenizer), folder)
    print(f"saved {folder} ({size / 2**20:.1f} MiB, latent scaling factor {scaling_factor:.4f})")
    return folder


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", required=True, help="run folder: checkpoint, then the pipeline in OUT/pipeline"
    )
    parser.add_argument(
        "--threads",
        type=cli.positive_int,
        default=torch.get_num_threads(),
        help="CPU threads; on a CPU shared with other jobs 1 is much faster than 2",
    )
    parser.add_argument(
        "--mixed-precision",
        default="no",
        choices=["no", "fp16", "bf16"],
        help="autocast on a GPU (accelerate)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the text encoder and UNet (on a GPU; minutes to compile on a CPU)",
    )
    parser.add_argument(
        "--workers",
        type=cli.non_negative_int,
        default=0,
        help="DataLoader processes that draw batches ahead of the model: 0 on a CPU, 8 or more on a GPU",
    )
    for f in fields(TrainConfig):
        kind, help_text = CONFIG_FLAGS[f.name]
        choices = sorted(PRESETS) if f.name == "preset" else None
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_text)
    args = vars(parser.parse_args())
    args.pop("verbose")
    out, mixed_precision, workers = args.pop("out"), args.pop("mixed_precision"), args.pop("workers")
    compile_models = args.pop("compile")
    torch.set_num_threads(args.pop("threads"))
    config = TrainConfig(**args)
    try:
        check_run(out, config)
    except ValueError as error:
        cli.usage_error(str(error))
    train(out, config, mixed_precision, workers, compile_models)


if __name__ == "__main__":
    main()
