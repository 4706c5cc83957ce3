"""Textual inversion (Gal et al. 2022): teach a frozen Stable Diffusion a new word from a few images.

Only the new token's row(s) of the text encoder's input-embedding matrix are optimised, with the
standard denoising loss; every other weight, and every other row, stays bit-identical. Training
runs through HuggingFace accelerate (mixed precision, gradient accumulation, several GPUs with
`accelerate launch textual_inversion.py ...`), checkpoints and resumes, and saves
`learned_embeds.safetensors` in the format `StableDiffusionPipeline.load_textual_inversion` reads.
On SDXL the word gets a row in both text encoders, trained together as diffusers'
textual_inversion_sdxl.py trains them, and the file holds both ("clip_l", "clip_g"): SDXL's usual
format, which `StableDiffusionXLPipeline.load_textual_inversion` reads once per encoder.

    python textual_inversion.py --images data/pokeball --token "<pokeball>" --init ball
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cli

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import make_image_grid
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

import ptp_utils

EMBEDS_FILE = "learned_embeds.safetensors"
# The keys of SDXL's embeddings file: the rows of the first (CLIP ViT-L) and second (OpenCLIP ViT-bigG)
# text encoder.
SDXL_EMBEDS_KEYS = ("clip_l", "clip_g")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# diffusers' training-script defaults for SD 1.x (there with --scale_lr off).
LEARNING_RATE = 5e-4
NUM_INVERSION_STEPS = 3000
BATCH_SIZE = 1
GRADIENT_ACCUMULATION_STEPS = 4
RESOLUTION = 512
# AdamW's decay pulls every row towards zero, gradient or not: the reason frozen rows are restored.
WEIGHT_DECAY = 1e-2
SHOW_EVERY = 500
CHECKPOINT_EVERY = 500
CHECKPOINTS_KEPT = 2
# Reading the loss makes the CPU wait for the GPU; every step, it would stop the CPU from queueing
# the next step's text-encoder work while the GPU still runs the UNet's backward pass.
LOSS_DISPLAY_EVERY = 25
VALIDATION_PROMPT = "a photo of {}"
NUM_VALIDATION_IMAGES = 4
NUM_SAMPLING_STEPS = ptp_utils.NUM_DIFFUSION_STEPS
GUIDANCE_SCALE = ptp_utils.GUIDANCE_SCALE

# The prompt templates of the original implementation (and of diffusers' training script).
OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]


@dataclass
class TextualInversionConfig:
    """Everything a textual-inversion run needs.

    Several `placeholder_tokens` learn several vectors for one concept; they follow diffusers'
    naming (see `multi_vector_tokens`), and prompts name the concept by the first one only.
    """

    target_folder: str
    placeholder_tokens: list[str]
    initializer_token: str
    max_num_target_images: int | None = None
    prompt_templates: list[str] = field(default_factory=lambda: list(OBJECT_TEMPLATES))
    learning_rate: float = LEARNING_RATE
    num_inversion_steps: int = NUM_INVERSION_STEPS
    batch_size: int = BATCH_SIZE
    gradient_accumulation_steps: int = GRADIENT_ACCUMULATION_STEPS
    mixed_precision: str = "no"  # "no", "fp16" or "bf16", as accelerate names them
    show_every: int = SHOW_EVERY  # validation images every N steps; 0 for none
    checkpoint_every: int = CHECKPOINT_EVERY
    resume_from: str | None = None  # a checkpoint folder, or "latest" in output_dir/checkpoints
    num_sampling_steps: int = NUM_SAMPLING_STEPS  # of the validation images
    seed: int = 0
    output_dir: str = "outputs/textual_inversion"
    resolution: int = RESOLUTION
    # torch.compile the UNet and text encoder: on a GPU a batch-1 step is bound by the CPU launching
    # kernels, and compiling fuses many of them into one. Minutes of compiling on a CPU.
    compile: bool = False


def multi_vector_tokens(token: str, num_vectors: int) -> list[str]:
    """The token names of a concept learned as `num_vectors` vectors: diffusers' convention.

    `load_textual_inversion` stores a (num_vectors, dim) embedding under `token` as the tokens
    `token, token_1, ..., token_{n-1}`, and the pipeline expands `token` in a prompt into all of them.
    """
    if num_vectors < 1:
        raise ValueError(f"a concept needs at least one vector, got {num_vectors}")
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


class StableDiffusionWrapper:
    """A Stable Diffusion (1.x, 2.x or SDXL) pipeline opened up into the pieces textual inversion needs.

    `tokenizers` and `text_encoders` hold the pipeline's one (SD 1.x, 2.x) or two (SDXL);
    `tokenizer` and `text_encoder` are the first.
    """

    def __init__(self, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline):
        self.pipe = pipe
        self.sdxl = ptp_utils.is_sdxl(pipe)
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if self.sdxl else [pipe.tokenizer]
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2] if self.sdxl else [pipe.text_encoder]
        self.tokenizer = pipe.tokenizer
        self.text_encoder = pipe.text_encoder
        self.vae = pipe.vae
        # The training images' size, which SDXL's time ids name; the model's own until training sets it.
        self.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.unet = pipe.unet
        # Training adds noise with the DDPM forward process of the model's own schedule; the
        # pipeline keeps its sampler for generation.
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def tokenize(self, prompt: list[str]) -> torch.Tensor:
        """Prompts -> padded token ids (batch, 77), exactly as the pipeline tokenizes them; on SDXL
        (batch, 2, 77), one row per tokenizer (they differ in their padding)."""
        ids = [
            tokenizer(
                # Expands a multi-vector placeholder `<t>` into `<t> <t>_1 ...`, as the pipeline does.
                self.pipe.maybe_convert_prompt(prompt, tokenizer),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for tokenizer in self.tokenizers
        ]
        return (torch.stack(ids, dim=1) if self.sdxl else ids[0]).to(self.text_encoder.device)

    def encode_prompt(
        self, prompt: list[str] | torch.Tensor, text_encoders: list[torch.nn.Module] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Prompts, or their ids from `tokenize`, -> the UNet's text conditioning: CLIP hidden states
        (batch, 77, dim), and None; on SDXL, as its pipeline builds them, both encoders' penultimate
        hidden states concatenated, and the added conditions (the second encoder's pooled
        embedding, the time ids of an uncropped image at the training resolution).

        `text_encoders` are the accelerate-prepared ones during training (under DDP their own forward
        is what synchronises the gradients).
        """
        ids = prompt if isinstance(prompt, torch.Tensor) else self.tokenize(prompt)
        text_encoders = text_encoders or self.text_encoders
        if not self.sdxl:
            return text_encoders[0](ids)[0], None
        outputs = [encoder(ids[:, i], output_hidden_states=True) for i, encoder in enumerate(text_encoders)]
        size = (self.resolution, self.resolution)
        time_ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, outputs[1][0].dtype, self.pipe.text_encoder_2.config.projection_dim
        )
        added_cond_kwargs = {
            "text_embeds": outputs[1][0],
            "time_ids": time_ids.to(ids.device).repeat(len(ids), 1),
        }
        return torch.cat([output.hidden_states[-2] for output in outputs], dim=-1), added_cond_kwargs

    @torch.no_grad()
    def encode_image_to_latents(self, image: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (batch, 3, H, W) -> one posterior sample of the VAE latents, scaled."""
        posterior = self.vae.encode(image.to(self.device, self.vae.dtype)).latent_dist
        return posterior.sample() * self.vae.config.scaling_factor

    def predict_noise(
        self,
        timestep_idx: torch.Tensor,
        noisy_latents: torch.Tensor,
        embeddings: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The UNet's output at training timesteps `timestep_idx` (0 ... num_train_timesteps - 1).

        Inputs are cast to the UNet's dtype: under mixed precision the frozen UNet is half
        precision while the text encoder, whose embeddings are trained, stays fp32.
        """
        dtype = self.unet.dtype
        if added_cond_kwargs is not None:
            added_cond_kwargs = {name: value.to(dtype) for name, value in added_cond_kwargs.items()}
        return self.unet(
            noisy_latents.to(dtype),
            timestep_idx,
            encoder_hidden_states=embeddings.to(dtype),
            added_cond_kwargs=added_cond_kwargs,
        ).sample

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        generator: torch.Generator | None = None,
        num_inference_steps: int = NUM_SAMPLING_STEPS,
        guidance_scale: float = GUIDANCE_SCALE,
    ) -> list[Image.Image]:
        """Generate one image per prompt with the pipeline's sampler and classifier-free guidance."""
        # After mixed-precision training the UNet and VAE are half precision and the text encoder
        # fp32, while the pipeline casts everything to the text encoder's dtype: autocast reconciles them.
        half = self.unet.dtype if self.unet.dtype != self.text_encoder.dtype else None
        with torch.autocast(self.device.type, dtype=half, enabled=half is not None):
            if self.sdxl:  # its own encode_prompt: both encoders, pooled embeddings, zeros for no negative
                return self.pipe(
                    prompts,
                    generator=generator,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                ).images
            return self.pipe(
                prompt_embeds=self.encode_prompt(prompts)[0],
                negative_prompt_embeds=self.encode_prompt([""] * len(prompts))[0],
                generator=generator,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            ).images

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> None:
        """Load a `learned_embeds.safetensors` (ours or any diffusers one) into the pipeline; on SDXL
        a file of SDXL's format, into each encoder as diffusers documents (`token` is needed)."""
        if not self.sdxl:
            self.pipe.load_textual_inversion(str(path), token=token)
            return
        embeddings = load_file(str(path))
        for key, tokenizer, text_encoder in zip(SDXL_EMBEDS_KEYS, self.tokenizers, self.text_encoders):
            self.pipe.load_textual_inversion(
                embeddings[key], token=token, text_encoder=text_encoder, tokenizer=tokenizer
            )


def center_crop_transform(resolution: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> (3, resolution, resolution) tensor in [-1, 1]: shorter side resized, centre cropped."""

    def transform(image: Image.Image) -> torch.Tensor:
        scale = resolution / min(image.size)
        width, height = (
            max(resolution, round(image.width * scale)),
            max(resolution, round(image.height * scale)),
        )
        image = image.resize((width, height), Image.Resampling.BICUBIC)
        left, top = (width - resolution) // 2, (height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(pixels).permute(2, 0, 1)

    return transform


class UnlabeledImageFolderDataset(torch.utils.data.Dataset):
    """The few images of the concept: every jpg/png/webp of a folder, as RGB tensors.

    Files are read once, here: an unreadable one is skipped with a warning, and the folder must
    leave at least one image.
    """

    def __init__(
        self,
        folder: str | Path,
        max_num_images: int | None = None,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Image folder {folder} does not exist: give a folder of 3-10 pictures of your concept."
            )
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise ValueError(
                f"No images in {folder}: add 3-10 pictures of your concept ({', '.join(IMAGE_EXTENSIONS)})."
            )
        self.images = []
        for path in paths:
            if max_num_images is not None and len(self.images) == max_num_images:
                break
            try:
                with Image.open(path) as image:
                    self.images.append(image.convert("RGB"))
            except OSError as error:
                warnings.warn(f"Skipping unreadable image {path}: {error}", stacklevel=2)
        if not self.images:
            raise ValueError(f"None of the {len(paths)} image files in {folder} could be read.")
        self.transform = transform or center_crop_transform(RESOLUTION)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.images[index])


def compute_standard_diffusion_loss(
    wrapper: StableDiffusionWrapper,
    latents: torch.Tensor,
    timestep_idx: torch.Tensor | None,
    embeddings: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The denoising loss: noise the latents at random timesteps, regress the noise.

    `timestep_idx` None samples one uniform training timestep per latent. The target is the
    noise, or the velocity for a v-prediction model (SD 2.x).
    """
    scheduler = wrapper.scheduler
    if timestep_idx is None:
        timestep_idx = torch.randint(
            scheduler.config.num_train_timesteps, (len(latents),), device=latents.device
        )
    timestep_idx = timestep_idx.to(latents.device)
    noise = torch.randn_like(latents)
    noisy_latents = scheduler.add_noise(latents, noise, timestep_idx)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timestep_idx)
    else:
        target = noise
    prediction = wrapper.predict_noise(timestep_idx, noisy_latents, embeddings, added_cond_kwargs)
    return F.mse_loss(prediction.float(), target.float())


def check_placeholder_tokens(tokenizer: PreTrainedTokenizerBase, placeholder_tokens: list[str]) -> None:
    """Reject placeholders that would clash with the vocabulary or break diffusers' multi-vector naming."""
    if not placeholder_tokens:
        raise ValueError("Give at least one placeholder token, e.g. ['<my-thing>'].")
    expected = multi_vector_tokens(placeholder_tokens[0], len(placeholder_tokens))
    if placeholder_tokens != expected:
        raise ValueError(
            f"Several vectors for one concept follow diffusers' names: {expected}, not {placeholder_tokens}; "
            "use multi_vector_tokens(token, n)."
        )
    for token in placeholder_tokens:
        if token != token.lower():
            raise ValueError(f"CLIP's tokenizer lowercases prompts: use {token.lower()!r}, not {token!r}.")
        # One existing token (a word like "dog", or a token added before) would change its meaning everywhere.
        if len(tokenizer.tokenize(token)) == 1:
            raise ValueError(
                f"Placeholder {token!r} is already in the tokenizer's vocabulary: "
                "pick a new string such as '<my-thing>'."
            )


def check_prompt_templates(prompt_templates: list[str]) -> None:
    """Reject an empty list, and templates without the {} where the placeholder goes."""
    # A template without the placeholder trains nothing, silently.
    unusable = [template for template in prompt_templates if "{}" not in template]
    if unusable or not prompt_templates:
        raise ValueError(
            f"Every prompt template needs {{}} where the placeholder goes, e.g. 'a photo of a {{}}'; "
            f"got {unusable or 'none'}."
        )


def initializer_token_id(tokenizer: PreTrainedTokenizerBase, initializer_token: str) -> int:
    """The id of the word the placeholder starts from; it must be a single token."""
    ids = tokenizer.encode(initializer_token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"The initializer {initializer_token!r} is {len(ids)} tokens "
            f"{tokenizer.convert_ids_to_tokens(ids)}: choose a word that is a single token."
        )
    return ids[0]


def check_resolution(wrapper: StableDiffusionWrapper, resolution: int) -> None:
    """The training resolution must be a multiple of the VAE's downsampling factor."""
    factor = wrapper.pipe.vae_scale_factor
    if resolution % factor:
        raise ValueError(
            f"Resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}: "
            f"use e.g. {max(factor, resolution // factor * factor)}."
        )


def prepare_for_textual_inversion(
    wrapper: StableDiffusionWrapper, config: TextualInversionConfig
) -> torch.optim.Optimizer:
    """Add the placeholder tokens, initialise their rows, freeze the rest; return the optimizer.

    Everything is checked before the tokenizer or the text encoder is touched.
    """
    check_placeholder_tokens(wrapper.tokenizer, config.placeholder_tokens)
    check_prompt_templates(config.prompt_templates)
    initializer_id = initializer_token_id(wrapper.tokenizer, config.initializer_token)

    weights = []
    for tokenizer, text_encoder in zip(wrapper.tokenizers, wrapper.text_encoders):
        tokenizer.add_tokens(config.placeholder_tokens)
        # The new rows are overwritten below, so transformers need not fit a distribution to start them.
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        # The trained rows stay fp32 (mixed precision's master copy) whatever the pipeline's dtype:
        # the fp16 gradient scaler refuses half-precision weights, and bf16 would quantise updates of ~lr.
        text_encoder.to(torch.float32)
        weight = text_encoder.get_input_embeddings().weight
        placeholder_ids = tokenizer.convert_tokens_to_ids(config.placeholder_tokens)
        with torch.no_grad():  # SDXL's tokenizers share the vocabulary: the initializer has one id
            weight[placeholder_ids] = weight[initializer_id].clone()
        text_encoder.requires_grad_(False)
        text_encoder.get_input_embeddings().requires_grad_(True)
        weights.append(weight)

    wrapper.unet.requires_grad_(False)
    wrapper.vae.requires_grad_(False)
    # The fused kernel updates the whole (vocabulary x dim) matrix in one pass instead of a dozen.
    return torch.optim.AdamW(weights, lr=config.learning_rate, weight_decay=WEIGHT_DECAY, fused=True)


def restore_frozen_rows(weight: torch.Tensor, original: torch.Tensor, is_placeholder: torch.Tensor) -> None:
    """Put back every non-placeholder row of the embedding matrix: one masked copy, bit-exact."""
    with torch.no_grad():
        torch.where(is_placeholder, weight, original, out=weight)


def save_learned_embeds(wrapper: StableDiffusionWrapper, placeholder_tokens: list[str], path: Path) -> None:
    """Write the learned vectors as diffusers does: {first token: (num_vectors, dim) tensor}; on SDXL
    {"clip_l": first encoder's (num_vectors, dim), "clip_g": second encoder's}."""
    vectors = [
        text_encoder.get_input_embeddings()
        .weight[tokenizer.convert_tokens_to_ids(placeholder_tokens)]
        .detach()
        .float()
        .cpu()
        .contiguous()
        for tokenizer, text_encoder in zip(wrapper.tokenizers, wrapper.text_encoders)
    ]
    keys = SDXL_EMBEDS_KEYS if wrapper.sdxl else placeholder_tokens[:1]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(dict(zip(keys, vectors)), path)


def show_images(images: list[Image.Image]) -> Image.Image:
    """Lay images out in one row; displayed inline in a notebook, returned either way."""
    grid = make_image_grid(images, rows=1, cols=len(images))
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return grid
    if get_ipython() is not None:
        display(grid)
    return grid


def validation_sampling(
    wrapper: StableDiffusionWrapper, config: TextualInversionConfig, step: int
) -> list[Image.Image]:
    """Images of the concept at `step`, from a fixed seed; the grid goes to output_dir/samples."""
    prompts = [VALIDATION_PROMPT.format(config.placeholder_tokens[0])] * NUM_VALIDATION_IMAGES
    generator = torch.Generator().manual_seed(config.seed)
    images = wrapper(prompts, generator=generator, num_inference_steps=config.num_sampling_steps)
    path = Path(config.output_dir) / "samples" / f"step_{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    make_image_grid(images, rows=1, cols=len(images)).save(path)
    return images


@dataclass
class TrainingProgress:
    """The optimizer-step count, saved with accelerate's checkpoints."""

    step: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def find_checkpoint(config: TextualInversionConfig) -> Path:
    """The folder `config.resume_from` names; "latest" is the last one under output_dir/checkpoints."""
    if config.resume_from != "latest":
        path = Path(config.resume_from)
        if not path.is_dir():
            raise FileNotFoundError(f"No checkpoint folder {path} to resume from.")
        return path
    checkpoints = sorted((Path(config.output_dir) / "checkpoints").glob("step_*"))
    if not checkpoints:
        raise FileNotFoundError(
            f"No checkpoint in {config.output_dir}/checkpoints to resume from: start afresh first."
        )
    return checkpoints[-1]


def save_checkpoint(
    accelerator: Accelerator, wrapper: StableDiffusionWrapper, config: TextualInversionConfig, step: int
) -> None:
    """Embeddings, optimizer, step and RNG states (accelerate's save_state), plus the embeddings file."""
    folder = Path(config.output_dir) / "checkpoints"
    accelerator.save_state(folder / f"step_{step:06d}")
    if accelerator.is_main_process:
        save_learned_embeds(wrapper, config.placeholder_tokens, Path(config.output_dir) / EMBEDS_FILE)
        for old in sorted(folder.glob("step_*"))[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old)


def textual_inversion(wrapper: StableDiffusionWrapper, config: TextualInversionConfig) -> None:
    """Learn the placeholder embedding(s) from the images of `config.target_folder`.

    Runs on as many processes as `accelerate launch` starts; the embeddings end up in the
    wrapper's text encoder(s) and in output_dir/learned_embeds.safetensors.
    """
    check_resolution(wrapper, config.resolution)
    wrapper.resolution = config.resolution
    checkpoint = find_checkpoint(config) if config.resume_from else None
    dataset = UnlabeledImageFolderDataset(
        config.target_folder, config.max_num_target_images, center_crop_transform(config.resolution)
    )
    optimizer = prepare_for_textual_inversion(wrapper, config)

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    set_seed(config.seed, device_specific=True)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # The frozen networks run in the half precision of the mixed-precision setting, to save memory.
    for model in (wrapper.unet, wrapper.vae):
        model.to(accelerator.device)
        if model.dtype != weight_dtype:
            model.to(weight_dtype)
    *text_encoders, optimizer = accelerator.prepare(*wrapper.text_encoders, optimizer)
    if config.compile:
        # In place, so that parameter names, checkpoints and the saved embeddings stay as without it.
        wrapper.unet.compile()
        for text_encoder in text_encoders:
            text_encoder.compile()
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    weights = [text_encoder.get_input_embeddings().weight for text_encoder in wrapper.text_encoders]
    is_placeholder = torch.zeros(len(weights[0]), 1, dtype=torch.bool, device=weights[0].device)
    is_placeholder[wrapper.tokenizer.convert_tokens_to_ids(config.placeholder_tokens)] = True
    originals = [weight.detach().clone() for weight in weights]
    if checkpoint:
        accelerator.load_state(checkpoint)

    # The images never change: encode them once, and draw a fresh posterior sample each step
    # (what encoding them every step would give, without a VAE forward per step).
    with torch.no_grad():
        posterior_params = torch.cat(
            [
                wrapper.vae.encode(image[None].to(accelerator.device, weight_dtype)).latent_dist.parameters
                for image in dataset
            ]
        )
    # Tokenized once, and images, templates (and timesteps) drawn on the device: a host-to-device
    # copy in the middle of a step would make the CPU wait for the GPU, which then waits for it.
    template_ids = wrapper.tokenize([t.format(config.placeholder_tokens[0]) for t in config.prompt_templates])
    draw = dict(size=(config.batch_size,), device=accelerator.device)

    bar = tqdm(
        range(progress.step, config.num_inversion_steps),
        initial=progress.step,
        total=config.num_inversion_steps,
        disable=not accelerator.is_main_process,
    )
    for step in bar:
        total_loss = 0.0
        for _ in range(config.gradient_accumulation_steps):
            with accelerator.accumulate(*text_encoders):
                picks = torch.randint(len(dataset), **draw)
                latents = DiagonalGaussianDistribution(posterior_params[picks]).sample()
                latents = latents * wrapper.vae.config.scaling_factor
                embeddings, added_cond_kwargs = wrapper.encode_prompt(
                    template_ids[torch.randint(len(template_ids), **draw)], text_encoders
                )
                loss = compute_standard_diffusion_loss(wrapper, latents, None, embeddings, added_cond_kwargs)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                total_loss += loss.detach()
        for weight, original in zip(weights, originals):
            restore_frozen_rows(weight, original, is_placeholder)
        progress.step = step + 1
        if progress.step % LOSS_DISPLAY_EVERY == 0 or progress.step == config.num_inversion_steps:
            bar.set_postfix(loss=(total_loss / config.gradient_accumulation_steps).item())

        if config.checkpoint_every and progress.step % config.checkpoint_every == 0:
            save_checkpoint(accelerator, wrapper, config, progress.step)
        if accelerator.is_main_process and config.show_every and progress.step % config.show_every == 0:
            validation_sampling(wrapper, config, progress.step)

    # The prepared text encoders may carry an autocast forward; the pipeline gets the plain modules back.
    wrapper.text_encoders = [accelerator.unwrap_model(e, keep_fp32_wrapper=False) for e in text_encoders]
    wrapper.text_encoder = wrapper.pipe.text_encoder = wrapper.text_encoders[0]
    if wrapper.sdxl:
        wrapper.pipe.text_encoder_2 = wrapper.text_encoders[1]
    if accelerator.is_main_process:
        save_learned_embeds(wrapper, config.placeholder_tokens, Path(config.output_dir) / EMBEDS_FILE)


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--images", required=True, help="folder with 3-10 images of the concept")
    parser.add_argument("--token", required=True, help='the new word, e.g. "<my-thing>"')
    parser.add_argument("--init", required=True, help="a one-token word to start from, e.g. ball")
    parser.add_argument(
        "--model",
        default=ptp_utils.DEFAULT_MODEL_ID,
        help=f"hub id or folder, or offline: {', '.join(ptp_utils.OFFLINE_MODELS)}",
    )
    parser.add_argument(
        "--num-vectors", type=cli.positive_int, default=1, help="vectors learned for the concept"
    )
    templates = parser.add_mutually_exclusive_group()
    templates.add_argument("--style", action="store_true", help="learn a style (style prompt templates)")
    templates.add_argument(
        "--templates",
        nargs="+",
        help='prompt templates, {} for the token, e.g. "a {}" "a {} in the center" '
        "(default: the object templates, or the style ones with --style)",
    )
    parser.add_argument("--steps", type=cli.positive_int, default=NUM_INVERSION_STEPS, help="optimizer steps")
    parser.add_argument(
        "--lr", type=cli.positive_float, default=LEARNING_RATE, help="AdamW learning rate of the new rows"
    )
    parser.add_argument(
        "--batch-size", type=cli.positive_int, default=BATCH_SIZE, help="images per forward pass"
    )
    parser.add_argument(
        "--grad-accum",
        type=cli.positive_int,
        default=GRADIENT_ACCUMULATION_STEPS,
        help="forward passes whose gradients make one optimizer step",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="half precision for the frozen UNet and VAE (on a GPU)",
    )
    parser.add_argument(
        "--resolution",
        type=cli.positive_int,
        help="training resolution in pixels (default: the model's own)",
    )
    parser.add_argument(
        "--max-images",
        type=cli.positive_int,
        help="use at most this many images of the folder (default: all)",
    )
    parser.add_argument(
        "--show-every",
        type=cli.non_negative_int,
        default=SHOW_EVERY,
        help="save sample images every N steps (and at the end); 0: only at the end",
    )
    parser.add_argument(
        "--sampling-steps",
        type=cli.positive_int,
        default=NUM_SAMPLING_STEPS,
        help="denoising steps of the sample images",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=cli.non_negative_int,
        default=CHECKPOINT_EVERY,
        help="save a resumable checkpoint every N steps; 0: none",
    )
    parser.add_argument(
        "--resume",
        help='continue from a checkpoint folder, or "latest" in OUTPUT_DIR (default: start afresh)',
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the batches, noise and sample images")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet and text encoder (on a GPU)"
    )
    parser.add_argument(
        "--output-dir",
        default="outputs/textual_inversion",
        help="folder for learned_embeds.safetensors, samples/ and checkpoints/",
    )
    args = parser.parse_args()

    config = TextualInversionConfig(
        target_folder=args.images,
        placeholder_tokens=multi_vector_tokens(args.token, args.num_vectors),
        initializer_token=args.init,
        max_num_target_images=args.max_images,
        prompt_templates=args.templates or list(STYLE_TEMPLATES if args.style else OBJECT_TEMPLATES),
        learning_rate=args.lr,
        num_inversion_steps=args.steps,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        show_every=args.show_every,
        checkpoint_every=args.checkpoint_every,
        num_sampling_steps=args.sampling_steps,
        resume_from=args.resume,
        seed=args.seed,
        output_dir=args.output_dir,
        compile=args.compile,
    )
    # The user's mistakes end the script here, before anything is written; those that need only
    # the command line, before the model loads.
    with cli.user_errors("--images", FileNotFoundError, ValueError):
        UnlabeledImageFolderDataset(config.target_folder, config.max_num_target_images)
    with cli.user_errors("--templates", ValueError):
        check_prompt_templates(config.prompt_templates)
    if config.resume_from:
        with cli.user_errors("--resume", FileNotFoundError):
            find_checkpoint(config)
    # fp32 weights: accelerate casts the frozen parts for mixed precision, the trained rows stay fp32.
    with cli.user_errors("--model", OSError):
        pipe = ptp_utils.load_pipeline(args.model, device="cpu", dtype=torch.float32)
    # The sampler's own progress bar, gone once the images are there (during training it sits below
    # the training bar).
    pipe.set_progress_bar_config(desc="sample images", leave=False)
    wrapper = StableDiffusionWrapper(pipe)
    config.resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    with cli.user_errors("--token", ValueError):
        check_placeholder_tokens(pipe.tokenizer, config.placeholder_tokens)
    with cli.user_errors("--init", ValueError):
        initializer_token_id(pipe.tokenizer, config.initializer_token)
    with cli.user_errors("--resolution", ValueError):
        check_resolution(wrapper, config.resolution)

    textual_inversion(wrapper, config)
    if PartialState().is_main_process:
        if not (config.show_every and config.num_inversion_steps % config.show_every == 0):
            validation_sampling(wrapper, config, config.num_inversion_steps)
        output_dir = Path(config.output_dir)
        print(f"Embeddings: {output_dir / EMBEDS_FILE}; sample grids: {output_dir / 'samples'}")


if __name__ == "__main__":
    main()
