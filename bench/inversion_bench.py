"""Seconds and peak memory per picture of each inversion method: DDIM inversion, negative-prompt
inversion and null-text inversion (prompt2prompt.py).

The methods run in turn, interleaved over --repeats rounds (after one short warm-up each), on one
picture and its caption; seconds as min/median/max. Peak memory per method: on CUDA the peak of
torch's allocator during the method (weights included: what must fit on the card); on CPU (Linux)
the process's peak resident size during the method (restarted before each), and the whole run's
peak from getrusage. `sd1-random` is Stable Diffusion 1.x's architecture with random weights: the
same work per step as the real model, and a loss that never meets null-text inversion's early
stop, so every inner step runs (its worst case).

    python bench/inversion_bench.py                                    # CUDA: fp16, 512 px, 50 steps
    python bench/inversion_bench.py --size 256 --steps 5 --repeats 1   # a short CPU run
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402  (before prompt2prompt: it quiets the libraries that imports)

import prompt2prompt as p2p  # noqa: E402

METHODS = ("ddim", "negative_prompt", "null_text")
WARM_UP_STEPS = 2
GB = 2**30


def process_status_bytes(field: str) -> int:
    """Linux: a size in /proc/self/status (VmRSS: resident now; VmHWM: its peak since the last reset
    through /proc/self/clear_refs), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field} line: the resident size needs Linux")


def resident_bytes() -> int:
    """Linux: the process's resident size now."""
    return process_status_bytes("VmRSS")


def reset_peak_resident() -> None:
    """Linux: the process's peak resident size (VmHWM) restarts from its size now."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_resident_bytes() -> int:
    """Linux: the process's peak resident size since the last reset through /proc/self/clear_refs."""
    return process_status_bytes("VmHWM")


def invert(model, method: str, image: np.ndarray, steps: int, inner_steps: int) -> None:
    """One inversion of `image` (captioned with the package's default source prompt) by `method`."""
    if method == "ddim":
        p2p.ddim_inversion(model, image, p2p.SOURCE_PROMPT, steps)
    elif method == "negative_prompt":
        p2p.negative_prompt_inversion(model, image, p2p.SOURCE_PROMPT, steps)
    else:
        p2p.NullInversion(model, steps).invert(image, p2p.SOURCE_PROMPT, inner_steps)


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd1-random", help="hub id, local folder or an offline short name")
    parser.add_argument(
        "--size", type=cli.positive_int, default=512, help="picture height and width in pixels"
    )
    parser.add_argument("--steps", type=cli.positive_int, default=p2p.NUM_DIFFUSION_STEPS, help="DDIM steps")
    parser.add_argument(
        "--inner-steps",
        type=cli.positive_int,
        default=p2p.NUM_INNER_STEPS,
        help="null-text optimisation steps per step",
    )
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="timed rounds of every method")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        default=None,
        help="the pipeline's dtype (default: float16 on CUDA, float32 on CPU)",
    )
    args = parser.parse_args()
    if args.size % 64:
        cli.usage_error(f"--size {args.size}: give a multiple of 64, such as 256 or 512")

    model = p2p.load_model(args.model, args.device, args.dtype and getattr(torch, args.dtype))
    model.set_progress_bar_config(disable=True)
    # The model's resolution is what every picture is resized to.
    model.unet.register_to_config(sample_size=args.size // model.vae_scale_factor)
    cuda = model.device.type == "cuda"
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)

    for method in METHODS:
        invert(model, method, image, WARM_UP_STEPS, WARM_UP_STEPS)
    seconds = {method: [] for method in METHODS}
    peak = dict.fromkeys(METHODS, 0)
    for _ in range(args.repeats):
        for method in METHODS:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_resident()
            started = time.perf_counter()
            invert(model, method, image, args.steps, args.inner_steps)
            if cuda:
                torch.cuda.synchronize()
            seconds[method].append(time.perf_counter() - started)
            used = torch.cuda.max_memory_allocated() if cuda else peak_resident_bytes()
            peak[method] = max(peak[method], used)

    device = torch.cuda.get_device_name() if cuda else "cpu"
    for method in METHODS:
        times = seconds[method]
        print(
            f"{method:>16}: {min(times):.2f} / {statistics.median(times):.2f} / {max(times):.2f} s "
            f"(min / median / max), peak {peak[method] / GB:.2f} GB"
        )
    summary = {
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "inner_steps": args.inner_steps,
        "repeats": args.repeats,
        "device": device,
        "dtype": str(model.unet.dtype).removeprefix("torch."),
        "seconds": {
            m: {"min": min(t), "median": statistics.median(t), "max": max(t)} for m, t in seconds.items()
        },
        "peak_gb": {m: p / GB for m, p in peak.items()},
        "process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
        "null_text_over_negative_prompt_time": statistics.median(seconds["null_text"])
        / statistics.median(seconds["negative_prompt"]),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
