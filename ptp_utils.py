"""Diffusers plumbing and image helpers for Prompt-to-Prompt (Hertz et al. 2022).

The attention processors that let a controller read and edit attention, one denoising step
with classifier-free guidance, latent <-> image conversions, image grids with captions, and
the attention-map figures, and one loader for every model: a hub id, a folder, or an offline
short name (the pipelines that offline_models.py builds, and the shipped Shapes World model).

diffusers, transformers and matplotlib are imported by the functions that use them, so that
importing this module (and prompt2prompt) takes torch's time only.

    python ptp_utils.py schedulers --model shapes --prompt "a large blue star on a gray background"
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import cli

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import offline_models
from seq_aligner import MAX_NUM_WORDS, get_word_inds

if TYPE_CHECKING:  # the controllers are prompt2prompt's, which imports this module
    from diffusers import (
        AutoencoderKL,
        SchedulerMixin,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from diffusers.models.attention_processor import Attention, AttentionProcessor
    from transformers import CLIPTokenizer

    from prompt2prompt import AttentionControl, AttentionStore

DEFAULT_MODEL_ID = "CompVis/stable-diffusion-v1-4"
NUM_DIFFUSION_STEPS = 50
GUIDANCE_SCALE = 7.5  # classifier-free guidance, Stable Diffusion's usual
SHAPES_MODEL_DIR = Path(__file__).resolve().parent / "models" / "shapes"
# Short names of pipelines that need no download.
OFFLINE_MODELS = {
    "tiny": "random weights in Stable Diffusion's architecture, 32x32: proves the plumbing only",
    "sd1-random": "Stable Diffusion 1.x's full architecture with random weights, for benchmarks",
    "shapes": "the Shapes World model that shapes_train.py trains into models/shapes, 64x64",
    "sd2-tiny": "random weights in Stable Diffusion 2.x's architecture (v-prediction), 32x32",
    "sdxl-tiny": "random weights in SDXL's architecture (two text encoders, time ids), 32x32",
    "sdxl-random": "SDXL base's full architecture with random weights, for benchmarks",
}
# The pipeline classes the package runs, by the `_class_name` of a pipeline's model_index.json.
PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# The samplers of the diffusion-practice experiments (diffusers class names), from the pipeline's schedule.
SCHEDULERS = {
    "Euler": "EulerDiscreteScheduler",
    "Euler Ancestral": "EulerAncestralDiscreteScheduler",
    "DPM-Solver++": "DPMSolverMultistepScheduler",
    "DDIM": "DDIMScheduler",
    "PNDM": "PNDMScheduler",
}
SCHEDULER_GRID_STEPS = (10, 25, 50)
MIN_FONT_SIZE = 6


def is_sdxl(model: StableDiffusionPipeline | StableDiffusionXLPipeline) -> bool:
    """Whether the pipeline is SDXL's: two text encoders, a pooled embedding and time ids."""
    from diffusers import StableDiffusionXLPipeline

    return isinstance(model, StableDiffusionXLPipeline)


def tokenize_prompts(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to 77, exactly as the pipeline makes them; a prompt that does not fit is an error."""
    for prompt in prompts:
        num_tokens = len(tokenizer(prompt).input_ids)
        if num_tokens > tokenizer.model_max_length:
            raise ValueError(
                f"The prompt {prompt!r} has {num_tokens} tokens, more than the {tokenizer.model_max_length} "
                f"that the text encoder reads (start and end tokens included). Shorten it."
            )
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def load_pipeline(
    model_id: str = DEFAULT_MODEL_ID,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A Stable Diffusion (1.x, 2.x) or SDXL pipeline from the hub, a local folder, or an offline short name.

    The pipeline class is the one the model's own model_index.json names (read alike for a folder
    and a hub id), never guessed from the id. fp16 on CUDA and fp32 on CPU unless `dtype` says
    otherwise; the safety checker stays as the pipeline ships it. A model that cannot be had
    raises OSError: what failed, and the ways out.
    """
    import diffusers
    import transformers  # noqa: F401  (imported first so that silence_third_party reaches its loading bars)

    cli.silence_third_party()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if model_id == "shapes":
        if not (SHAPES_MODEL_DIR / "model_index.json").exists():
            raise OSError(
                f"No Shapes World model in {SHAPES_MODEL_DIR}: train one with the commands under "
                f'"The full run" in docs/shapes_world.md (shapes_train.py) and copy its OUT/pipeline '
                f"folder there, or pass a pipeline folder."
            )
        model_id = str(SHAPES_MODEL_DIR)
    elif model_id in offline_models.RANDOM_PIPELINES:
        model = offline_models.RANDOM_PIPELINES[model_id]()
        return model.to(device) if dtype == torch.float32 else model.to(device, dtype)
    try:
        # model_index.json, read alike for a folder and a hub id: the class, never guessed from the id;
        # another class is refused before any weights are fetched.
        class_name = diffusers.DiffusionPipeline.load_config(model_id)["_class_name"]
        if class_name in PIPELINE_CLASSES:
            model = getattr(diffusers, class_name).from_pretrained(model_id, dtype=dtype)
    except (OSError, ValueError) as error:  # ValueError: neither a folder nor a valid hub id
        folder = Path(model_id).is_dir()
        if folder:
            failure = "the folder holds no diffusers pipeline (no model_index.json)"
        else:
            failure = (
                "it is not a local folder, not in the Hugging Face cache, and the hub did not provide it"
            )
        download = "HUB_ID" if folder else model_id
        offline = ", ".join(f"'{name}'" for name in OFFLINE_MODELS)
        raise OSError(
            f"Could not load the model '{model_id}': {failure}.\n"
            f"Ways out: `hf download {download}` where there is internet (then HF_HUB_OFFLINE=1 here), "
            f"a local pipeline folder, or an offline model: {offline}."
        ) from error
    if class_name not in PIPELINE_CLASSES:
        raise OSError(
            f"The model '{model_id}' is a {class_name}; the package runs {' and '.join(PIPELINE_CLASSES)} "
            f"(Stable Diffusion 1.x, 2.x and SDXL): give one of those."
        )
    return model.to(device)


def load_pipeline_or_exit(
    model_id: str, device: str | None, dtype: torch.dtype | None = None
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """`load_pipeline` for a script: a device or model that cannot be had ends it with one line
    that names --device or --model (exit code 2)."""
    if device is not None:
        try:
            device = torch.device(device)
        except RuntimeError:
            cli.usage_error(f"--device {device}: give cpu, cuda, cuda:N or mps")
        available = {
            "cpu": True,
            "cuda": torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
            "mps": torch.backends.mps.is_available(),
        }
        if not available.get(device.type, False):
            cli.usage_error(f"--device {device}: this machine has no such device; use --device cpu")
    try:
        return load_pipeline(model_id, device, dtype)
    except OSError as error:
        cli.usage_error(f"--model {model_id}: {error}")


def check_prompt_length(tokenizer: CLIPTokenizer, prompt: str, flag: str) -> None:
    """For a script: a prompt longer than the text encoder reads ends it with one line naming `flag`."""
    num_tokens = len(tokenizer(prompt).input_ids)
    if num_tokens > tokenizer.model_max_length:
        cli.usage_error(
            f"{flag}: the prompt has {num_tokens} tokens, more than the {tokenizer.model_max_length} that "
            "the text encoder reads (start and end tokens included): shorten it"
        )


def check_sampler_steps(scheduler: SchedulerMixin, num_steps: int, name: str) -> None:
    """For a script: a step count that the sampler (`scheduler`'s class and configuration) cannot run
    ends it with one line naming --steps. PNDM without skip_prk_steps, for one, needs at least 4."""
    try:
        type(scheduler).from_config(scheduler.config).set_timesteps(num_steps)
    except ValueError:
        cli.usage_error(f"--steps {num_steps}: the {name} sampler cannot run so few steps; give more")


def image_path(value: str) -> str:
    """An argparse type: a file name whose extension names an image format PIL writes."""
    if Path(value).suffix.lower() not in Image.registered_extensions():
        raise argparse.ArgumentTypeError(f"{value!r}: give a file name with an image extension, such as .png")
    return value


# ---------------------------------------------------------------------------------------------
# Attention control: processors installed through diffusers' attention-processor API.
# ---------------------------------------------------------------------------------------------


class P2PAttnProcessor:
    """Attention of one UNet layer, with its probabilities handed to a Prompt-to-Prompt controller.

    The probabilities are materialised only when the controller asks for them at this layer and
    step, and then only for the prompts: the unconditional half of classifier-free guidance (the
    first half of the batch, unless low_resource runs it as a pass of its own) never needs them.
    Everything else runs PyTorch's fused `scaled_dot_product_attention`.
    Written for the transformer blocks of Stable Diffusion's UNet (inputs of shape (B, N, C)).
    """

    def __init__(self, controller: AttentionControl, place_in_unet: str, is_cross: bool):
        self.controller = controller
        self.place_in_unet = place_in_unet
        self.is_cross = is_cross

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """The layer's attention output; the controller sees (and may edit) the prompts' probabilities."""
        batch_size, num_queries, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch_size)

        if not self.controller.needs_attention(self.is_cross, self.place_in_unet, num_queries):
            self.controller(None, self.is_cross, self.place_in_unet)
            hidden_states = fused_attention(attn, query, key, value, attention_mask)
        else:
            split = 0 if self.controller.low_resource else batch_size // 2  # first prompt in the batch
            mask = None if attention_mask is None else attention_mask[split * attn.heads :]
            prompts_query, prompts_key, prompts_value = (
                attn.head_to_batch_dim(x[split:]) for x in (query, key, value)
            )
            attention_probs = attn.get_attention_scores(prompts_query, prompts_key, mask)
            attention_probs = self.controller(attention_probs, self.is_cross, self.place_in_unet)
            hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, prompts_value))
            if split:
                mask = None if attention_mask is None else attention_mask[: split * attn.heads]
                unconditional = fused_attention(attn, query[:split], key[:split], value[:split], mask)
                hidden_states = torch.cat([unconditional, hidden_states])
        return attn.to_out[1](attn.to_out[0](hidden_states))


def fused_attention(
    attn: Attention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Multi-head attention of projected (B, N, C) inputs with PyTorch's fused kernel, before to_out."""
    batch_size = query.shape[0]
    query, key, value = (x.unflatten(-1, (attn.heads, -1)).transpose(1, 2) for x in (query, key, value))
    if attention_mask is not None:
        attention_mask = attention_mask.unflatten(0, (batch_size, attn.heads))
    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
    return hidden_states.transpose(1, 2).flatten(2).to(query.dtype)


class AttentionControlRegistration:
    """What `register_attention_control` returns: `remove()` (or leaving a `with` block) restores
    the UNet's original attention processors."""

    def __init__(self, unet: UNet2DConditionModel, original_processors: dict[str, AttentionProcessor]):
        self.unet = unet
        self.original_processors = original_processors

    def remove(self) -> None:
        """Put the UNet's own attention processors back."""
        self.unet.set_attn_processor(dict(self.original_processors))

    def __enter__(self) -> AttentionControlRegistration:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def register_attention_control(
    model: StableDiffusionPipeline, controller: AttentionControl
) -> AttentionControlRegistration:
    """Route every attention layer of the UNet through `controller` (P2P's hook into the model).

    Each layer gets a processor that knows its place (down/mid/up) and whether it is self- or
    cross-attention (diffusers names them attn1 and attn2); the controller learns how many
    layers there are, so it can count layers and denoising steps.
    """
    original_processors = model.unet.attn_processors
    processors = {}
    for name in original_processors:
        place_in_unet = name.split("_")[0]  # "down_blocks...", "mid_block...", "up_blocks..."
        processors[name] = P2PAttnProcessor(
            controller, place_in_unet, is_cross=name.endswith("attn2.processor")
        )
    controller.num_att_layers = len(processors)
    model.unet.set_attn_processor(processors)  # empties the dict it is given
    return AttentionControlRegistration(model.unet, original_processors)


# ---------------------------------------------------------------------------------------------
# Denoising.
# ---------------------------------------------------------------------------------------------


def diffusion_step(
    model: StableDiffusionPipeline | StableDiffusionXLPipeline,
    controller: AttentionControl,
    latents: torch.Tensor,
    context: torch.Tensor,
    t: torch.Tensor,
    guidance_scale: float,
    low_resource: bool = False,
    generator: torch.Generator | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One denoising step with classifier-free guidance: z_t -> z_{t-1}.

    `context` holds the unconditional embeddings followed by the prompts' embeddings, and so do
    the values of `added_cond_kwargs` (SDXL's pooled text embeddings and time ids; None for SD 1.x
    and 2.x). With `low_resource` the two halves go through the UNet one after the other, halving
    peak memory. `generator` feeds schedulers that add noise at each step (ancestral samplers).
    """
    latent_input = model.scheduler.scale_model_input(torch.cat([latents] * 2), t)
    if low_resource:
        noise_pred = torch.cat(
            [
                model.unet(
                    half_input, t, encoder_hidden_states=half_context, added_cond_kwargs=half_added
                ).sample
                for half_input, half_context, half_added in zip(
                    latent_input.chunk(2), context.chunk(2), guidance_halves(added_cond_kwargs)
                )
            ]
        )
    else:
        noise_pred = model.unet(
            latent_input, t, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs
        ).sample
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    step_kwargs = model.prepare_extra_step_kwargs(generator, eta=0.0)
    latents = model.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
    return controller.step_callback(latents)


def guidance_halves(
    added_cond_kwargs: dict[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """The added conditions (SDXL's) of the unconditional and of the prompts' half of the batch."""
    if added_cond_kwargs is None:
        return None, None
    uncond, cond = ({name: value.chunk(2)[i] for name, value in added_cond_kwargs.items()} for i in (0, 1))
    return uncond, cond


@torch.no_grad()
def latent2image(vae: AutoencoderKL, latents: torch.Tensor) -> np.ndarray:
    """Decode latents with the VAE to uint8 images of shape (B, H, W, 3)."""
    image = vae.decode(latents / vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.permute(0, 2, 3, 1).float().cpu().numpy()
    return (image * 255).round().astype(np.uint8)


def init_latent(
    latent: torch.Tensor | None,
    model: StableDiffusionPipeline,
    height: int,
    width: int,
    generator: torch.Generator | None,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The initial noise x_T, drawn once (unless given) and shared by every prompt of the batch.

    Returns (x_T of shape (1, C, h, w), x_T expanded to the batch).
    """
    if latent is None:
        from diffusers.utils.torch_utils import randn_tensor

        shape = (
            1,
            model.unet.config.in_channels,
            height // model.vae_scale_factor,
            width // model.vae_scale_factor,
        )
        latent = randn_tensor(shape, generator=generator, device=model.device, dtype=model.unet.dtype)
    latents = latent.to(model.device, model.unet.dtype).expand(batch_size, *latent.shape[1:])
    return latent, latents


def get_time_words_attention_alpha(
    prompts: list[str],
    num_steps: int,
    cross_replace_steps: float | tuple[float, float] | dict,
    tokenizer: CLIPTokenizer,
    max_num_words: int = MAX_NUM_WORDS,
) -> torch.Tensor:
    """Per step, target prompt and token: take the source's cross-attention (1) or keep its own (0).

    `cross_replace_steps` is a fraction of the steps from the start, a (start, end) pair of
    fractions, or a dict of such values per word with the key "default_" for all other tokens.
    Returns a tensor of shape (num_steps + 1, len(prompts) - 1, 1, 1, max_num_words).
    """
    if not isinstance(cross_replace_steps, dict):
        cross_replace_steps = {"default_": cross_replace_steps}
    cross_replace_steps = {"default_": (0.0, 1.0), **cross_replace_steps}
    alpha = torch.zeros(num_steps + 1, len(prompts) - 1, max_num_words)
    for word, bounds in cross_replace_steps.items():
        start, end = (
            int(bound * num_steps) for bound in replace_steps_bounds(bounds, f"cross_replace_steps[{word!r}]")
        )
        if word == "default_":  # always the first key, so words below override it
            alpha[start:end] = 1
            continue
        word_inds = [get_word_inds(prompt, word, tokenizer) for prompt in prompts[1:]]
        if not any(word_inds):
            raise ValueError(
                f"cross_replace_steps names the word {word!r}, which is not in the target prompt(s) "
                f"{prompts[1:]}. Use a word of the target prompt, or 'default_' for all tokens."
            )
        for i, inds in enumerate(word_inds):
            alpha[:, i, inds] = 0
            alpha[start:end, i, inds] = 1
    return alpha.reshape(num_steps + 1, len(prompts) - 1, 1, 1, max_num_words)


def replace_steps_bounds(steps: float | tuple[float, float], name: str) -> tuple[float, float]:
    """A replace-steps setting as a (start, end) pair of fractions of the denoising steps, checked."""
    start, end = (0.0, steps) if isinstance(steps, (int, float)) else steps
    if not 0 <= start <= end <= 1:
        raise ValueError(
            f"{name} must be a fraction of the steps in [0, 1] or a (start, end) pair with "
            f"0 <= start <= end <= 1, got {steps!r}."
        )
    return float(start), float(end)


# ---------------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------------


def text_under_image(
    image: np.ndarray, text: str, text_color: tuple[int, int, int] = (0, 0, 0)
) -> np.ndarray:
    """The image with a white band below it holding `text`, centred (wrapped when long)."""
    height, width = image.shape[:2]
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    longest_word = max(text.split(" "), key=len)
    font_size = max(MIN_FONT_SIZE, width // 24)
    while (
        font_size > MIN_FONT_SIZE
        and draw.textlength(longest_word, font=ImageFont.load_default(font_size)) > width
    ):
        font_size -= 1  # small images: shrink the font until every word fits on a line
    font = ImageFont.load_default(size=font_size)
    lines = _wrap(text, font, width - 4, draw)
    line_height = font.getbbox("Ag")[3] + 2
    band = max(int(height * 0.2), line_height * len(lines) + 4)
    canvas = Image.new("RGB", (width, height + band), "white")
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((width // 2, height + 2 + k * line_height), line, fill=text_color, font=font, anchor="ma")
    return np.asarray(canvas)


def _wrap(text: str, font: ImageFont.ImageFont, max_width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    lines = [""]
    for word in text.split(" "):
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font) <= max_width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def view_images(
    images: np.ndarray | list[np.ndarray],
    num_rows: int = 1,
    offset_ratio: float = 0.02,
    save_path: str | Path | None = None,
) -> Image.Image:
    """Tile images (uint8, same width) into a grid on a white background; save it as a PNG if asked.

    Works without a display: returns the PIL image (a notebook shows it when it is the cell's
    last expression).
    """
    height = max(image.shape[0] for image in images)
    # Captions can wrap to different numbers of lines: pad every image at the bottom to one height.
    images = [
        np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)), constant_values=255) for image in images
    ]
    num_empty = (-len(images)) % num_rows
    images += [np.full_like(images[0], 255)] * num_empty
    width = images[0].shape[1]
    offset = int(height * offset_ratio)
    num_cols = len(images) // num_rows
    grid = np.full(
        (height * num_rows + offset * (num_rows - 1), width * num_cols + offset * (num_cols - 1), 3),
        255,
        np.uint8,
    )
    for k, image in enumerate(images):
        row, col = divmod(k, num_cols)
        top, left = row * (height + offset), col * (width + offset)
        grid[top : top + height, left : left + width] = image
    picture = Image.fromarray(grid)
    if save_path is not None:
        Path(save_path).parent.mkdir(parents=True, exist_ok=True)
        picture.save(save_path)
    return picture


def aggregate_attention(
    attention_store: AttentionStore,
    prompts: list[str],
    res: int,
    from_where: list[str],
    is_cross: bool,
    select: int,
) -> torch.Tensor:
    """Average attention maps of prompt `select` over heads, steps and the chosen layers at `res` x `res`.

    `from_where` picks UNet places ("down", "mid", "up"). Returns (res, res, num_keys).
    """
    attention_maps = attention_store.get_average_attention()
    kind = "cross" if is_cross else "self"
    maps = [
        item.reshape(len(prompts), -1, res, res, item.shape[-1])[select]
        for place in from_where
        for item in attention_maps[f"{place}_{kind}"]
        if item.shape[1] == res**2
    ]
    if not maps:
        stored = sorted({int(item.shape[1] ** 0.5) for items in attention_maps.values() for item in items})
        raise ValueError(
            f"No {kind}-attention maps at resolution {res} in {from_where}; stored resolutions: {stored}."
        )
    maps = torch.cat(maps)
    return (maps.sum(0) / maps.shape[0]).cpu()


def show_cross_attention(
    attention_store: AttentionStore,
    prompts: list[str],
    tokenizer: CLIPTokenizer,
    res: int,
    from_where: list[str],
    select: int = 0,
    image: np.ndarray | None = None,
    save_path: str | Path | None = None,
) -> Image.Image:
    """One heat map per token of prompt `select`: where in the image each word looks.

    With `image`, each map is laid over it; every tile carries its token underneath.
    """
    from matplotlib import colormaps

    tokens = tokenizer.encode(prompts[select])
    attention_maps = aggregate_attention(attention_store, prompts, res, from_where, True, select)
    size = 256 if image is None else image.shape[0]
    tiles = []
    for position, token in enumerate(tokens):
        heat = attention_maps[:, :, position]
        heat = (255 * heat / heat.max().clamp(min=1e-12)).numpy().astype(np.uint8)
        heat = np.asarray(Image.fromarray(heat).resize((size, size), Image.BILINEAR))
        colored = (colormaps["jet"](heat)[..., :3] * 255).astype(np.uint8)
        if image is not None:
            colored = (0.5 * colored + 0.5 * np.asarray(Image.fromarray(image).resize((size, size)))).astype(
                np.uint8
            )
        tiles.append(text_under_image(colored, tokenizer.decode([token])))
    return view_images(tiles, save_path=save_path)


# ---------------------------------------------------------------------------------------------
# Diffusion in practice: samplers and negative prompts.
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_images(
    model: StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int = NUM_DIFFUSION_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    negative_prompt: str | None = None,
    batch_size: int = 1,
) -> np.ndarray:
    """uint8 images (B, H, W, 3) from diffusers' own pipeline, prompt i from the noise that seeds[i]
    draws, `batch_size` prompts per pipeline call (the images do not depend on it)."""
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        out = model(
            batch,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(batch),
            generator=[torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]],
            output_type="np",
        ).images
        images.append((out * 255).round().astype(np.uint8))
    return np.concatenate(images)


def generate(
    model: StableDiffusionPipeline,
    prompt: str,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float = GUIDANCE_SCALE,
    negative_prompt: str | None = None,
) -> np.ndarray:
    """One image (uint8, H x W x 3) from diffusers' own pipeline, from the noise that `seed` draws."""
    return generate_images(model, [prompt], [seed], num_inference_steps, guidance_scale, negative_prompt)[0]


def scheduler_grid(
    model: StableDiffusionPipeline,
    prompt: str,
    seed: int,
    step_counts: tuple[int, ...] = SCHEDULER_GRID_STEPS,
    schedulers: tuple[str, ...] = tuple(SCHEDULERS),
    guidance_scale: float = GUIDANCE_SCALE,
    save_path: str | Path | None = None,
) -> Image.Image:
    """One prompt and one seed, with the number of steps as rows and the sampler as columns.

    Every sampler is built from the pipeline's own scheduler configuration, so all share the
    training noise schedule; the pipeline's scheduler is put back afterwards.
    """
    import diffusers

    unknown = set(schedulers) - set(SCHEDULERS)
    if unknown:
        raise ValueError(f"Unknown scheduler(s) {sorted(unknown)}; choose from {list(SCHEDULERS)}.")
    original = model.scheduler
    tiles = []
    try:
        for steps in step_counts:
            for name in schedulers:
                model.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(original.config)
                tiles.append(
                    text_under_image(generate(model, prompt, seed, steps, guidance_scale), f"{name}, {steps}")
                )
    finally:
        model.scheduler = original
    return view_images(tiles, num_rows=len(step_counts), save_path=save_path)


def negative_prompt_pair(
    model: StableDiffusionPipeline,
    prompt: str,
    negative_prompt: str,
    seed: int,
    num_inference_steps: int = NUM_DIFFUSION_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    save_path: str | Path | None = None,
) -> Image.Image:
    """The same noise and prompt without and with a negative prompt, side by side, prompts written under."""
    plain = generate(model, prompt, seed, num_inference_steps, guidance_scale)
    steered = generate(model, prompt, seed, num_inference_steps, guidance_scale, negative_prompt)
    tiles = [
        text_under_image(plain, prompt),
        text_under_image(steered, f"{prompt} (negative: {negative_prompt})"),
    ]
    return view_images(tiles, save_path=save_path)


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        description="Diffusion in practice: a sampler grid and a negative-prompt pair."
    )
    parser.add_argument(
        "figure",
        choices=["schedulers", "negative-prompt"],
        help="schedulers: steps by sampler, one seed; negative-prompt: without and with the negative prompt",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        help=f"hub id, local pipeline folder, or offline: {', '.join(OFFLINE_MODELS)}",
    )
    parser.add_argument(
        "--prompt", default="a photograph of an astronaut riding a horse", help="prompt of every image"
    )
    parser.add_argument(
        "--negative-prompt",
        default="blurry, low quality",
        help="what the negative-prompt figure steers away from",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    parser.add_argument(
        "--steps",
        type=cli.positive_int,
        nargs="+",
        default=list(SCHEDULER_GRID_STEPS),
        help="step counts: the grid's rows; the negative-prompt figure uses the last",
    )
    parser.add_argument(
        "--schedulers",
        nargs="+",
        default=list(SCHEDULERS),
        choices=list(SCHEDULERS),
        help="the grid's columns",
    )
    parser.add_argument(
        "--out",
        type=image_path,
        default=argparse.SUPPRESS,
        help="image file to write (default: outputs/FIGURE.png)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda, cuda:N, mps or cpu",
    )
    args = parser.parse_args(argv)

    out = getattr(args, "out", f"outputs/{args.figure}.png")
    model = load_pipeline_or_exit(args.model, args.device)
    for flag, prompt in (("--prompt", args.prompt), ("--negative-prompt", args.negative_prompt)):
        check_prompt_length(model.tokenizer, prompt, flag)
    if args.figure == "schedulers":
        import diffusers

        for name in args.schedulers:
            sampler = getattr(diffusers, SCHEDULERS[name]).from_config(model.scheduler.config)
            check_sampler_steps(sampler, min(args.steps), name)
    else:
        check_sampler_steps(model.scheduler, args.steps[-1], type(model.scheduler).__name__)
    if args.figure == "schedulers":
        scheduler_grid(
            model, args.prompt, args.seed, tuple(args.steps), tuple(args.schedulers), save_path=out
        )
    else:
        negative_prompt_pair(
            model, args.prompt, args.negative_prompt, args.seed, args.steps[-1], save_path=out
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
