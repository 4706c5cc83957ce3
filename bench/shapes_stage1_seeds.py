"""Stage 1 of the Shapes World recipe over several seeds: how often does it draw a good autoencoder?

Stage 1 (the autoencoder) is chaotic: any change of seed or numerics re-draws it, and one draw
per setting tells nothing about the setting (docs/shapes_runs.md, the stage-1 table). This
trains stage 1 alone (`shapes_train.py --diffusion-steps 0 --finetune-steps 0`) for each --seeds,
--parallel runs at a time with --threads each, and reads each autoencoder with
bench/shapes_autoencoder.py: the share of objects the judge reads right at latent noise 0, 0.2
and 0.4. Arguments after `--` go to shapes_train.py, so that two settings are compared on the
same seeds. A seed whose run is complete is not trained again (shapes_train.py resumes it at its
last step and saves its folder again). Prints a line per seed, then one JSON object with each
level's mean and worst seed, each seed's narrowest latent channel, and the seeds whose latent
space shapes_train.py's check after stage 1 warns of.

    python bench/shapes_stage1_seeds.py --root outputs/s1_defaults --seeds 0 1 2 3 4
    python bench/shapes_stage1_seeds.py --root outputs/s1_clip --seeds 0 1 2 3 4 -- --vae-max-grad-norm 1000
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cli  # noqa: E402

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from shapes_autoencoder import autoencoder_report  # noqa: E402

import shapes_train  # noqa: E402

LEVELS = ("noise_0.0", "noise_0.2", "noise_0.4")


def train_stage1(root: Path, seed: int, threads: int, train_args: list[str]) -> Path:
    """Run stage 1 for one seed in its own process (log in ROOT/seed-S.log); returns its pipeline folder."""
    out = root / f"seed-{seed}"
    command = [sys.executable, str(REPO / "shapes_train.py"), "--out", str(out), "--seed", str(seed)]
    command += ["--diffusion-steps", "0", "--finetune-steps", "0", "--threads", str(threads), *train_args]
    with open(root / f"seed-{seed}.log", "w") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out / "pipeline"


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--root", required=True, type=Path, help="folder for the runs, one per seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument(
        "--parallel", type=cli.positive_int, default=2, help="runs at once (each bound by its own thread)"
    )
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="CPU threads per run")
    parser.add_argument("train_args", nargs="*", default=[], help="after --: more shapes_train.py flags")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        folders = list(
            pool.map(lambda seed: train_stage1(args.root, seed, args.threads, args.train_args), args.seeds)
        )
    reports = {}
    for seed, folder in zip(args.seeds, folders):
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
        reports[seed] = autoencoder_report(vae)
        readings = ", ".join(f"{level} {reports[seed][level]:.1%}" for level in LEVELS)
        print(f"seed {seed}: {readings}, narrowest channel std {min(reports[seed]['channel_std']):.2f}")
    summary = {"train_args": args.train_args, "seeds": args.seeds}
    for level in LEVELS:
        readings = [report[level] for report in reports.values()]
        summary[level] = {"mean": statistics.mean(readings), "worst": min(readings), "each": readings}
    summary["narrowest_channel_std"] = [min(report["channel_std"]) for report in reports.values()]
    summary["fragile_seeds"] = [seed for seed, report in reports.items() if shapes_train.is_fragile(report)]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
