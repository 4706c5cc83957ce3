"""Time and peak memory of each Prompt-to-Prompt edit against diffusers' own pipeline, in one run.

  pipeline   the model's own diffusers pipeline (StableDiffusionPipeline or StableDiffusionXLPipeline)
             generating the two images of the word swap
  replace    AttentionReplace: "... on a bicycle." -> "... on a motorcycle."
  refine     AttentionRefine: a word added ("... on a red bicycle.")
  reweight   AttentionReweight alone: the source prompt against itself, "cat" weighing twice
  blend      the word swap with a LocalBlend on the swapped words
  naive      the word swap with every attention matrix materialised (the reference code's way)

One process loads the model and runs every variant once to warm up; then each of --repeats rounds
runs the pipeline and every edit once, in turn (interleaved: a slow spell of a shared machine
touches them all; each round starts one variant later than the last, so none always runs first).
Each edit's time is divided by the pipeline's of the same round: min, median and max of those
ratios over the rounds. Peak memory of a run, on CUDA: torch's max_memory_allocated over what was
allocated before it. On the CPU the allocator keeps freed memory for the next run, so one process
cannot separate the variants: with --memory each variant runs once more in a fresh process of its
own (Linux), and its peak resident size over the size before the run is its peak memory. On CUDA
the total peak (weights included) says whether an edit fits a card (`p2p_total_peak_gb`).
Prints a table, then the figures as JSON, last.

    python bench/p2p_bench.py                                                # tiny pipeline, 64 px
    python bench/p2p_bench.py --model sd1-random --size 256 --steps 5 --repeats 3 --memory
    python bench/p2p_bench.py --model sd1-random --size 512 --steps 50 --repeats 7   # on a GPU, fp16
    python bench/p2p_bench.py --model sdxl-random --size 1024 --steps 50 --repeats 3  # SDXL, on a GPU
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402

import torch  # noqa: E402

import prompt2prompt as p2p  # noqa: E402
import ptp_utils  # noqa: E402
from inversion_bench import peak_resident_bytes, reset_peak_resident, resident_bytes  # noqa: E402

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

EDITS = ("replace", "refine", "reweight", "blend", "naive")
DEFAULT_EDITS = ("replace", "refine", "reweight", "blend")
SOURCE = p2p.SOURCE_PROMPT
TARGETS = {
    "replace": p2p.TARGET_PROMPT,
    "refine": "photo of a cat riding on a red bicycle.",
    "reweight": SOURCE,
    "blend": p2p.TARGET_PROMPT,
    "naive": p2p.TARGET_PROMPT,
}
REWEIGHT_WORD, REWEIGHT_SCALE = "cat", 2.0
BLEND_WORDS = ["bicycle", "motorcycle"]


class MaterialiseEverything(p2p.AttentionReplace):
    """The word swap, but every layer at every step computes its attention probabilities explicitly."""

    def needs_attention(self, is_cross: bool, place_in_unet: str, num_queries: int) -> bool:
        return p2p.AttentionControl.needs_attention(self, is_cross, place_in_unet, num_queries)


def make_controller(edit: str, model: StableDiffusionPipeline, steps: int) -> p2p.AttentionControlEdit:
    """The controller of one edit of the prompts [SOURCE, TARGETS[edit]], built afresh for each run."""
    prompts = [SOURCE, TARGETS[edit]]
    settings = dict(
        num_steps=steps,
        cross_replace_steps=p2p.CROSS_REPLACE_STEPS,
        self_replace_steps=p2p.SELF_REPLACE_STEPS,
        tokenizer=model.tokenizer,
        device=model.device,
    )
    if edit == "refine":
        return p2p.AttentionRefine(prompts, **settings)
    if edit == "reweight":
        equalizer = p2p.get_equalizer(SOURCE, REWEIGHT_WORD, [REWEIGHT_SCALE], model.tokenizer)
        return p2p.AttentionReweight(prompts, equalizer=equalizer, **settings)
    if edit == "blend":
        blend = p2p.LocalBlend(prompts, BLEND_WORDS, model.tokenizer)
        return p2p.AttentionReplace(prompts, local_blend=blend, **settings)
    if edit == "naive":
        return MaterialiseEverything(prompts, **settings)
    return p2p.AttentionReplace(prompts, **settings)


def make_runs(
    model: StableDiffusionPipeline, edits: list[str], size: int, steps: int
) -> dict[str, Callable[[], None]]:
    """One generation of the two images per variant, all from the same x_T."""
    latent_size = size // model.vae_scale_factor
    channels = model.unet.config.in_channels
    x_t = torch.randn(1, channels, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    x_t = x_t.to(model.device, model.unet.dtype)

    def pipeline() -> None:
        model(
            [SOURCE, TARGETS["replace"]],
            height=size,
            width=size,
            num_inference_steps=steps,
            latents=x_t.expand(2, -1, -1, -1),
            guidance_scale=p2p.GUIDANCE_SCALE,  # SDXL's pipeline defaults to 5: the same images
            output_type="np",
        )

    def edit_run(edit: str) -> Callable[[], None]:
        def run() -> None:
            controller = make_controller(edit, model, steps)
            prompts = [SOURCE, TARGETS[edit]]
            p2p.text2image_ldm(model, prompts, controller, steps, latent=x_t, height=size, width=size)

        return run

    return {"pipeline": pipeline} | {edit: edit_run(edit) for edit in edits}


def timed(run: Callable[[], None], cuda: bool) -> tuple[float, float | None]:
    """Seconds of one run, and its peak memory in MB over what was allocated before it (CUDA only)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None


def fresh_process_peak(model_id: str, edit: str, size: int, steps: int) -> float:
    """MB: the peak resident size of one run of `edit` (or "pipeline") in this fresh process, over
    the process's size before the run (Linux). Its first run: nothing freed earlier is reused."""
    model = ptp_utils.load_pipeline(model_id, "cpu")
    model.set_progress_bar_config(disable=True)
    run = make_runs(model, [] if edit == "pipeline" else [edit], size, steps)[edit]
    reset_peak_resident()
    before = resident_bytes()
    run()
    return (peak_resident_bytes() - before) / 2**20


def spread(values: list[float]) -> dict[str, float]:
    """Min, median and max."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny", help="hub id, local folder or an offline short name")
    parser.add_argument("--size", type=cli.positive_int, default=64, help="image height and width in pixels")
    parser.add_argument("--steps", type=cli.positive_int, default=10, help="denoising steps")
    parser.add_argument(
        "--repeats", type=cli.positive_int, default=3, help="timed rounds (every variant once per round)"
    )
    parser.add_argument("--edits", nargs="+", choices=EDITS, default=DEFAULT_EDITS, help="edits to time")
    parser.add_argument("--device", help="cuda or cpu; None: cuda when available")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="on the CPU, also run each variant once in a fresh process for its peak memory (Linux)",
    )
    args = parser.parse_args()

    model = ptp_utils.load_pipeline_or_exit(args.model, args.device)
    ptp_utils.check_sampler_steps(model.scheduler, args.steps, type(model.scheduler).__name__)
    if args.size % model.vae_scale_factor:
        cli.usage_error(f"--size {args.size}: give a multiple of {model.vae_scale_factor}")
    model.set_progress_bar_config(disable=True)
    cuda = model.device.type == "cuda"
    runs = make_runs(model, list(dict.fromkeys(args.edits)), args.size, args.steps)
    for run in runs.values():  # warm-up: one-time allocations and caches do not count
        run()
    seconds = {name: [] for name in runs}
    peaks = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            took, peak = timed(runs[name], cuda)
            seconds[name].append(took)
            peaks[name].append(peak)
    if args.memory and not cuda:
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for name in names:
                peaks[name] = [pool.apply(fresh_process_peak, (args.model, name, args.size, args.steps))]
    measured = cuda or args.memory

    device = torch.cuda.get_device_name(model.device) if cuda else "cpu"
    for name in runs:
        low, mid, high = spread(seconds[name]).values()
        memory = f"peak {statistics.median(peaks[name]):.0f} MB" if measured else "peak n/a"
        print(f"{name:>9}: {mid:.3f} s (min {low:.3f}, max {high:.3f}), {memory} ({device})")
    summary = {
        "model": args.model,
        "size": args.size,
        "steps": args.steps,
        "repeats": args.repeats,
        "device": device,
        "dtype": str(model.unet.dtype).removeprefix("torch."),
        "seconds": {name: spread(times) for name, times in seconds.items()},
    }
    pipeline = seconds["pipeline"]
    for edit in [name for name in runs if name != "pipeline"]:
        ratios = [took / base for took, base in zip(seconds[edit], pipeline, strict=True)]
        summary[f"{edit}_over_pipeline_time"] = spread(ratios)
        summary[f"{edit}_over_pipeline_memory"] = (
            max(peaks[edit]) / max(peaks["pipeline"]) if measured else "n/a"
        )
    if cuda:
        summary["p2p_total_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
