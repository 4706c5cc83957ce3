"""Time per textual-inversion training step: our loop, the Python row-restore loop, a bare UNet pass.

All three run in one process on one machine, interleaved over several repeats, on the same batch
shape. A loop's time per step is the difference between a long and a short run of
`textual_inversion()` divided by the extra steps, so set-up (adding tokens, encoding the images,
saving) cancels out. The bare pass is UNet forward + backward to the prompt embeddings only.

    python bench/ti_step_bench.py                                   # tiny pipeline, CPU
    python bench/ti_step_bench.py --model sd1-random --mixed-precision fp16 --resolution 512
    python bench/ti_step_bench.py --model CompVis/stable-diffusion-v1-4 --mixed-precision fp16

`sd1-random` is the SD 1.x architecture (UNet, VAE, CLIP ViT-L text encoder) with random weights:
the same shapes and work per step as the real model, without a download.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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


def time_per_step(base, args, folder) -> float:
    extra = args.long_steps - args.short_steps
    return (
        time_training(base, args, folder, args.long_steps)
        - time_training(base, args, folder, args.short_steps)
    ) / extra


def time_bare_unet(
    unet: UNet2DConditionModel, batch_size: int, latent_size: int, text_dim: int, steps: int
) -> float:
    """Seconds per UNet forward + backward to fp32 prompt embeddings, as `predict_noise` casts them."""
    device = unet.device
    noisy = torch.randn(batch_size, 4, latent_size, latent_size, device=device)
    noise = torch.randn_like(noisy)
    timesteps = torch.randint(1000, (batch_size,), device=device)
    embeddings = torch.randn(batch_size, 77, text_dim, device=device, requires_grad=True)
    synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        prediction = unet(
            noisy.to(unet.dtype), timesteps, encoder_hidden_states=embeddings.to(unet.dtype)
        ).sample
        F.mse_loss(prediction.float(), noise).backward()
        embeddings.grad = None
    synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    offline = ", ".join(ptp_utils.OFFLINE_MODELS)
    parser.add_argument("--model", default="tiny", help=f"hub id or folder, or offline: {offline}")
    parser.add_argument("--resolution", type=int, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--short-steps", type=int, default=2)
    parser.add_argument("--long-steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-python-loop", action="store_true", help="it costs seconds per step on SD")
    args = parser.parse_args()

    base = ptp_utils.load_pipeline(args.model, device="cpu", dtype=torch.float32)
    base.set_progress_bar_config(disable=True)
    args.resolution = args.resolution or base.unet.config.sample_size * base.vae_scale_factor
    device = PartialState().device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    bare_unet = copy.deepcopy(base.unet).to(device).requires_grad_(False)
    if weight_dtype != torch.float32:  # as textual_inversion() casts the frozen UNet
        bare_unet.to(weight_dtype)
    bare_shape = (
        args.batch_size,
        args.resolution // base.vae_scale_factor,
        base.text_encoder.config.hidden_size,
    )

    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for i in range(NUM_IMAGES):
            pixels = rng.integers(0, 256, (args.resolution, args.resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(Path(folder) / f"{i}.png")

        time_bare_unet(bare_unet, *bare_shape, steps=3)  # warm-up: CUDA context, cuDNN algorithm choice
        restore = ti.restore_frozen_rows
        results = {"ours": [], "python_loop": [], "bare_unet": []}
        for _ in range(args.repeats):
            bare_steps = args.long_steps - args.short_steps
            results["bare_unet"].append(time_bare_unet(bare_unet, *bare_shape, bare_steps))
            results["ours"].append(time_per_step(base, args, Path(folder)))
            if not args.skip_python_loop:
                ti.restore_frozen_rows = python_loop_restore
                results["python_loop"].append(time_per_step(base, args, Path(folder)))
                ti.restore_frozen_rows = restore

        peak = None
        if torch.cuda.is_available():
            del bare_unet
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
    print(f"device {name}; median of {args.repeats} repeats, {args.long_steps - args.short_steps} steps each")
    bare = statistics.median(results["bare_unet"])
    for key, values in results.items():
        if values:
            seconds = statistics.median(values)
            print(f"{key:12s} {seconds * 1000:10.1f} ms/step   {seconds / bare:6.2f} x bare UNet fwd+bwd")
    if peak is not None:
        print(f"peak GPU memory of a training run: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
