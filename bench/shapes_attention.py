"""Which words of a two-object caption does a Shapes World model's cross-attention put on each object?

Generates "a SIZE COLOUR SHAPE and a SIZE COLOUR SHAPE on a BACKGROUND background" for --scenes
two-object scenes (20 DDIM steps, guidance 7.5, as the local-blend study of bench/shapes_eval.py),
keeps the images in which the judge finds both objects, and averages each token group's
cross-attention over heads, steps and the layers of each UNet place and resolution. Prints one
JSON object: for each place and resolution, each group's share of attention that falls inside
the first and the second object's mask (a map spread evenly would give each object's share of
the image, `uniform`). The groups: each object's colour and shape words, "and", the words after
the second object ("on a black background") and the end token with the padding after it. A word
locates its object when its share there is well above `uniform`; LocalBlend's region comes from
such shares.

    python bench/shapes_attention.py --scenes 16
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from shapes_eval import BLEND_SEED, DEV_SEED_OFFSET, GUIDANCE, load_cpu_model  # noqa: E402

import prompt2prompt as p2p  # noqa: E402
import ptp_utils  # noqa: E402
from shapes_world import IMAGE_SIZE, judge, make_caption, sample_scene, scene_rng  # noqa: E402

SCENES = 16
STEPS = 20
SEED = BLEND_SEED + DEV_SEED_OFFSET  # the local-blend study's development scenes
PLACES = ("down", "mid", "up")


def word_groups(caption: str) -> dict[str, list[int]]:
    """Word places of "a S C SHAPE and a S C SHAPE on a B background", by role."""
    words = caption.split()
    second = words.index("and") + 1
    return {
        "first object": [2, 3],
        "and": [second - 1],
        "second object": [second + 2, second + 3],
        "words after it": list(range(second + 4, len(words))),
    }


def shares_inside(maps: torch.Tensor, masks: list[np.ndarray]) -> list[float]:
    """The share of a (res, res) attention map's mass inside each (64, 64) mask."""
    image = F.interpolate(maps[None, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")[0, 0].numpy()
    image = image / image.sum()
    return [float(image[mask].sum()) for mask in masks]


def attention_report(model, scenes: int) -> dict:
    """Each token group's mean share of attention inside the first and second object."""
    tokenizer = model.tokenizer
    shares, uniform, i, kept = {}, [], 0, 0
    while kept < scenes:
        scene = sample_scene(scene_rng(SEED, i))
        i += 1
        if len(scene.objects) != 2:
            continue
        caption = make_caption(scene.objects, scene.background)
        store = p2p.AttentionStore()
        generator = torch.Generator().manual_seed(SEED + i)
        (image,), _ = p2p.text2image_ldm(model, [caption], store, STEPS, GUIDANCE, generator)
        seen = judge(image)
        if len(seen.objects) != 2:
            continue
        kept += 1
        masks = [o.mask for o in seen.objects]  # the judge orders them left to right, as the caption
        uniform.append([float(mask.mean()) for mask in masks])
        groups = {
            name: [t for w in places for t in p2p.word_inds(caption, w, tokenizer)]
            for name, places in word_groups(caption).items()
        }
        end = len(tokenizer(caption).input_ids) - 1
        groups["end token and padding"] = list(range(end, tokenizer.model_max_length))
        for place in PLACES:
            layers = store.attention_store[f"{place}_cross"]
            for res in sorted({int(item.shape[1] ** 0.5) for item in layers}):
                maps = ptp_utils.aggregate_attention(store, [caption], res, [place], True, 0)
                for name, tokens in groups.items():
                    shares.setdefault(f"{place} {res}x{res}", {}).setdefault(name, []).append(
                        shares_inside(maps[..., tokens].mean(-1), masks)
                    )
    report = {
        layers: {name: np.mean(values, axis=0).round(3).tolist() for name, values in by_group.items()}
        for layers, by_group in shares.items()
    }
    return report | {"uniform": np.mean(uniform, axis=0).round(3).tolist(), "scenes": kept, "seed": SEED}


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default="shapes", help="the shipped model's short name, or a pipeline folder"
    )
    parser.add_argument("--scenes", type=cli.positive_int, default=SCENES, help="two-object images to read")
    args = parser.parse_args()
    print(json.dumps({"model": args.model} | attention_report(load_cpu_model(args.model), args.scenes)))


if __name__ == "__main__":
    main()
