"""Time and peak memory of a Prompt-to-Prompt edit against diffusers' own pipeline, in one run.

  (a) pipeline:   the model's own diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline)
                  generating the same two images
  (b) p2p:        text2image_ldm with AttentionReplace (attention materialised only where edited)
  (c) p2p_naive:  the same edit with every attention matrix materialised (the reference code's way)

Each variant runs in a fresh subprocess, warms up once, then is timed (median of --repeats) while
its peak memory is taken: on CUDA the peak of torch's allocator, on CPU (Linux) the peak resident
size over the size before the timed runs; the total peak (weights included) says what the device
must hold. Prints a table and the ratios (b)/(a) and (c)/(a) as JSON, last.

    python bench/p2p_bench.py                      # tiny random pipeline, 64 px, CPU
    python bench/p2p_bench.py --model CompVis/stable-diffusion-v1-4 --size 512 --steps 50   # on a GPU
    python bench/p2p_bench.py --model sdxl-random --size 1024 --steps 50   # SDXL's architecture, on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import prompt2prompt as p2p  # noqa: E402

VARIANTS = ("pipeline", "p2p", "p2p_naive")
PROMPTS = [p2p.SOURCE_PROMPT, p2p.TARGET_PROMPT]


class MaterialiseEverything(p2p.AttentionReplace):
    """The same edit, but every layer at every step computes its attention probabilities explicitly."""

    def needs_attention(self, is_cross: bool, place_in_unet: str, num_queries: int) -> bool:
        return p2p.AttentionControl.needs_attention(self, is_cross, place_in_unet, num_queries)


def proc_status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def run_variant(args: argparse.Namespace) -> dict:
    model = p2p.load_model(args.model, args.device)
    model.set_progress_bar_config(disable=True)
    cuda = model.device.type == "cuda"
    x_t = torch.randn(
        1,
        4,
        args.size // model.vae_scale_factor,
        args.size // model.vae_scale_factor,
        generator=torch.Generator().manual_seed(0),
    ).to(model.device, model.unet.dtype)

    def generate():
        if args.variant == "pipeline":
            model(
                PROMPTS,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                latents=x_t.expand(2, -1, -1, -1),
                guidance_scale=p2p.GUIDANCE_SCALE,  # SDXL's pipeline defaults to 5: the same images
                output_type="np",
            )
            return
        controller_class = p2p.AttentionReplace if args.variant == "p2p" else MaterialiseEverything
        controller = controller_class(
            PROMPTS,
            args.steps,
            p2p.CROSS_REPLACE_STEPS,
            p2p.SELF_REPLACE_STEPS,
            tokenizer=model.tokenizer,
            device=model.device,
        )
        p2p.text2image_ldm(
            model, PROMPTS, controller, args.steps, latent=x_t, height=args.size, width=args.size
        )

    generate()  # warm-up: one-time allocations and caches do not count
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size restarts from now
        base = proc_status_bytes("VmRSS")
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        generate()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    total_peak = torch.cuda.max_memory_allocated() if cuda else proc_status_bytes("VmHWM")
    return {
        "variant": args.variant,
        "seconds": statistics.median(times),
        "peak_mb": (total_peak - base) / 2**20,
        "total_peak_mb": total_peak / 2**20,
        "device": str(model.device),
        "name": torch.cuda.get_device_name() if cuda else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="hub id, local folder or an offline short name")
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # set for the subprocesses
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
        r = results[variant]
        print(
            f"{variant:>10}: {r['seconds']:.3f} s, peak {r['peak_mb']:.0f} MB over the weights, "
            f"{r['total_peak_mb']:.0f} MB in all ({r['name']})"
        )
    a = results["pipeline"]
    summary = {
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "device": a["name"],
        "p2p_over_pipeline_time": results["p2p"]["seconds"] / a["seconds"],
        "p2p_over_pipeline_memory": results["p2p"]["peak_mb"] / a["peak_mb"],
        "naive_over_pipeline_time": results["p2p_naive"]["seconds"] / a["seconds"],
        "naive_over_pipeline_memory": results["p2p_naive"]["peak_mb"] / a["peak_mb"],
        "p2p_total_peak_gb": results["p2p"]["total_peak_mb"] / 2**10,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
