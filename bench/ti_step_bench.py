"""Time per textual-inversion training step: our loop, the Python row-restore loop, bare passes.

All run in one process on one machine, interleaved over several repeats, on the same batch
shape. A loop's time per step is the difference between a long and a short run of
`textual_inversion()` divided by the extra steps, so set-up (adding tokens, encoding the images,
saving) cancels out. The bare passes: UNet forward + backward to the prompt embeddings only, and
the text encoder's forward, the UNet's and back through both to the input embeddings, the work a
textual-inversion step cannot avoid. `--profile N` prints where N steps of our loop spend time.

    python bench/ti_step_bench.py                                   # tiny pipeline, CPU
    python bench/ti_step_bench.py --model sd1-random --mixed-precision fp16 --resolution 512
    python bench/ti_step_bench.py --model CompVis/stable-diffusion-v1-4 --mixed-precision fp16

`sd1-random` is the SD 1.x architecture (UNet, VAE, CLIP ViT-L text encoder) with random weights:
the same shapes and work per step as the real model, without a download.
"""

from __future__ import annotations

import copy
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import PartialState  # noqa: E402
from diffusers import StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402

import ptp_utils  # noqa: E402
import textual_inversion as ti  # noqa: E402

NUM_IMAGES = 4


def python_loop_restore(weight: torch.Tensor, original: torch.Tensor, is_placeholder: torch.Tensor) -> None:
    """The well-known course answer: one Python iteration per vocabulary row."""
    placeholder_ids = set(is_placeholder.squeeze(1).nonzero().flatten().tolist())
    with torch.no_grad():
        for i in range(len(weight)):
            if i not in placeholder_ids:
                weight[i] = original[i]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_training(base: StableDiffusionPipeline, args, folder: Path, steps: int) -> float:
    """Seconds for a whole `textual_inversion()` run of `steps` steps on a fresh copy of the pipeline."""
    wrapper = ti.StableDiffusionWrapper(copy.deepcopy(base))
    with tempfile.TemporaryDirectory() as output_dir:
        config = ti.TextualInversionConfig(
            target_folder=str(folder),
            placeholder_tokens=["<bench>"],
            initializer_token="ball",
            num_inversion_steps=steps,
            batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            mixed_precision=args.mixed_precision,
            show_every=0,
            checkpoint_every=0,
            output_dir=output_dir,
            resolution=args.resolution,
            compile=args.compile,
        )
        synchronize()
        start = time.perf_counter()
        ti.textual_inversion(wrapper, config)
        synchronize()
        seconds = time.perf_counter() - start
    # accelerate's objects hold the run's models in reference cycles: free their GPU memory now.
    del wrapper
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return seconds


def half_precision_text_encoder(prepare: Callable) -> Callable:
    """`prepare_for_textual_inversion`, then the text encoder's frozen layers cast to the
    mixed-precision dtype: only the embeddings stay fp32 (a variant under test)."""

    def prepare_half(wrapper: ti.StableDiffusionWrapper, config: ti.TextualInversionConfig):
        optimizer = prepare(wrapper, config)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
        trained = wrapper.text_encoder.get_input_embeddings().weight
        for parameter in wrapper.text_encoder.parameters():
            if parameter is not trained:
                parameter.data = parameter.data.to(dtype)
        return optimizer

    return prepare_half


def time_per_step(base, args, folder) -> float:
    extra = args.long_steps - args.short_steps
    return (
        time_training(base, args, folder, args.long_steps)
        - time_training(base, args, folder, args.short_steps)
    ) / extra


def time_bare_pass(
    unet: UNet2DConditionModel,
    batch_size: int,
    latent_size: int,
    steps: int,
    text_encoder: torch.nn.Module | None = None,
    token_ids: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """Seconds per UNet forward + backward, either to fp32 prompt embeddings (as `predict_noise`
    casts them) or, given a text encoder, through it to its input embeddings (under autocast, as
    accelerate runs the trained text encoder): the work a textual-inversion step cannot avoid."""
    device = unet.device
    noisy = torch.randn(batch_size, 4, latent_size, latent_size, device=device)
    noise = torch.randn_like(noisy)
    timesteps = torch.randint(1000, (batch_size,), device=device)
    leaf = torch.randn(batch_size, 77, unet.config.cross_attention_dim, device=device, requires_grad=True)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        embeddings = leaf
        if text_encoder is not None:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                embeddings = text_encoder(token_ids)[0]
        prediction = unet(
            noisy.to(unet.dtype), timesteps, encoder_hidden_states=embeddings.to(unet.dtype)
        ).sample
        F.mse_loss(prediction.float(), noise).backward()
        leaf.grad = None
        if text_encoder is not None:
            text_encoder.get_input_embeddings().weight.grad = None
    synchronize()
    return (time.perf_counter() - start) / steps


def profile_training(base, args, folder: Path) -> None:
    """Profile `args.profile` steps of our loop (after 4 unprofiled ones) and print where the time goes.

    The profiler advances once per step through `restore_frozen_rows`, which the loop calls once
    per optimizer step. CUDA's synchronising calls are counted: each one stalls the CPU until the
    GPU is idle, so the next step's kernels start late.
    """
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    restore = ti.restore_frozen_rows
    with profile(activities=activities, schedule=schedule(wait=2, warmup=2, active=args.profile)) as prof:

        def restore_and_advance(*restore_args) -> None:
            restore(*restore_args)
            prof.step()

        ti.restore_frozen_rows = restore_and_advance
        try:
            time_training(base, args, folder, 4 + args.profile + 1)
        finally:
            ti.restore_frozen_rows = restore
    events = prof.key_averages()
    sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=25))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    # The profiler's GPU-side step markers span whole steps: only the kernels count as busy time.
    kernels = [
        e
        for e in events
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("ProfilerStep")
    ]
    kernel_ms = sum(e.self_device_time_total for e in kernels) / args.profile / 1000
    syncs = {e.key: e.count for e in events if "Synchronize" in e.key or "Memcpy" in e.key}
    print(f"GPU kernel time per profiled step: {kernel_ms:.1f} ms; synchronising and copying calls: {syncs}")


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    offline = ", ".join(ptp_utils.OFFLINE_MODELS)
    parser.add_argument("--model", default="tiny", help=f"hub id or folder, or offline: {offline}")
    parser.add_argument(
        "--resolution", type=cli.positive_int, help="training resolution in pixels (default: the model's own)"
    )
    parser.add_argument("--batch-size", type=cli.positive_int, default=1, help="images per step")
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        default="no",
        help="half precision for the frozen UNet and VAE (on a GPU)",
    )
    parser.add_argument(
        "--short-steps",
        type=cli.positive_int,
        default=2,
        help="steps of the short run, whose time is subtracted",
    )
    parser.add_argument(
        "--long-steps",
        type=cli.positive_int,
        default=12,
        help="steps of the long run; more than --short-steps",
    )
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=3, help="interleaved repeats of every timing"
    )
    parser.add_argument(
        "--skip-python-loop",
        action="store_true",
        help="skip the Python row-restore loop (seconds per step on SD)",
    )
    parser.add_argument(
        "--loss-every-step", action="store_true", help="also time our loop reading the loss every step"
    )
    parser.add_argument(
        "--half-text-encoder",
        action="store_true",
        help="also time our loop with the text encoder's frozen layers in the mixed-precision dtype",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet and text encoder, in our loop and in the bare passes alike",
    )
    parser.add_argument(
        "--profile", type=cli.non_negative_int, default=0, help="profile this many steps of our loop; 0: none"
    )
    args = parser.parse_args()
    if args.long_steps <= args.short_steps:
        cli.usage_error(f"--long-steps {args.long_steps}: give more than --short-steps ({args.short_steps})")

    base = ptp_utils.load_pipeline(args.model, device="cpu", dtype=torch.float32)
    base.set_progress_bar_config(disable=True)
    args.resolution = args.resolution or base.unet.config.sample_size * base.vae_scale_factor
    device = PartialState().device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    bare_unet = copy.deepcopy(base.unet).to(device).requires_grad_(False)
    if weight_dtype != torch.float32:  # as textual_inversion() casts the frozen UNet
        bare_unet.to(weight_dtype)
    bare_shape = (args.batch_size, args.resolution // base.vae_scale_factor)
    # The text encoder as textual_inversion() trains it: fp32, only the input embeddings trainable.
    bare_text_encoder = copy.deepcopy(base.text_encoder).to(device).requires_grad_(False)
    bare_text_encoder.get_input_embeddings().requires_grad_(True)
    token_ids = base.tokenizer(
        ["a photo of a ball"] * args.batch_size, padding="max_length", return_tensors="pt"
    ).input_ids.to(device)
    autocast_dtype = weight_dtype if weight_dtype != torch.float32 else None
    if args.compile:
        bare_unet.compile()
        bare_text_encoder.compile()
    text_and_unet = dict(text_encoder=bare_text_encoder, token_ids=token_ids, autocast_dtype=autocast_dtype)

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for i in range(NUM_IMAGES):
            pixels = rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(Path(folder) / f"{i}.png")

        time_bare_pass(bare_unet, *bare_shape, steps=3)  # warm-up: CUDA context, cuDNN algorithm choice
        time_bare_pass(bare_unet, *bare_shape, steps=3, **text_and_unet)
        # Warm-up. With --compile the first run compiles, and the second compiles again in its
        # first steps (seen with inductor on a CPU); later runs reuse what they compiled.
        for steps in (args.short_steps, args.long_steps):
            time_training(base, args, Path(folder), steps)
        restore = ti.restore_frozen_rows
        results = {
            "ours": [],
            "ours_loss_every_step": [],
            "ours_half_text_encoder": [],
            "python_loop": [],
            "bare_unet": [],
            "bare_text_unet": [],
        }
        for _ in range(args.repeats):
            bare_steps = args.long_steps - args.short_steps
            results["bare_unet"].append(time_bare_pass(bare_unet, *bare_shape, bare_steps))
            results["bare_text_unet"].append(
                time_bare_pass(bare_unet, *bare_shape, bare_steps, **text_and_unet)
            )
            results["ours"].append(time_per_step(base, args, Path(folder)))
            if args.loss_every_step:
                display_every, ti.LOSS_DISPLAY_EVERY = ti.LOSS_DISPLAY_EVERY, 1
                results["ours_loss_every_step"].append(time_per_step(base, args, Path(folder)))
                ti.LOSS_DISPLAY_EVERY = display_every
            if args.half_text_encoder:
                prepare = ti.prepare_for_textual_inversion
                ti.prepare_for_textual_inversion = half_precision_text_encoder(prepare)
                results["ours_half_text_encoder"].append(time_per_step(base, args, Path(folder)))
                ti.prepare_for_textual_inversion = prepare
            if not args.skip_python_loop:
                ti.restore_frozen_rows = python_loop_restore
                results["python_loop"].append(time_per_step(base, args, Path(folder)))
                ti.restore_frozen_rows = restore

        if args.profile:
            profile_training(base, args, Path(folder))
        peak = None
        if torch.cuda.is_available():
            del bare_unet, bare_text_encoder, text_and_unet
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            time_training(base, args, Path(folder), args.short_steps)
            peak = torch.cuda.max_memory_allocated() / 2**30

    name = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"model {args.model}, {args.resolution} px, batch {args.batch_size}, precision {args.mixed_precision}"
    )
    steps = args.long_steps - args.short_steps
    print(f"device {name}; median (min-max) of {args.repeats} repeats, {steps} steps each")
    bare = statistics.median(results["bare_unet"])
    bare_text = statistics.median(results["bare_text_unet"])
    for key, values in results.items():
        if values:
            seconds = statistics.median(values)
            spread = f"{min(values) * 1000:.1f}-{max(values) * 1000:.1f}"
            print(
                f"{key:22s} {seconds * 1000:7.1f} ms/step ({spread})   {seconds / bare:5.2f} x bare UNet"
                f" fwd+bwd   {seconds / bare_text:5.2f} x bare text encoder + UNet"
            )
    if peak is not None:
        print(f"peak GPU memory of a training run: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
