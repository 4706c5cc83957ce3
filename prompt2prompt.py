"""Prompt-to-Prompt image editing with cross-attention control (Hertz et al. 2022).

The source prompt P and the target prompt P* are denoised together in one batch from the same
initial noise x_T. At every step and layer, a controller sees the attention probabilities and
may edit those of P* (for example, inject the cross-attention maps of P through a token
mapper), so the edited image keeps the source's layout while the changed words change.

The edits: a word swap (AttentionReplace), a refinement that adds or removes words
(AttentionRefine), and attention reweighting (AttentionReweight, alone or on top of either);
LocalBlend confines any of them to the region of chosen words.

    python prompt2prompt.py --source "photo of a cat riding on a bicycle." \
                            --target "photo of a cat riding on a motorcycle."
    python prompt2prompt.py --source "a cat riding a bicycle" --target "a fluffy cat riding a bicycle" \
                            --reweight fluffy=2 --blend-words cat cat
    python prompt2prompt.py --source "a cat riding a bicycle" --reweight-sweep cat=0,1,2,4
    python prompt2prompt.py --image photo.jpg --source "a cat sitting next to a mirror" \
                            --target "a tiger sitting next to a mirror" --save-inversion cat.safetensors
"""

from __future__ import annotations

import abc
import argparse
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cli

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import ptp_utils
import seq_aligner
from ptp_utils import GUIDANCE_SCALE, NUM_DIFFUSION_STEPS

if TYPE_CHECKING:  # loaded with the model (ptp_utils.load_pipeline): `import prompt2prompt` stays fast
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import PreTrainedTokenizerBase

DEFAULT_MODEL_ID = ptp_utils.DEFAULT_MODEL_ID
SEED = 8888
CROSS_REPLACE_STEPS = 0.8
SELF_REPLACE_STEPS = 0.4
# The share of the first steps in which the targets take the source's latents before following their
# own prompts: none in the paper's edits. A refinement that changes the object itself ("a small ...")
# keeps its place this way: on Shapes World the place is fixed in the first steps by the UNet's
# convolutions, which attention injection does not reach. Sharing 15 % moved fewer objects, though more
# kept the source's size (docs/benchmarks.md; chosen on scenes apart from those measured).
SHARED_STEPS = 0.0
REFINE_SHARED_STEPS = 0.15
# In an edit from an inversion, how much of each step's fitted null embedding the targets take: 1 as in
# the paper (one null embedding for the whole batch), 0 for the targets' own unconditional embedding. The
# null embedding is fitted to land the source on its trajectory; a target that takes all of it drifts
# with it (docs/real_photos.md).
TARGET_NULL_WEIGHT = 1.0
SOURCE_PROMPT = "photo of a cat riding on a bicycle."
TARGET_PROMPT = "photo of a cat riding on a motorcycle."
# The Shapes World model (models/shapes) knows only its captions' words: its demo edit uses them.
SHAPES_SOURCE_PROMPT = "a large red circle on a black background"
SHAPES_TARGET_PROMPT = "a large red star on a black background"
# The paper stores and blends attention maps of at most 32x32 queries, and replaces self-attention
# only in layers of at most 16x16 queries (the coarse layout), of SD 1.x's 64x64 latent (512 px): the
# latent's side divided by 2 and by 4. Relative to the latent, the rules pick the same UNet levels on
# every model and size: SDXL at 1024 px (128x128 latent) stores its 64x64 and 32x32 maps and replaces
# self-attention at 32x32; SD 2.x at 768 px (96x96) stores 48x48 to 12x12 and replaces at 24x24 and 12x12.
# Maps no larger than the paper's own 32x32 and 16x16 always qualify: a small model whose attention
# sits at its latent's side and half of it (Shapes World, 16x16 latent) keeps both levels.
STORED_MAPS_DOWNSAMPLING, STORED_MAPS_MIN_SIDE = 2, 32
SELF_REPLACE_DOWNSAMPLING, SELF_REPLACE_MIN_SIDE = 4, 16
LOCAL_BLEND_THRESHOLD = 0.3
LOCAL_BLEND_START = 0.2  # the share of the steps before local blending starts


def load_model(
    model_id: str = DEFAULT_MODEL_ID,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """Load Stable Diffusion (the assignment's model; 1.x, 2.x or SDXL): fp16 on CUDA, fp32 on CPU.

    `model_id` is a hub id, a local pipeline folder, or an offline short name
    (`ptp_utils.OFFLINE_MODELS`); the pipeline class is the one its model_index.json names.
    The safety checker stays as the pipeline ships it.
    """
    return ptp_utils.load_pipeline(model_id, device, dtype)


# ---------------------------------------------------------------------------------------------
# Controllers: a base that counts layers and steps, subclasses that store or edit attention.
# ---------------------------------------------------------------------------------------------


class AttentionControl(abc.ABC):
    """Base controller: called by every attention layer, it counts layers and denoising steps.

    Only the prompts' attention probabilities reach it, never those of the unconditional branch
    of classifier-free guidance (the layers do not even compute them).
    """

    def __init__(self):
        self.num_att_layers = -1  # set by ptp_utils.register_attention_control
        self.low_resource = False  # set by text2image_ldm
        self.latent_size = None  # (height, width), set by text2image_ldm: the resolution rules follow it
        self.reset()

    def reset(self) -> None:
        """Back to step 0, layer 0: before every new generation."""
        self.cur_step = 0
        self.cur_att_layer = 0

    def max_queries(self, downsampling: int, min_side: int) -> int:
        """Queries of the UNet's attention maps at the latent's size divided by `downsampling` (a power
        of 2), or of a `min_side` square if that is more: the layers of at most this many queries are
        those of that level and coarser ones."""
        if self.latent_size is None:
            raise ValueError(
                "The controller does not know the latent's size: set controller.latent_size = "
                "latents.shape[2:] before denoising (text2image_ldm does)."
            )
        height, width = self.latent_size
        relative = -(-height // downsampling) * -(-width // downsampling)  # the UNet's strides round up
        return max(relative, min_side**2)

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
            attn = self.forward(attn, is_cross, place_in_unet)
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
    """Sum the attention maps (of at most the latent's side / 2 squared queries: 32x32 on SD 1.x at
    512 px) over steps, per place and kind, for figures."""

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
        return super().needs_attention(
            is_cross, place_in_unet, num_queries
        ) and num_queries <= self.max_queries(STORED_MAPS_DOWNSAMPLING, STORED_MAPS_MIN_SIDE)

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        if attn.shape[1] <= self.max_queries(STORED_MAPS_DOWNSAMPLING, STORED_MAPS_MIN_SIDE):
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


def word_inds(text: str, word: int | str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token positions of `word` (an index, or a word: every occurrence) in `text`; ValueError if absent."""
    num_words = len(text.split(" "))
    if isinstance(word, int) and not -num_words <= word < num_words:
        raise ValueError(f"Word index {word} is out of range: {text!r} has {num_words} words.")
    inds = seq_aligner.get_word_inds(text, word, tokenizer)
    if not inds:
        raise ValueError(f"The word {word!r} is not in {text!r}.")
    return inds


def attention_map_size(num_queries: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """Height and width of a UNet attention layer's map: the latent's, halved (rounding up, as the
    UNet's strided convolutions do) until they hold `num_queries`."""
    height, width = latent_size
    while height * width > num_queries:
        height, width = -(-height // 2), -(-width // 2)
    if height * width != num_queries:
        raise ValueError(
            f"No attention map of a {latent_size[0]}x{latent_size[1]} latent has {num_queries} queries."
        )
    return height, width


class LocalBlend:
    """Keep the targets' latents equal to the source's outside the region of the given words.

    The region is where the words' cross-attention (summed over the steps so far, averaged over
    heads and the stored layers at each layer's own resolution, widened by one latent pixel)
    exceeds `threshold` of its maximum, in the source or in the target; `threshold` may be a
    (source, target) pair. The region of `substruct_words` is kept out of the edit. Blending starts
    after `start_blend` of the steps. `words` and `substruct_words` hold one entry per prompt (a
    word or a list of words). After each blended step, `mask` holds the region the targets took from
    their own latents, (targets, 1, height, width) booleans at the latent's size (None before the
    first): the region to draw over an edit.
    """

    def __init__(
        self,
        prompts: list[str],
        words: list[str | list[str]],
        tokenizer: PreTrainedTokenizerBase,
        threshold: float | tuple[float, float] = LOCAL_BLEND_THRESHOLD,
        substruct_words: list[str | list[str]] | None = None,
        start_blend: float = LOCAL_BLEND_START,
    ):
        thresholds = (threshold, threshold) if isinstance(threshold, (int, float)) else tuple(threshold)
        if len(thresholds) != 2:
            raise ValueError(f"threshold is a number or a (source, target) pair, got {threshold!r}.")
        if not 0 <= start_blend <= 1:
            raise ValueError(f"start_blend is a fraction of the steps in [0, 1], got {start_blend!r}.")
        word_sets = [words] if substruct_words is None else [words, substruct_words]
        # (prompts, word sets, tokens)
        self.word_weights = torch.stack([self.weights(prompts, ws, tokenizer) for ws in word_sets], dim=1)
        self.thresholds = torch.tensor([thresholds[0]] + [thresholds[1]] * (len(prompts) - 1))
        self.start_blend = start_blend
        self.mask: torch.Tensor | None = None

    @staticmethod
    def weights(
        prompts: list[str], words: list[str | list[str]], tokenizer: PreTrainedTokenizerBase
    ) -> torch.Tensor:
        """(prompts, 77): 1 at the tokens of each prompt's words."""
        if len(words) != len(prompts):
            raise ValueError(
                f"LocalBlend takes one entry of words per prompt (source first): {len(words)} for "
                f"{len(prompts)} prompts."
            )
        weights = torch.zeros(len(prompts), seq_aligner.MAX_NUM_WORDS)
        for i, (prompt, prompt_words) in enumerate(zip(prompts, words)):
            for word in [prompt_words] if isinstance(prompt_words, str) else prompt_words:
                weights[i, word_inds(prompt, word, tokenizer)] = 1
        return weights

    def __call__(
        self, x_t: torch.Tensor, attention_store: dict[str, list[torch.Tensor]], step: int, num_steps: int
    ) -> torch.Tensor:
        """The latents after denoising step `step` (from 0) of `num_steps`, blended from `start_blend` on."""
        if step < int(self.start_blend * num_steps):
            return x_t
        maps = attention_store["down_cross"] + attention_store["mid_cross"] + attention_store["up_cross"]
        self.word_weights = weights = self.word_weights.to(x_t.device)  # copied to the GPU once
        self.thresholds = self.thresholds.to(x_t.device)
        regions = []
        for item in maps:  # (prompts * heads, queries, tokens)
            height, width = attention_map_size(item.shape[1], x_t.shape[2:])
            item = item.float().reshape(len(weights), -1, height, width, item.shape[-1])
            region = torch.einsum("bhxyt,bkt->bkxy", item, weights) / item.shape[1]  # mean over heads
            regions.append(F.interpolate(region, size=x_t.shape[2:], mode="bilinear"))
        regions = torch.stack(regions).mean(0)  # (prompts, word sets, height, width)
        # A latent pixel of margin around the edit region, none around the region kept out of it.
        regions[:, :1] = F.max_pool2d(regions[:, :1], kernel_size=3, stride=1, padding=1)
        regions = regions / regions.amax(dim=(2, 3), keepdim=True).clamp(min=1e-12)
        regions = regions.gt(self.thresholds[:, None, None, None])
        regions = regions[:1] | regions[1:]  # the region in the source or in the target
        self.mask = regions[:, :1] & ~regions[:, 1:].any(1, keepdim=True)
        return torch.cat([x_t[:1], torch.where(self.mask, x_t[1:], x_t[:1])])


class AttentionControlEdit(AttentionStore, abc.ABC):
    """Inject the source's attention into the targets: cross-attention through `replace_cross_attention`
    for a share of the steps (per word if asked), self-attention (layers at the latent's side / 4 and
    coarser: 16x16 and 8x8 on SD 1.x at 512 px) for another. The attribute `shared_steps` (default
    SHARED_STEPS, none) is the share of the steps, from the first, at whose end every target takes
    the source's latents: REFINE_SHARED_STEPS keeps the source's layout in a refinement.

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
        self.prompts = list(prompts)
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
        self.shared_steps = SHARED_STEPS
        self.tensors_by_dtype = {}

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """The edit's float tensors that meet the attention probabilities, by name."""
        return {"cross_replace_alpha": self.cross_replace_alpha}

    def in_dtype(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """`float_tensors` in the attention's dtype: converted once per dtype, not at every layer."""
        if dtype not in self.tensors_by_dtype:
            self.tensors_by_dtype[dtype] = {name: t.to(dtype) for name, t in self.float_tensors().items()}
        return self.tensors_by_dtype[dtype]

    def step_callback(self, x_t: torch.Tensor) -> torch.Tensor:
        """Local blending, where asked: the edit keeps the source's latents outside the words' region;
        within the first `shared_steps`, every target takes the source's latents."""
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store, self.cur_step - 1, self.num_steps)
        if self.cur_step <= int(self.num_steps * self.shared_steps):
            x_t = x_t[:1].expand_as(x_t).clone()
        return x_t

    def replaces_cross_attention_now(self) -> bool:
        return self.replaces_cross_attention_at_step[self.cur_step]

    def replaces_self_attention_now(self) -> bool:
        return self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]

    def needs_attention(self, is_cross: bool, place_in_unet: str, num_queries: int) -> bool:
        if not AttentionControl.needs_attention(self, is_cross, place_in_unet, num_queries):
            return False
        if is_cross:
            stores = self.local_blend is not None and num_queries <= self.max_queries(
                STORED_MAPS_DOWNSAMPLING, STORED_MAPS_MIN_SIDE
            )
            return stores or self.replaces_cross_attention_now()
        return self.replaces_self_attention_now() and num_queries <= self.max_queries(
            SELF_REPLACE_DOWNSAMPLING, SELF_REPLACE_MIN_SIDE
        )

    def replace_self_attention(self, attn_base: torch.Tensor, att_replace: torch.Tensor) -> torch.Tensor:
        """Self-attention injection: every prompt takes the source's maps, at the layers small enough."""
        if att_replace.shape[2] <= self.max_queries(SELF_REPLACE_DOWNSAMPLING, SELF_REPLACE_MIN_SIDE):
            return attn_base.unsqueeze(0).expand(att_replace.shape[0], *attn_base.shape)
        return att_replace

    @abc.abstractmethod
    def replace_cross_attention(self, attn_base: torch.Tensor, att_replace: torch.Tensor) -> torch.Tensor:
        """The targets' new cross-attention (targets, heads, queries, tokens), from the source's
        (heads, queries, tokens) and their own."""

    def forward(self, attn: torch.Tensor, is_cross: bool, place_in_unet: str) -> torch.Tensor:
        if self.local_blend is not None and is_cross:
            super().forward(attn, is_cross, place_in_unet)
        if (is_cross and self.replaces_cross_attention_now()) or (
            not is_cross and self.replaces_self_attention_now()
        ):
            attn = attn.reshape(self.batch_size, -1, *attn.shape[1:])
            attn_base, attn_replace = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.in_dtype(attn.dtype)["cross_replace_alpha"][self.cur_step]
                attn_replace_new = torch.lerp(
                    attn_replace, self.replace_cross_attention(attn_base, attn_replace), alpha_words
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

    def float_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().float_tensors(), "mapper": self.mapper}

    def replace_cross_attention(self, attn_base: torch.Tensor, att_replace: torch.Tensor) -> torch.Tensor:
        # target[b, h, p, j] = sum_i source[h, p, i] * mapper[b, i, j]
        return torch.einsum("hpi,bij->bhpj", attn_base, self.in_dtype(attn_base.dtype)["mapper"])


class AttentionRefine(AttentionControlEdit):
    """Refinement (words added or removed): each target token takes the source's map of the token it
    aligns with (a global alignment of the token sequences); added tokens keep their own maps."""

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
        mapper, alphas = seq_aligner.get_refinement_mapper(prompts, tokenizer)
        self.mapper = mapper.to(device)
        self.alphas = alphas[:, None, None, :].to(device)  # (targets, 1, 1, tokens)

    def float_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().float_tensors(), "alphas": self.alphas}

    def replace_cross_attention(self, attn_base: torch.Tensor, att_replace: torch.Tensor) -> torch.Tensor:
        # target[b, h, p, j] = source[h, p, mapper[b, j]] where the token aligns, its own map where added
        attn_base_replace = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
        return torch.lerp(att_replace, attn_base_replace, self.in_dtype(attn_base.dtype)["alphas"])


def get_equalizer(
    text: str,
    word_select: int | str | Sequence[int | str],
    values: Sequence[float],
    tokenizer: PreTrainedTokenizerBase,
) -> torch.Tensor:
    """The scales of AttentionReweight, shape (len(values), 77): row i holds values[i] at every token of
    every selected word (an index or a word of `text`), 1 elsewhere."""
    words = [word_select] if isinstance(word_select, (int, str)) else list(word_select)
    equalizer = torch.ones(len(values), seq_aligner.MAX_NUM_WORDS)
    values = torch.tensor(values, dtype=torch.float32)
    for word in words:
        equalizer[:, word_inds(text, word, tokenizer)] = values[:, None]
    return equalizer


class AttentionReweight(AttentionControlEdit):
    """Attention reweighting: the targets' cross-attention to each token is scaled by `equalizer`
    (len(prompts) - 1, 77), so a word weighs more (> 1) or less (< 1) in the image.

    Alone, the targets take the source's maps, scaled. With `controller` (an AttentionReplace or
    AttentionRefine on the same prompts) its edit comes first and the scaling on top of it.
    """

    def __init__(
        self,
        prompts: list[str],
        num_steps: int,
        cross_replace_steps: float | tuple[float, float] | dict,
        self_replace_steps: float | tuple[float, float],
        equalizer: torch.Tensor,
        local_blend: LocalBlend | None = None,
        controller: AttentionControlEdit | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | torch.device | None = None,
    ):
        super().__init__(
            prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer, device
        )
        equalizer = torch.as_tensor(equalizer, dtype=torch.float32)
        if equalizer.shape != (len(prompts) - 1, seq_aligner.MAX_NUM_WORDS):
            raise ValueError(
                f"equalizer must have shape (len(prompts) - 1, {seq_aligner.MAX_NUM_WORDS}) = "
                f"({len(prompts) - 1}, {seq_aligner.MAX_NUM_WORDS}), got {tuple(equalizer.shape)}: "
                f"one row of scales per target prompt, as get_equalizer makes."
            )
        if controller is not None and (
            not isinstance(controller, AttentionControlEdit) or controller.prompts != self.prompts
        ):
            raise ValueError(
                "controller must be an AttentionReplace or AttentionRefine built on the same prompts."
            )
        self.equalizer = equalizer[:, None, None, :].to(device)  # (targets, 1, 1, tokens)
        self.controller = controller

    def float_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().float_tensors(), "equalizer": self.equalizer}

    def replace_cross_attention(self, attn_base: torch.Tensor, att_replace: torch.Tensor) -> torch.Tensor:
        if self.controller is not None:
            attn_base = self.controller.replace_cross_attention(attn_base, att_replace)
        return attn_base * self.in_dtype(attn_base.dtype)["equalizer"]


# ---------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------


def encode_text(
    model: StableDiffusionPipeline | StableDiffusionXLPipeline, prompts: list[str]
) -> torch.Tensor:
    """Text embeddings (len(prompts), 77, dim): CLIP's on SD 1.x and 2.x; on SDXL both text encoders'
    hidden states concatenated, as its pipeline builds them. A prompt longer than 77 tokens is an error."""
    if ptp_utils.is_sdxl(model):
        return encode_conditions(model, prompts, None, guidance=False)[0]
    return model.text_encoder(ptp_utils.tokenize_prompts(model.tokenizer, prompts).to(model.device))[0]


def encode_conditions(
    model: StableDiffusionPipeline | StableDiffusionXLPipeline,
    prompts: list[str],
    negative_prompt: list[str] | None,
    height: int | None = None,
    width: int | None = None,
    guidance: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """What the UNet is conditioned on, for the batch [unconditional branch; prompts] (the prompts
    alone without `guidance`): text embeddings, and SDXL's added conditions (None on SD 1.x, 2.x).

    The unconditional branch reads `negative_prompt`, or else the empty prompt; SDXL's, zeros where
    its config says force_zeros_for_empty_prompt. SDXL's added conditions are the pooled embedding of
    its second text encoder and the time ids (original size, crop corner, target size), from its
    pipeline's own `encode_prompt` and `_get_add_time_ids`. A prompt over 77 tokens is an error.
    """
    if not ptp_utils.is_sdxl(model):
        cond_embeddings = encode_text(model, prompts)
        if not guidance:
            return cond_embeddings, None
        return torch.cat([encode_text(model, negative_prompt or [""] * len(prompts)), cond_embeddings]), None
    for tokenizer in (model.tokenizer, model.tokenizer_2):
        ptp_utils.tokenize_prompts(tokenizer, prompts + (negative_prompt or []))  # the length check
    embeddings, negative_embeddings, pooled, negative_pooled = model.encode_prompt(
        prompts, device=model.device, do_classifier_free_guidance=guidance, negative_prompt=negative_prompt
    )
    size = (
        height or model.unet.config.sample_size * model.vae_scale_factor,
        width or model.unet.config.sample_size * model.vae_scale_factor,
    )
    time_ids = model._get_add_time_ids(
        size, (0, 0), size, embeddings.dtype, model.text_encoder_2.config.projection_dim
    ).to(model.device)
    if guidance:
        embeddings = torch.cat([negative_embeddings, embeddings])
        pooled = torch.cat([negative_pooled, pooled])
    return embeddings, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(embeddings), 1)}


def with_source_tokens(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], embeddings: torch.Tensor
) -> torch.Tensor:
    """The prompts' text embeddings (len(prompts), 77, dim), each later prompt taking the first's at
    every token the two share: the tokens (start and end included) that the global alignment of the
    two token sequences pairs. Only the changed words keep their own embeddings, and the padding.

    A causal text encoder gives every token after a changed word a new embedding; guidance amplifies
    that difference, and an edit from an inverted picture drifts in colour and background."""
    embeddings = embeddings.clone()
    source = tokenizer.encode(prompts[0])
    for k, prompt in enumerate(prompts[1:], 1):
        for j, i in enumerate(seq_aligner.align_tokens(source, tokenizer.encode(prompt))):
            if i >= 0:  # aligned tokens are equal tokens: a mismatch (-1) scores below two gaps (0)
                embeddings[k, j] = embeddings[0, i]
    return embeddings


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
    keep_source_tokens: bool = False,
    target_null_weight: float = TARGET_NULL_WEIGHT,
) -> tuple[np.ndarray, torch.Tensor]:
    """Generate one image per prompt from one shared x_T, with `controller` on every attention layer.

    The manual denoising loop of the assignment, with whichever diffusers scheduler the pipeline
    carries. A negative prompt replaces the empty prompt of the unconditional branch;
    `uncond_embeddings` (one (1, 77, dim) embedding per step, from an inversion of a real image)
    replace it step by step, the same for every prompt (on SDXL, its text embeddings: the pooled
    embedding stays the negative prompt's). With `keep_source_tokens` the later prompts take the
    first prompt's text embedding at every token they share (with_source_tokens), so that only the
    changed words differ (SDXL's pooled embedding stays each prompt's). With `uncond_embeddings`, each
    later prompt's unconditional embedding is its own (the empty or negative prompt's) moved
    `target_null_weight` of the way to the step's null embedding: 1 (the default) shares the null
    embedding with the targets, as the paper does; the first prompt always takes all of it, so it
    stays the reconstruction. SD 1.x, 2.x and SDXL alike:
    with EmptyControl the images are those of the model's own diffusers pipeline. Returns (uint8
    images of shape (B, H, W, 3), x_T).
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
    if uncond_embeddings is None and target_null_weight != 1:
        raise ValueError(
            "target_null_weight weighs the null embeddings of an inversion: pass uncond_embeddings."
        )
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompt)
    height = height or model.unet.config.sample_size * model.vae_scale_factor
    width = width or model.unet.config.sample_size * model.vae_scale_factor

    context, added_cond_kwargs = encode_conditions(model, prompt, negative_prompt, height, width)
    own_uncond, cond_embeddings = context[: len(prompt)], context[len(prompt) :]
    if keep_source_tokens:
        cond_embeddings = with_source_tokens(model.tokenizer, prompt, cond_embeddings)
        context = torch.cat([own_uncond, cond_embeddings])
    latent, latents = ptp_utils.init_latent(latent, model, height, width, generator, len(prompt))
    model.scheduler.set_timesteps(num_inference_steps, device=model.device)
    latents = latents * model.scheduler.init_noise_sigma
    controller.reset()
    controller.low_resource = low_resource
    controller.latent_size = tuple(latents.shape[2:])
    with ptp_utils.register_attention_control(model, controller):
        for i, t in enumerate(model.progress_bar(model.scheduler.timesteps)):
            if uncond_embeddings is not None:
                # One tensor expanded to the batch: every prompt's unconditional branch is the same,
                # unless the targets take only a share of it.
                null = uncond_embeddings[i].to(cond_embeddings).expand(len(prompt), -1, -1)
                if target_null_weight != 1:
                    targets = own_uncond[1:] + target_null_weight * (null[1:] - own_uncond[1:])
                    null = torch.cat([null[:1], targets])
                context = torch.cat([null, cond_embeddings])
            latents = ptp_utils.diffusion_step(
                model,
                controller,
                latents,
                context,
                t,
                guidance_scale,
                low_resource,
                generator,
                added_cond_kwargs,
            )
    # SDXL's VAE overflows in fp16: its pipeline decodes in fp32 where the config says force_upcast.
    upcast = ptp_utils.is_sdxl(model) and model.vae.dtype == torch.float16 and model.vae.config.force_upcast
    if upcast:
        model.vae.to(torch.float32)
    images = ptp_utils.latent2image(model.vae, latents.to(model.vae.dtype))
    if upcast:
        model.vae.to(torch.float16)
    if getattr(model, "safety_checker", None) is not None:
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


def open_image(path: str | Path) -> Image.Image:
    """The picture file at `path`, read whole and converted to RGB (grey or RGBA too); ValueError if
    it cannot be read."""
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except OSError as error:  # a missing file, or one that is not a picture PIL reads
        raise ValueError(f"Cannot read the image {str(path)!r}: {error}") from error


def load_image(model: StableDiffusionPipeline, image: ImageInput) -> Image.Image:
    """The picture as RGB at the model's resolution: a path, a PIL image or a uint8 array (H, W, 3),
    grey or RGBA converted, centre-cropped to a square and resized."""
    if isinstance(image, (str, Path)):
        image = open_image(image)
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
    cond_embeddings, added_cond_kwargs = encode_conditions(model, [prompt], None, guidance=False)
    latent = image2latent(model, image)
    latents = [latent]
    for t in model.progress_bar(inverse.timesteps):
        model_output = model.unet(
            latent, t, encoder_hidden_states=cond_embeddings, added_cond_kwargs=added_cond_kwargs
        ).sample
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
            context, added_cond_kwargs = encode_conditions(model, [prompt], None)
        null, cond_embeddings = context[:1].float(), context[1:]
        added_uncond, added_cond = ptp_utils.guidance_halves(added_cond_kwargs)
        model.scheduler.set_timesteps(self.num_ddim_steps, device=model.device)
        # fp16 gradients of a loss this small underflow: scale the loss up, the gradient back down.
        scaler = torch.amp.GradScaler(model.device.type, enabled=dtype == torch.float16)
        latent = pivots[-1]
        uncond_embeddings = []
        for i, t in enumerate(model.progress_bar(model.scheduler.timesteps)):
            target = pivots[-2 - i].float()
            with torch.no_grad():
                noise_pred_cond = model.unet(
                    latent, t, encoder_hidden_states=cond_embeddings, added_cond_kwargs=added_cond
                ).sample
            null = null.detach().clone().requires_grad_(True)  # a new leaf: the stored ones stay as they are
            optimizer = torch.optim.Adam([null], lr=NULL_TEXT_LEARNING_RATE * (1 - i / 100))
            for _ in range(num_inner_steps):
                noise_pred_uncond = model.unet(
                    latent, t, encoder_hidden_states=null.to(dtype), added_cond_kwargs=added_uncond
                ).sample
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
                    model,
                    EmptyControl(),
                    latent,
                    context,
                    t,
                    self.guidance_scale,
                    added_cond_kwargs=added_cond_kwargs,
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


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


# The command line's edits, by the controller under any reweighting (none: one prompt reweighted alone).
EDITS = {"replace": AttentionReplace, "refine": AttentionRefine, "reweight": None}
INVERSIONS = ("null-text", "negative-prompt", "ddim")
DEFAULT_INVERSION = "null-text"
INVERSION_SUFFIX = ".safetensors"


def parse_steps(value: str) -> float | tuple[float, float]:
    """A replace-steps argument: "0.8" or "0.2,0.8", fractions of the steps."""
    try:
        numbers = tuple(float(v) for v in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) not in (1, 2) or not 0 <= numbers[0] <= numbers[-1] <= 1:
        raise argparse.ArgumentTypeError(
            f'{value!r}: give a fraction such as "0.8" or a range "0.2,0.8" within [0, 1]'
        )
    return numbers[0] if len(numbers) == 1 else numbers


def parse_reweight(value: str) -> tuple[str, float]:
    """A --reweight argument: WORD=SCALE."""
    word, _, scale = value.rpartition("=")
    try:
        scale = float(scale)
    except ValueError:
        word = ""
    if not word:
        raise argparse.ArgumentTypeError(f"{value!r}: give a word and a scale, such as fluffy=2")
    return word, scale


def parse_sweep(value: str) -> tuple[str, list[float]]:
    """A --reweight-sweep argument: WORD=SCALE,SCALE,..."""
    word, _, scales = value.rpartition("=")
    try:
        scales = [float(scale) for scale in scales.split(",")]
    except ValueError:
        word = ""
    if not word:
        raise argparse.ArgumentTypeError(f"{value!r}: give a word and its scales, such as fluffy=0,1,2,4")
    return word, scales


def inversion_path(value: str) -> str:
    """An argparse type: a file name for save_inversion's safetensors file."""
    if Path(value).suffix != INVERSION_SUFFIX:
        raise argparse.ArgumentTypeError(f"{value!r}: give a file name ending in {INVERSION_SUFFIX}")
    return value


def check_writable(path: str, flag: str) -> None:
    """For a script: the file it will write at `path` can be written (its folder, or the nearest folder
    above that exists, is writable), checked before any work."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if Path(path).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
        cli.usage_error(f"{flag} {path}: cannot write a file there; give a path in a writable folder")


def invert_photo(
    model: StableDiffusionPipeline, photo: Image.Image, prompt: str, args: argparse.Namespace
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """--image: x_T and the per-step null embeddings, read from --load-inversion (checked against the
    model and --steps) or found by --inversion, and written to --save-inversion if asked."""
    with torch.no_grad():
        empty = encode_text(model, [""]).float()
    if args.load_inversion:
        with cli.user_errors(f"--load-inversion {args.load_inversion}", ValueError):
            x_t, uncond_embeddings = load_inversion(args.load_inversion)
        size = model.unet.config.sample_size
        latent_shape = (1, model.unet.config.in_channels, size, size)
        dim = uncond_embeddings[0].shape[-1]
        if dim != empty.shape[-1] or tuple(x_t.shape) != latent_shape:
            cli.usage_error(
                f"--load-inversion {args.load_inversion}: it holds x_T {tuple(x_t.shape)} and {dim}-wide "
                f"embeddings, but this --model takes x_T {latent_shape} and {empty.shape[-1]}-wide ones: "
                "load it with the --model that inverted it"
            )
        if len(uncond_embeddings) != args.steps:
            cli.usage_error(
                f"--load-inversion {args.load_inversion}: the inversion has {len(uncond_embeddings)} steps "
                f"but --steps is {args.steps}: pass --steps {len(uncond_embeddings)}"
            )
        return x_t, uncond_embeddings
    inversion = getattr(args, "inversion", DEFAULT_INVERSION)
    if inversion == "null-text":
        x_t, uncond_embeddings = NullInversion(model, args.steps, args.guidance).invert(photo, prompt)
    elif inversion == "negative-prompt":
        x_t, uncond_embeddings = negative_prompt_inversion(model, photo, prompt, args.steps)
    else:  # the ordinary unconditional branch, the empty prompt's embedding, stored per step like the others
        x_t, uncond_embeddings = ddim_inversion(model, photo, prompt, args.steps)[-1], [empty] * args.steps
    if args.save_inversion:
        Path(args.save_inversion).parent.mkdir(parents=True, exist_ok=True)
        save_inversion(args.save_inversion, x_t, uncond_embeddings)
        print(f"wrote {args.save_inversion}")
    return x_t, uncond_embeddings


def enlarge(image: np.ndarray, width: int) -> np.ndarray:
    """`image` scaled to `width` pixels wide by nearest neighbour: crisp pixels, and room for a caption."""
    height = round(image.shape[0] * width / image.shape[1])
    return np.asarray(Image.fromarray(image).resize((width, height), Image.NEAREST))


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        description="Prompt-to-Prompt: the source image and its edit side by side, from the same noise "
        "(a word swap, a refinement that adds or removes words, or an attention reweighting); with "
        "--image, a real picture inverted to its noise, then edited: input | reconstruction | edit."
    )
    parser.add_argument(
        "--source",
        default=argparse.SUPPRESS,
        help=f"source prompt (default: {SOURCE_PROMPT!r}; {SHAPES_SOURCE_PROMPT!r} with --model shapes)",
    )
    parser.add_argument(
        "--target",
        default=argparse.SUPPRESS,
        help=f"target prompt (default: {TARGET_PROMPT!r}; {SHAPES_TARGET_PROMPT!r} with --model shapes; "
        "with --reweight or --reweight-sweep, the source itself: one prompt reweighted against itself)",
    )
    parser.add_argument(
        "--edit",
        choices=EDITS,
        default=argparse.SUPPRESS,
        help="replace: swap words; refine: add or remove words; reweight: only reweight one prompt "
        "(default: replace when the prompts have the same number of words, else refine; reweight "
        "when they are one prompt)",
    )
    parser.add_argument(
        "--blend-words",
        nargs=2,
        metavar=("SOURCE_WORD", "TARGET_WORD"),
        help="local blend: edit only where these words are, keep the source's image elsewhere",
    )
    parser.add_argument(
        "--reweight",
        type=parse_reweight,
        action="append",
        default=[],
        metavar="WORD=SCALE",
        help="scale the target's attention to a word (repeatable); on top of the swap or refinement",
    )
    parser.add_argument(
        "--reweight-sweep",
        type=parse_sweep,
        metavar="WORD=S1,S2,...",
        help="one edited image per scale of the word, in a row after the source",
    )
    parser.add_argument(
        "--image",
        help="a real picture to edit, described by --source (grey or RGBA converted, centre-cropped to the "
        "model's square); it is inverted to x_T and edited with the DDIM sampler. None: generate the "
        "source from --seed",
    )
    parser.add_argument(
        "--inversion",
        choices=INVERSIONS,
        default=argparse.SUPPRESS,
        help=f"with --image, how to invert it: null-text optimises each step's null embedding (Mokady et "
        f"al. 2023), negative-prompt uses the caption's own (no optimisation, Miyake et al. 2023), ddim "
        f"alone drifts from the picture (default: {DEFAULT_INVERSION})",
    )
    parser.add_argument(
        "--save-inversion",
        type=inversion_path,
        metavar="FILE",
        help=f"with --image, write x_T and the null embeddings to this {INVERSION_SUFFIX} file, for "
        "--load-inversion",
    )
    parser.add_argument(
        "--load-inversion",
        metavar="FILE",
        help="with --image, read x_T and the null embeddings from a --save-inversion file instead of "
        "inverting: one inversion serves many edits (keep --model, --steps and --guidance)",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL_ID,
        help=f"hub id or local pipeline folder, or offline: {', '.join(ptp_utils.OFFLINE_MODELS)}",
    )
    parser.add_argument("--steps", type=cli.positive_int, default=NUM_DIFFUSION_STEPS, help="denoising steps")
    parser.add_argument(
        "--guidance", type=float, default=GUIDANCE_SCALE, help="classifier-free guidance scale"
    )
    parser.add_argument("--seed", type=int, default=SEED, help="seed of the shared initial noise x_T")
    parser.add_argument(
        "--cross-replace-steps",
        type=parse_steps,
        default=CROSS_REPLACE_STEPS,
        help='share of the steps that inject cross-attention: a fraction or "start,end"',
    )
    parser.add_argument(
        "--self-replace-steps",
        type=parse_steps,
        default=SELF_REPLACE_STEPS,
        help='share of the steps that inject self-attention: a fraction or "start,end"',
    )
    parser.add_argument(
        "--shared-steps",
        type=cli.fraction,
        default=argparse.SUPPRESS,
        help="share of the first steps in which the target takes the source's latents, which keeps the "
        f"source's layout (default: {REFINE_SHARED_STEPS} with --edit refine, {SHARED_STEPS} otherwise)",
    )
    parser.add_argument(
        "--keep-source-tokens",
        action="store_true",
        help="the target takes the source's text embedding at every token they share, so only the "
        "changed words differ (the text encoder is causal: a swapped word changes every later token); "
        "keeps colour and background in edits of an --image picture",
    )
    parser.add_argument(
        "--target-null-weight",
        type=cli.fraction,
        default=TARGET_NULL_WEIGHT,
        metavar="W",
        help="in edits of an --image picture, the share of each step's fitted null embedding that the "
        "target takes (1: all of it, as in the paper; 0: none, plain guidance); lower keeps the edit "
        "from drifting with the source's fit",
    )
    parser.add_argument(
        "--display-size",
        type=cli.positive_int,
        metavar="PX",
        help="enlarge each image to PX pixels wide (nearest neighbour) before its caption; None: as is",
    )
    parser.add_argument(
        "--out", type=ptp_utils.image_path, default="outputs/p2p_edit.png", help="image file to write"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N, mps or cpu"
    )
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=argparse.SUPPRESS,
        help="the model's precision (default: float16 on CUDA, float32 elsewhere)",
    )
    parser.add_argument(
        "--low-resource", action="store_true", help="run the two guidance branches one at a time"
    )
    args = parser.parse_args(argv)

    sweep_word, sweep_scales = args.reweight_sweep or (None, [1.0])
    reweighting = bool(args.reweight) or sweep_word is not None
    shapes = args.model == "shapes"
    photo = None
    inversion_flags = {"--inversion": hasattr(args, "inversion"), "--save-inversion": args.save_inversion}
    inversion_flags["--load-inversion"] = args.load_inversion
    given = [flag for flag, value in inversion_flags.items() if value]
    if args.image is None and given:
        cli.usage_error(f"{given[0]} inverts a picture: give --image PICTURE and --source, its caption")
    if args.image is None and args.target_null_weight != TARGET_NULL_WEIGHT:
        cli.usage_error(
            "--target-null-weight weighs the null embeddings of an inversion: give --image PICTURE and "
            "--source, its caption"
        )
    if args.image is not None:
        if not hasattr(args, "source"):
            cli.usage_error("--image: give --source, the picture's caption (the inversion reconstructs it)")
        if not (hasattr(args, "target") or reweighting):
            cli.usage_error("--image: give --target, the caption edited (or --reweight to reweight --source)")
        if args.load_inversion and len(given) > 1:
            cli.usage_error(f"--load-inversion reads a finished inversion: drop {given[0]}")
        if args.save_inversion:
            check_writable(args.save_inversion, "--save-inversion")
        with cli.user_errors("--image", ValueError):
            photo = open_image(args.image)
    source = getattr(args, "source", SHAPES_SOURCE_PROMPT if shapes else SOURCE_PROMPT)
    default_target = source if reweighting else SHAPES_TARGET_PROMPT if shapes else TARGET_PROMPT
    target = getattr(args, "target", default_target)
    num_words = len(source.split(" ")), len(target.split(" "))
    if reweighting and source == target:
        default_edit = "reweight"
    else:
        default_edit = "replace" if num_words[0] == num_words[1] else "refine"
    edit = getattr(args, "edit", default_edit)
    if edit == "reweight" and not reweighting:
        cli.usage_error("--edit reweight: give --reweight WORD=SCALE or --reweight-sweep WORD=S1,S2,...")
    if edit == "reweight" and source != target:
        cli.usage_error(
            "--edit reweight reweights one prompt against itself: drop --target, or drop --edit to "
            "reweight on top of the swap or refinement"
        )
    if edit == "replace" and num_words[0] != num_words[1]:
        cli.usage_error(
            f"--edit replace swaps words, but the source has {num_words[0]} words and the target "
            f"{num_words[1]}: use --edit refine"
        )

    dtype = getattr(args, "dtype", None)
    model = ptp_utils.load_pipeline_or_exit(args.model, args.device, dtype and getattr(torch, dtype))
    if photo is not None:
        with warnings.catch_warnings():  # --help says so: inversion and its edit run DDIM
            warnings.simplefilter("ignore")
            use_ddim(model)
    ptp_utils.check_sampler_steps(model.scheduler, args.steps, type(model.scheduler).__name__)
    tokenizer = model.tokenizer
    for flag, prompt in (("--source", source), ("--target", target)):
        ptp_utils.check_prompt_length(tokenizer, prompt, flag)
    named_words = [(f"--reweight {word}={scale:g}", word, target) for word, scale in args.reweight]
    if sweep_word is not None:
        named_words.append(("--reweight-sweep", sweep_word, target))
    if args.blend_words:
        named_words += [("--blend-words", word, p) for word, p in zip(args.blend_words, (source, target))]
    for flag, word, prompt in named_words:
        if not seq_aligner.get_word_inds(prompt, word, tokenizer):
            cli.usage_error(f"{flag}: {word!r} is not a word of the prompt {prompt!r}: name one of its words")

    # A sweep edits one copy of the target per scale, all in one batch.
    prompts = [source] + [target] * len(sweep_scales)
    settings = dict(
        num_steps=args.steps,
        cross_replace_steps=args.cross_replace_steps,
        self_replace_steps=args.self_replace_steps,
        tokenizer=tokenizer,
        device=model.device,
    )
    local_blend = None
    if args.blend_words:
        blend_words = [args.blend_words[0]] + [args.blend_words[1]] * len(sweep_scales)
        local_blend = LocalBlend(prompts, blend_words, tokenizer)
    controller = None
    if EDITS[edit] is not None:  # the swap or refinement; under a reweighting, the reweighting blends
        controller = EDITS[edit](prompts, local_blend=None if reweighting else local_blend, **settings)
    captions = [source] + [target] * len(sweep_scales)
    if reweighting:
        equalizer = torch.ones(len(sweep_scales), seq_aligner.MAX_NUM_WORDS)
        for word, scale in args.reweight:
            equalizer *= get_equalizer(target, word, [scale] * len(sweep_scales), tokenizer)
        if sweep_word is not None:
            equalizer *= get_equalizer(target, sweep_word, sweep_scales, tokenizer)
        fixed = [f"{word} x{scale:g}" for word, scale in args.reweight]
        swept = [[f"{sweep_word} x{scale:g}"] if sweep_word else [] for scale in sweep_scales]
        captions = [source] + [f"{target} ({', '.join(fixed + notes)})" for notes in swept]
        controller = AttentionReweight(
            prompts, equalizer=equalizer, local_blend=local_blend, controller=controller, **settings
        )
    controller.shared_steps = getattr(
        args, "shared_steps", REFINE_SHARED_STEPS if edit == "refine" else SHARED_STEPS
    )
    x_t = uncond_embeddings = None
    if photo is not None:
        x_t, uncond_embeddings = invert_photo(model, photo, source, args)
    images, _ = text2image_ldm(
        model,
        prompts,
        controller,
        args.steps,
        args.guidance,
        torch.Generator().manual_seed(args.seed),
        x_t,
        low_resource=args.low_resource,
        uncond_embeddings=uncond_embeddings,
        keep_source_tokens=args.keep_source_tokens,
        target_null_weight=args.target_null_weight,
    )
    if photo is not None:  # the source row is the reconstruction: the inverted x_T denoised with --source
        images = [np.asarray(load_image(model, photo)), *images]
        captions = ["input", f"{source} (reconstruction)", *captions[1:]]
    if args.display_size:
        images = [enlarge(image, args.display_size) for image in images]
    tiles = [ptp_utils.text_under_image(image, caption) for image, caption in zip(images, captions)]
    ptp_utils.view_images(tiles, save_path=args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
