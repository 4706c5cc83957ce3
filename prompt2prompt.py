"""Prompt-to-Prompt image editing with cross-attention control (Hertz et al. 2022).

The source prompt P and the target prompt P* are denoised together in one batch from the same
initial noise x_T. At every step and layer, a controller sees the attention probabilities and
may edit those of P* (for example, inject the cross-attention maps of P through a token
mapper), so the edited image keeps the source's layout while the changed words change.

    python prompt2prompt.py --source "photo of a cat riding on a bicycle." \
                            --target "photo of a cat riding on a motorcycle."
"""

from __future__ import annotations

import abc
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import PreTrainedTokenizerBase

import ptp_utils
import seq_aligner
from ptp_utils import GUIDANCE_SCALE, NUM_DIFFUSION_STEPS

DEFAULT_MODEL_ID = ptp_utils.DEFAULT_MODEL_ID
SEED = 8888
CROSS_REPLACE_STEPS = 0.8
SELF_REPLACE_STEPS = 0.4
SOURCE_PROMPT = "photo of a cat riding on a bicycle."
TARGET_PROMPT = "photo of a cat riding on a motorcycle."
# The Shapes World model (models/shapes) knows only its captions' words: its demo edit uses them.
SHAPES_SOURCE_PROMPT = "a large red circle on a black background"
SHAPES_TARGET_PROMPT = "a large red star on a black background"
# The paper stores and blends attention maps of at most 32x32 queries, and replaces
# self-attention only in layers of at most 16x16 queries (the coarse layout).
MAX_STORED_QUERIES = 32**2
MAX_SELF_REPLACE_QUERIES = 16**2
LOCAL_BLEND_THRESHOLD = 0.3


def load_model(
    model_id: str = DEFAULT_MODEL_ID,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline:
    """Load Stable Diffusion (the assignment's model): fp16 on CUDA, fp32 on CPU.

    `model_id` is a hub id, a local pipeline folder, or an offline short name
    (`ptp_utils.OFFLINE_MODELS`). The safety checker stays as the pipeline ships it.
    """
    return ptp_utils.load_pipeline(model_id, device, dtype)


# ---------------------------------------------------------------------------------------------
# Controllers: a base that counts layers and steps, subclasses that store or edit attention.
# ---------------------------------------------------------------------------------------------


class AttentionControl(abc.ABC):
    """Base controller: called by every attention layer, it counts layers and denoising steps.

    Only the conditional half of the batch (the prompts, not the unconditional branch of
    classifier-free guidance) is passed to `forward`.
    """

    def __init__(self):
        self.num_att_layers = -1  # set by ptp_utils.register_attention_control
        self.low_resource = False  # set by text2image_ldm
        self.reset()

    def reset(self) -> None:
        """Back to step 0, layer 0: before every new generation."""
        self.cur_step = 0
        self.cur_att_layer = 0

    @property
    def num_uncond_att_layers(self) -> int:
        # In low-resource mode the unconditional branch is a UNet pass of its own, which comes first.
        return self.num_att_layers if self.low_resource else 0

    def step_callback(self, x_t: torch.Tensor) -> torch.Tensor:
        """Called with the latents after each denoising step; an edit may change them (local blend)."""
        return x_t

    def between_steps(self) -> None:
        """Called once every attention layer of a step has run."""

    def needs_attention(self, is_cross: bool, place_in_unet: str, num_queries: int) -> bool:
        """Whether the next layer must materialise its attention probabilities for `forward`."""
        return self.cur_att_layer >= self.num_uncond_att_layers

    @abc.abstractmethod
    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        """Read or edit the conditional attention probabilities, shape (prompts * heads, queries, keys)."""

    def __call__(self, attn: torch.Tensor | None, is_cross: bool, place_in_unet: str) -> torch.Tensor | None:
        """Called once per layer; `attn` is None when the layer ran fused because nothing needed it."""
        if attn is not None:
            if self.low_resource:
                attn = self.forward(attn, is_cross, place_in_unet)
            else:
                half = attn.shape[0] // 2
                attn[half:] = self.forward(attn[half:], is_cross, place_in_unet)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers + self.num_uncond_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn


class EmptyControl(AttentionControl):
    """Plain generation: no layer materialises its attention."""

    def needs_attention(self, is_cross: bool, place_in_unet: str, num_queries: int) -> bool:
        return False

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        return attn


class AttentionStore(AttentionControl):
    """Sum the attention maps (of at most 32x32 queries) over steps, per place and kind, for figures."""

    def __init__(self):
        super().__init__()
        self.step_store = self.get_empty_store()
        self.attention_store = {}

    @staticmethod
    def get_empty_store() -> dict[str, list[torch.Tensor]]:
        return {f"{place}_{kind}": [] for place in ("down", "mid", "up") for kind in ("cross", "self")}

    def reset(self) -> None:
        super().reset()
        self.step_store = self.get_empty_store()
        self.attention_store = {}

    def needs_attention(self, is_cross: bool, place_in_unet: str, num_queries: int) -> bool:
        return (
            super().needs_attention(is_cross, place_in_unet, num_queries)
            and num_queries <= MAX_STORED_QUERIES
        )

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        if attn.shape[1] <= MAX_STORED_QUERIES:
            self.step_store[f"{place_in_unet}_{'cross' if is_cross else 'self'}"].append(
                attn.detach().clone()
            )
        return attn

    def between_steps(self) -> None:
        if not self.attention_store:
            self.attention_store = self.step_store
        else:
            for key, maps in self.step_store.items():
                for stored, new in zip(self.attention_store[key], maps):
                    stored += new
        self.step_store = self.get_empty_store()

    def get_average_attention(self) -> dict[str, list[torch.Tensor]]:
        """The stored maps of each place in the UNet, averaged over the steps so far."""
        return {key: [item / self.cur_step for item in maps] for key, maps in self.attention_store.items()}


class LocalBlend:
    """Keep the target's latents equal to the source's outside the region of the given words.

    The region is where the words' cross-attention (summed over steps, averaged over layers and
    heads, in source and target) exceeds `threshold` of its maximum.
    """

    def __init__(
        self,
        prompts: list[str],
        words: list[str | list[str]],
        tokenizer: PreTrainedTokenizerBase,
        threshold: float = LOCAL_BLEND_THRESHOLD,
    ):
        self.alpha_layers = torch.zeros(len(prompts), 1, 1, 1, seq_aligner.MAX_NUM_WORDS)
        for i, (prompt, prompt_words) in enumerate(zip(prompts, words)):
            for word in [prompt_words] if isinstance(prompt_words, str) else prompt_words:
                inds = seq_aligner.get_word_inds(prompt, word, tokenizer)
                if not inds:
                    raise ValueError(f"LocalBlend word {word!r} is not in the prompt {prompt!r}.")
                self.alpha_layers[i, :, :, :, inds] = 1
        self.threshold = threshold

    def __call__(self, x_t: torch.Tensor, attention_store: dict[str, list[torch.Tensor]]) -> torch.Tensor:
        maps = attention_store["down_cross"] + attention_store["mid_cross"] + attention_store["up_cross"]
        masks = []
        self.alpha_layers = self.alpha_layers.to(x_t.device)  # copied to the GPU once, not per map
        for item in maps:  # (prompts * heads, queries, words)
            res = int(item.shape[1] ** 0.5)
            item = item.reshape(len(self.alpha_layers), -1, res, res, item.shape[-1])
            word_map = (item * self.alpha_layers).sum(-1).mean(1, keepdim=True)
            masks.append(F.interpolate(word_map, size=x_t.shape[2:], mode="bilinear"))
        mask = torch.stack(masks).mean(0)
        mask = F.max_pool2d(mask, kernel_size=3, stride=1, padding=1)
        mask = mask / mask.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)
        mask = mask.gt(self.threshold)
        mask = (mask[:1] | mask[1:]).to(x_t.dtype)  # the edit region of the source or of the target
        return torch.cat([x_t[:1], x_t[:1] + mask * (x_t[1:] - x_t[:1])])


class AttentionControlEdit(AttentionStore, abc.ABC):
    """Inject the source's attention into the targets: cross-attention through `replace_cross_attention`
    for a share of the steps (per word if asked), self-attention (layers of <= 16x16 queries) for another.

    Prompt 0 is the source; prompts 1.. are targets.
    """

    def __init__(
        self,
        prompts: list[str],
        num_steps: int,
        cross_replace_steps: float | tuple[float, float] | dict,
        self_replace_steps: float | tuple[float, float],
        local_blend: LocalBlend | None,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        if num_steps <= 0:
            raise ValueError(f"num_steps must be a positive number of denoising steps, got {num_steps}.")
        if len(prompts) < 2:
            raise ValueError(
                f"An edit needs a source prompt and at least one target prompt, got {prompts!r}."
            )
        if tokenizer is None:
            raise ValueError("Pass the model's tokenizer, for example tokenizer=model.tokenizer.")
        self.batch_size = len(prompts)
        self.num_steps = num_steps
        cross_replace_alpha = ptp_utils.get_time_words_attention_alpha(
            prompts, num_steps, cross_replace_steps, tokenizer
        )
        # Decided on the host once: reading the device tensor at each layer would make the CPU wait
        # for the GPU (a sync) 32 times per step, leaving the GPU idle while the CPU catches up.
        self.replaces_cross_attention_at_step = cross_replace_alpha.flatten(1).any(1).tolist()
        self.cross_replace_alpha = cross_replace_alpha.to(device)
        start, end = ptp_utils.replace_steps_bounds(self_replace_steps, "self_replace_steps")
        self.num_self_replace = int(num_steps * start), int(num_steps * end)
        self.local_blend = local_blend

    def step_callback(self, x_t: torch.Tensor) -> torch.Tensor:
        """Local blending, where asked: the edit keeps the source's latents outside the words' region."""
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store)
        return x_t

    def replaces_cross_attention_now(self) -> bool:
        return self.replaces_cross_attention_at_step[self.cur_step]

    def replaces_self_attention_now(self) -> bool:
        return self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]

    def needs_attention(self, is_cross: bool, place_in_unet: str, num_queries: int) -> bool:
        if not AttentionControl.needs_attention(self, is_cross, place_in_unet, num_queries):
            return False
        if is_cross:
            stores = self.local_blend is not None and num_queries <= MAX_STORED_QUERIES
            return stores or self.replaces_cross_attention_now()
        return self.replaces_self_attention_now() and num_queries <= MAX_SELF_REPLACE_QUERIES

    def replace_self_attention(self, attn_base: torch.Tensor, att_replace: torch.Tensor) -> torch.Tensor:
        """Self-attention injection: every prompt takes the source's maps, at the layers small enough."""
        if att_replace.shape[2] <= MAX_SELF_REPLACE_QUERIES:
            return attn_base.unsqueeze(0).expand(att_replace.shape[0], *attn_base.shape)
        return att_replace

    @abc.abstractmethod
    def replace_cross_attention(self, attn_base: torch.Tensor, att_replace: torch.Tensor) -> torch.Tensor:
        """The targets' new cross-attention, from the source's (heads, queries, words)."""

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        if self.local_blend is not None and is_cross:
            super().forward(attn, is_cross, place_in_unet)
        if (is_cross and self.replaces_cross_attention_now()) or (
            not is_cross and self.replaces_self_attention_now()
        ):
            attn = attn.reshape(self.batch_size, -1, *attn.shape[1:])
            attn_base, attn_replace = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step].to(attn.dtype)
                attn_replace_new = (
                    self.replace_cross_attention(attn_base, attn_replace) * alpha_words
                    + (1 - alpha_words) * attn_replace
                )
            else:
                attn_replace_new = self.replace_self_attention(attn_base, attn_replace)
            attn = torch.cat([attn_base[None], attn_replace_new]).flatten(0, 1)
        return attn


class AttentionReplace(AttentionControlEdit):
    """Word swap: each target token attends where its source tokens did, through the token mapper."""

    def __init__(
        self,
        prompts: list[str],
        num_steps: int,
        cross_replace_steps: float | tuple[float, float] | dict,
        self_replace_steps: float | tuple[float, float],
        local_blend: LocalBlend | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | torch.device | None = None,
    ):
        super().__init__(
            prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer, device
        )
        self.mapper = seq_aligner.get_replacement_mapper(prompts, tokenizer).to(device)

    def replace_cross_attention(self, attn_base: torch.Tensor, att_replace: torch.Tensor) -> torch.Tensor:
        # target[b, h, p, j] = sum_i source[h, p, i] * mapper[b, i, j]
        return torch.einsum("hpi,bij->bhpj", attn_base, self.mapper.to(attn_base.dtype))


# ---------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------


def encode_text(model: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings (len(prompts), 77, dim); a prompt longer than 77 tokens is an error."""
    return model.text_encoder(ptp_utils.tokenize_prompts(model.tokenizer, prompts).to(model.device))[0]


@torch.no_grad()
def text2image_ldm(
    model: StableDiffusionPipeline,
    prompt: str | list[str],
    controller: AttentionControl,
    num_inference_steps: int = NUM_DIFFUSION_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    generator: torch.Generator | None = None,
    latent: torch.Tensor | None = None,
    negative_prompt: str | list[str] | None = None,
    low_resource: bool = False,
    height: int | None = None,
    width: int | None = None,
    uncond_embeddings: list[torch.Tensor] | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Generate one image per prompt from one shared x_T, with `controller` on every attention layer.

    The manual denoising loop of the assignment, with whichever diffusers scheduler the pipeline
    carries. A negative prompt replaces the empty prompt of the unconditional branch;
    `uncond_embeddings` (one (1, 77, dim) embedding per step, from an inversion of a real image)
    replace it step by step, the same for every prompt. Returns (uint8 images of shape
    (B, H, W, 3), x_T).
    """
    prompt = [prompt] if isinstance(prompt, str) else list(prompt)
    if num_inference_steps <= 0:
        raise ValueError(
            f"num_inference_steps must be a positive number of steps, got {num_inference_steps}."
        )
    if getattr(controller, "num_steps", num_inference_steps) != num_inference_steps:
        raise ValueError(
            f"The controller was built for {controller.num_steps} steps but num_inference_steps is "
            f"{num_inference_steps}: build it with num_steps={num_inference_steps}."
        )
    if getattr(controller, "batch_size", len(prompt)) != len(prompt):
        raise ValueError(f"The controller was built for {controller.batch_size} prompts, got {len(prompt)}.")
    if uncond_embeddings is not None and len(uncond_embeddings) != num_inference_steps:
        raise ValueError(
            f"uncond_embeddings holds {len(uncond_embeddings)} embeddings but num_inference_steps is "
            f"{num_inference_steps}: pass one per step (invert with as many steps as the edit takes)."
        )
    if negative_prompt is None or isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt or ""] * len(prompt)
    height = height or model.unet.config.sample_size * model.vae_scale_factor
    width = width or model.unet.config.sample_size * model.vae_scale_factor

    cond_embeddings = encode_text(model, prompt)
    context = torch.cat([encode_text(model, negative_prompt), cond_embeddings])
    latent, latents = ptp_utils.init_latent(latent, model, height, width, generator, len(prompt))
    model.scheduler.set_timesteps(num_inference_steps, device=model.device)
    latents = latents * model.scheduler.init_noise_sigma
    controller.reset()
    controller.low_resource = low_resource
    with ptp_utils.register_attention_control(model, controller):
        for i, t in enumerate(model.progress_bar(model.scheduler.timesteps)):
            if uncond_embeddings is not None:
                # One tensor expanded to the batch: every prompt's unconditional branch is the same.
                null = uncond_embeddings[i].to(cond_embeddings).expand(len(prompt), -1, -1)
                context = torch.cat([null, cond_embeddings])
            latents = ptp_utils.diffusion_step(
                model, controller, latents, context, t, guidance_scale, low_resource, generator
            )
    images = ptp_utils.latent2image(model.vae, latents)
    if model.safety_checker is not None:
        checked, _ = model.run_safety_checker(images / 255.0, model.device, context.dtype)
        images = (checked * 255).round().astype(np.uint8)
    return images, latent


def run_and_display(
    model: StableDiffusionPipeline,
    prompts: list[str],
    controller: AttentionControl,
    latent: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    num_inference_steps: int = NUM_DIFFUSION_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    save_path: str | Path | None = None,
    low_resource: bool = False,
) -> tuple[Image.Image, np.ndarray, torch.Tensor]:
    """Generate and show the images side by side, each prompt written under its image.

    Returns the captioned grid, the uint8 images and x_T (to reuse the same noise).
    """
    images, x_t = text2image_ldm(
        model,
        prompts,
        controller,
        num_inference_steps,
        guidance_scale,
        generator,
        latent,
        low_resource=low_resource,
    )
    captioned = [ptp_utils.text_under_image(image, prompt) for image, prompt in zip(images, prompts)]
    return ptp_utils.view_images(captioned, save_path=save_path), images, x_t


# ---------------------------------------------------------------------------------------------
# Real images: inversion. A photo becomes an x_T (and per-step null embeddings) that the
# generation above turns back into the photo, so that Prompt-to-Prompt can edit it.
# ---------------------------------------------------------------------------------------------

ImageInput = str | Path | Image.Image | np.ndarray
NUM_INNER_STEPS = 10
EARLY_STOP_EPSILON = 1e-5
# Null-text inversion's schedule (Mokady et al. 2023): at denoising step i, Adam at
# NULL_TEXT_LEARNING_RATE * (1 - i / 100), stopped once the loss is below epsilon + i * EARLY_STOP_SLOPE.
NULL_TEXT_LEARNING_RATE = 1e-2
EARLY_STOP_SLOPE = 2e-5
INVERSION_KEYS = ("x_t", "uncond_embeddings")


def load_image(model: StableDiffusionPipeline, image: ImageInput) -> Image.Image:
    """The picture as RGB at the model's resolution: a path, a PIL image or a uint8 array (H, W, 3),
    grey or RGBA converted, centre-cropped to a square and resized."""
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except OSError as error:  # a missing file, or one that is not a picture PIL reads
            raise ValueError(f"Cannot read the image {str(image)!r}: {error}") from error
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(
                f"An image array must be uint8 of shape (H, W, 3), got {image.dtype} {image.shape}."
            )
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"image: give a path, a PIL image or a uint8 array (H, W, 3), not {type(image).__name__}."
        )
    size = model.unet.config.sample_size * model.vae_scale_factor
    return model.image_processor.resize(image.convert("RGB"), size, size, resize_mode="crop")


@torch.no_grad()
def image2latent(model: StableDiffusionPipeline, image: ImageInput) -> torch.Tensor:
    """z_0 of a picture: the mean of the VAE's posterior times its scaling factor, (1, C, h, w)."""
    pixels = model.image_processor.preprocess(load_image(model, image))
    posterior = model.vae.encode(pixels.to(model.device, model.vae.dtype)).latent_dist
    return (posterior.mean * model.vae.config.scaling_factor).to(model.unet.dtype)


def use_ddim(model: StableDiffusionPipeline) -> None:
    """Inversion and its edit step with DDIM: another scheduler is swapped for DDIMScheduler with
    the same configuration (noise schedule, prediction type), with a warning."""
    from diffusers import DDIMScheduler

    if not isinstance(model.scheduler, DDIMScheduler):
        warnings.warn(
            f"Inversion runs DDIM: the pipeline's {type(model.scheduler).__name__} is replaced by "
            f"DDIMScheduler.from_config(its config), for the inversion and the edits after it.",
            stacklevel=3,
        )
        model.scheduler = DDIMScheduler.from_config(model.scheduler.config)


def predicted_noise(
    model: StableDiffusionPipeline, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """The noise epsilon that the UNet's output means for `sample` at `timestep`, whichever quantity
    the model predicts (its scheduler's config.prediction_type: epsilon, v_prediction or sample)."""
    alpha_prod_t = model.scheduler.alphas_cumprod[timestep]
    beta_prod_t = 1 - alpha_prod_t
    prediction_type = model.scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    if prediction_type == "sample":
        return (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5
    raise ValueError(f"Unknown prediction_type {prediction_type!r}: epsilon, v_prediction or sample.")


@torch.no_grad()
def ddim_inversion(
    model: StableDiffusionPipeline,
    image: ImageInput,
    prompt: str,
    num_inference_steps: int = NUM_DIFFUSION_STEPS,
) -> list[torch.Tensor]:
    """DDIM inversion: the deterministic sampler run backwards from the picture's z_0 to z_T, with the
    prompt's conditional prediction alone (no guidance). Returns [z_0, ..., z_T], num_inference_steps + 1
    latents of shape (1, C, h, w)."""
    from diffusers import DDIMInverseScheduler

    use_ddim(model)
    # The UNet's output is read as noise at the timestep the UNet is told (predicted_noise);
    # DDIMInverseScheduler would read a v or x_0 prediction at the level of the latent it steps from.
    inverse = DDIMInverseScheduler.from_config(model.scheduler.config, prediction_type="epsilon")
    inverse.set_timesteps(num_inference_steps, device=model.device)
    cond_embeddings = encode_text(model, [prompt])
    latent = image2latent(model, image)
    latents = [latent]
    for t in model.progress_bar(inverse.timesteps):
        model_output = model.unet(latent, t, encoder_hidden_states=cond_embeddings).sample
        latent = inverse.step(predicted_noise(model, model_output, t, latent), t, latent).prev_sample
        # The UNet may answer in channels-last layout; an edit from x_T rounds differently per layout,
        # and must not change when x_T is saved and loaded (contiguous).
        latent = latent.contiguous()
        latents.append(latent)
    return latents


class NullInversion:
    """Null-text inversion (Mokady et al. 2023): DDIM inversion gives the pivot trajectory z_0..z_T; then,
    denoising from z_T with guidance, the null (unconditional) embedding of each step is optimised so
    that the guided DDIM step lands on the pivot's next latent.

    The optimised embedding is an fp32 leaf; the UNet runs in its own dtype (the embedding is cast
    for the forward pass, fp16 gradients are loss-scaled) and the loss is taken in fp32.
    """

    def __init__(
        self,
        model: StableDiffusionPipeline,
        num_ddim_steps: int = NUM_DIFFUSION_STEPS,
        guidance_scale: float = GUIDANCE_SCALE,
    ):
        self.model = model
        self.num_ddim_steps = num_ddim_steps
        self.guidance_scale = guidance_scale

    def invert(
        self,
        image: ImageInput,
        prompt: str,
        num_inner_steps: int = NUM_INNER_STEPS,
        early_stop_epsilon: float = EARLY_STOP_EPSILON,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Invert a picture described by `prompt`. Returns x_T and num_ddim_steps null embeddings
        (fp32, (1, 77, dim)), for text2image_ldm's `latent` and `uncond_embeddings`."""
        model, dtype = self.model, self.model.unet.dtype
        pivots = ddim_inversion(model, image, prompt, self.num_ddim_steps)
        with torch.no_grad():
            cond_embeddings = encode_text(model, [prompt])
            null = encode_text(model, [""]).float()
        model.scheduler.set_timesteps(self.num_ddim_steps, device=model.device)
        # fp16 gradients of a loss this small underflow: scale the loss up, the gradient back down.
        scaler = torch.amp.GradScaler(model.device.type, enabled=dtype == torch.float16)
        latent = pivots[-1]
        uncond_embeddings = []
        for i, t in enumerate(model.progress_bar(model.scheduler.timesteps)):
            target = pivots[-2 - i].float()
            with torch.no_grad():
                noise_pred_cond = model.unet(latent, t, encoder_hidden_states=cond_embeddings).sample
            null = null.detach().clone().requires_grad_(True)  # a new leaf: the stored ones stay as they are
            optimizer = torch.optim.Adam([null], lr=NULL_TEXT_LEARNING_RATE * (1 - i / 100))
            for _ in range(num_inner_steps):
                noise_pred_uncond = model.unet(latent, t, encoder_hidden_states=null.to(dtype)).sample
                noise_pred = noise_pred_uncond + self.guidance_scale * (noise_pred_cond - noise_pred_uncond)
                latent_prev = model.scheduler.step(noise_pred.float(), t, latent.float()).prev_sample
                loss = F.mse_loss(latent_prev, target)
                # The embedding's gradient alone: none is computed for the UNet's weights.
                (null.grad,) = torch.autograd.grad(scaler.scale(loss), null)
                scaler.step(optimizer)
                scaler.update()
                if loss.item() < early_stop_epsilon + i * EARLY_STOP_SLOPE:
                    break
            null = null.detach()
            uncond_embeddings.append(null)
            # The next step starts where the edit's denoising will be, not at the pivot.
            with torch.no_grad():
                context = torch.cat([null.to(dtype), cond_embeddings])
                latent = ptp_utils.diffusion_step(
                    model, EmptyControl(), latent, context, t, self.guidance_scale
                )
        return pivots[-1], uncond_embeddings


def negative_prompt_inversion(
    model: StableDiffusionPipeline,
    image: ImageInput,
    prompt: str,
    num_inference_steps: int = NUM_DIFFUSION_STEPS,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Negative-prompt inversion (Miyake et al. 2023): DDIM inversion's x_T, with the prompt's own
    embedding as every step's null embedding (no optimisation). Returns what NullInversion.invert does."""
    x_t = ddim_inversion(model, image, prompt, num_inference_steps)[-1]
    with torch.no_grad():
        cond_embeddings = encode_text(model, [prompt]).float()
    return x_t, [cond_embeddings] * num_inference_steps


def save_inversion(path: str | Path, x_t: torch.Tensor, uncond_embeddings: list[torch.Tensor]) -> None:
    """Write an inversion (x_T and the per-step null embeddings) to a safetensors file."""
    from safetensors.torch import save_file

    tensors = {"x_t": x_t, "uncond_embeddings": torch.cat(uncond_embeddings)}
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in tensors.items()}, str(path))


def load_inversion(path: str | Path) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Read a file that save_inversion wrote: (x_T, the per-step null embeddings), on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise ValueError(f"Cannot read the inversion {str(path)!r}: {error}") from error
    shapes = {key: tuple(tensor.shape) for key, tensor in tensors.items()}
    if (
        set(shapes) != set(INVERSION_KEYS)
        or len(shapes["x_t"]) != 4
        or shapes["x_t"][0] != 1
        or len(shapes["uncond_embeddings"]) != 3
    ):
        raise ValueError(
            f"{str(path)!r} is not a saved inversion: it holds {shapes}, not x_t (1, C, h, w) and "
            f"uncond_embeddings (steps, 77, dim)."
        )
    return tensors["x_t"], list(tensors["uncond_embeddings"].split(1))


def parse_steps(value: str) -> float | tuple[float, float]:
    """A replace-steps argument: "0.8" or "0.2,0.8"."""
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) not in (1, 2):
        raise argparse.ArgumentTypeError(f'{value!r}: give a fraction such as "0.8" or a range "0.2,0.8"')
    return numbers[0] if len(numbers) == 1 else numbers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Prompt-to-Prompt word swap: generate the source and the edited image side by side."
    )
    parser.add_argument(
        "--source", help=f"source prompt (default: {SOURCE_PROMPT!r}; {SHAPES_SOURCE_PROMPT!r} for shapes)"
    )
    parser.add_argument(
        "--target",
        help=f"target prompt (default: {TARGET_PROMPT!r}; {SHAPES_TARGET_PROMPT!r} for shapes)",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        help=f"hub id or local pipeline folder, or offline: {', '.join(ptp_utils.OFFLINE_MODELS)}",
    )
    parser.add_argument("--steps", type=int, default=NUM_DIFFUSION_STEPS, help="denoising steps")
    parser.add_argument(
        "--guidance", type=float, default=GUIDANCE_SCALE, help="classifier-free guidance scale"
    )
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the shared initial noise x_T")
    parser.add_argument(
        "--cross-replace-steps", type=parse_steps, default=CROSS_REPLACE_STEPS, help='fraction or "start,end"'
    )
    parser.add_argument(
        "--self-replace-steps", type=parse_steps, default=SELF_REPLACE_STEPS, help='fraction or "start,end"'
    )
    parser.add_argument("--out", default="outputs/p2p_edit.png", help="PNG to write")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], default=None, help="default: fp16 on CUDA"
    )
    parser.add_argument(
        "--low-resource", action="store_true", help="run the two guidance branches one at a time"
    )
    args = parser.parse_args(argv)

    try:
        model = load_model(args.model, args.device, args.dtype and getattr(torch, args.dtype))
        shapes = args.model == "shapes"
        prompts = [
            args.source or (SHAPES_SOURCE_PROMPT if shapes else SOURCE_PROMPT),
            args.target or (SHAPES_TARGET_PROMPT if shapes else TARGET_PROMPT),
        ]
        controller = AttentionReplace(
            prompts,
            args.steps,
            cross_replace_steps=args.cross_replace_steps,
            self_replace_steps=args.self_replace_steps,
            tokenizer=model.tokenizer,
            device=model.device,
        )
        generator = torch.Generator().manual_seed(args.seed)
        run_and_display(
            model,
            prompts,
            controller,
            generator=generator,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            save_path=args.out,
            low_resource=args.low_resource,
        )
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
