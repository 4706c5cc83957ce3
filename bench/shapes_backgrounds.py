"""Does a Shapes World model draw the background its caption names, or the one its noise suggests?

Generates "a large red circle on a <background> background" for every background from the same
--seeds starting noises (50 DDIM steps, guidance 7.5, as bench/shapes_eval.py) and reads each
image's background with the judge. Prints one JSON object:
  <background>      the share of seeds whose image has the captioned background
  noise_decides     the share of seeds whose images have one same background whatever the
                    caption says: the background came from the noise, not from the words

    python bench/shapes_backgrounds.py --model outputs/shapes_v6_5600/pipeline
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402

import numpy as np  # noqa: E402
from shapes_eval import load_cpu_model, pipeline_images  # noqa: E402

from shapes_world import BACKGROUNDS, judge  # noqa: E402

SEEDS = 24
SEED = 500  # base seed of the starting noises, apart from shapes_eval's studies
CAPTION = "a large red circle on a {} background"


def background_report(model, seeds: int) -> dict:
    """The share of captioned backgrounds drawn, per background, and how often the noise decides."""
    noise_seeds = [SEED + i for i in range(seeds)]
    seen = {
        background: [
            judge(image).background
            for image in pipeline_images(model, [CAPTION.format(background)] * seeds, noise_seeds)
        ]
        for background in BACKGROUNDS
    }
    report = {
        background: float(np.mean([s == background for s in drawn])) for background, drawn in seen.items()
    }
    report["noise_decides"] = float(
        np.mean([len(set(drawn)) == 1 for drawn in zip(*seen.values(), strict=True)])
    )
    report["seeds"] = seeds
    return report


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default="shapes", help="the shipped model's short name, or a pipeline folder"
    )
    parser.add_argument("--seeds", type=cli.positive_int, default=SEEDS, help="starting noises per caption")
    args = parser.parse_args()
    print(json.dumps({"model": args.model} | background_report(load_cpu_model(args.model), args.seeds)))


if __name__ == "__main__":
    main()
