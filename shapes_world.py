"""Shapes World: a procedural captioned data set and a judge for the package's own small model.

Every image is 64x64 RGB with one or two flat-coloured shapes on a plain background, drawn with
numpy from a seed, and comes with a plain-English caption such as "a large red circle" or "a blue
square and a yellow star on a black background". One colour-shape pair (HELD_OUT, "purple
triangle") never appears in a training scene, so that textual inversion has something truly new
to learn; `held_out_scene` renders it on demand.

The judge reads any 64x64 image back into objects (colour, shape, size, mask) without a learned
model: background from the border, objects as connected regions that differ from it, colour as
the nearest palette colour, shape as the best-fitting template in the object's bounding box,
size from that box. The shape templates are the very functions that draw the data set.

    python shapes_world.py check --n 2000        # the judge's accuracy on ground-truth images
    python shapes_world.py grid --out grid.png   # a grid of samples with their captions
    python shapes_world.py held-out --out DIR    # pictures of the held-out pair, for textual inversion
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cli

import numpy as np
import torch
from PIL import Image

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # sub-pixels per side: anti-aliased edges, as a camera (or a VAE) would see them
COLOURS = {
    "red": (215, 25, 25),
    "green": (30, 170, 50),
    "blue": (40, 80, 230),
    "yellow": (245, 225, 30),
    "purple": (150, 50, 200),
    "orange": (255, 130, 0),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = {"small": (6.0, 8.0), "large": (11.0, 13.0)}  # half-side of the object's box, in pixels
SIZE_SPLIT = 19  # box side in pixels between the two size ranges (12-16 vs 22-26)
POSITIONS = {
    "in the center": (32, 32),
    "on the left": (16, 32),
    "on the right": (48, 32),
    "at the top": (32, 16),
    "at the bottom": (32, 48),
}
JITTER = 3  # pixels of random shift around a named position
PAIR_X = (16, 48)  # centres of the left and right object of a two-object scene
HELD_OUT = ("purple", "triangle")
P_TWO_OBJECTS = 0.5
P_SIZE_WORD = 0.5
P_POSITION_WORD = 0.5
P_BACKGROUND_WORD = 0.5
# Judge settings: a pixel is foreground when it is this far (RGB, 0-255) from the background,
# a region smaller than MIN_AREA pixels is noise, and an object's mask is where the pixel is
# at least half-way from the background to the object's colour.
FOREGROUND_DISTANCE = 40.0
MIN_AREA = 12
SHAPE_BOX_GROWTH = (0.0, 0.5, 1.0)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _fill_box(vertices: np.ndarray) -> np.ndarray:
    """Stretch a polygon so that its bounding box is [-1, 1]^2, as every shape's is."""
    low, high = vertices.min(0), vertices.max(0)
    return 2 * (vertices - low) / (high - low) - 1


# Polygons in box coordinates (u right, v down, both in [-1, 1]); the circle is the unit disc.
POLYGONS = {
    "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float),
    "triangle": np.array([[0, -1], [1, 1], [-1, 1]], dtype=float),
    "diamond": np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], dtype=float),
    "star": _fill_box(_star()),
}


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u, v) of the box [-1, 1]^2 lie inside `shape`: drawing and judging both use it."""
    if shape == "circle":
        return u**2 + v**2 <= 1
    # Even-odd rule: count the polygon edges that a ray from the point to the right crosses.
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    vertices = POLYGONS[shape]
    for (u0, v0), (u1, v1) in zip(vertices, np.roll(vertices, -1, axis=0), strict=True):
        if v0 == v1:
            continue
        crosses = (v0 > v) != (v1 > v)
        inside ^= crosses & (u < u0 + (v - v0) * (u1 - u0) / (v1 - v0))
    return inside


@dataclass
class ShapeObject:
    """One object of a scene: its words, and where it is drawn (centre and half-side in pixels)."""

    colour: str
    shape: str
    size: str
    x: float
    y: float
    radius: float


@dataclass
class Scene:
    """A picture's content and its caption."""

    objects: list[ShapeObject]
    background: str
    caption: str
    position: str | None = None  # the named position of a one-object scene
    words: dict = field(default_factory=dict)  # which optional words the caption mentions


def _phrase(obj: ShapeObject, with_size: bool) -> str:
    words = ([obj.size] if with_size else []) + [obj.colour, obj.shape]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def make_caption(
    objects: list[ShapeObject],
    background: str,
    position: str | None = None,
    with_size: bool = True,
    with_background: bool = True,
) -> str:
    """The plain-English caption of a scene: objects left to right, then position and background."""
    caption = " and ".join(_phrase(obj, with_size) for obj in objects)
    if position is not None:
        caption += f" {position}"
    if with_background:
        caption += f" on a {background} background"
    return caption


def _make_object(rng: np.random.Generator, colour: str, shape: str, size: str, x: float, y: float):
    return ShapeObject(colour, shape, size, float(x), float(y), float(rng.uniform(*SIZES[size])))


def _pick_pair(rng: np.random.Generator, allow_held_out: bool) -> tuple[str, str]:
    while True:
        pair = (str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)))
        if allow_held_out or pair != HELD_OUT:
            return pair


def sample_scene(rng: np.random.Generator, allow_held_out: bool = False) -> Scene:
    """A random scene of the training distribution (step 1: the data set).

    Unless `allow_held_out`, the pair HELD_OUT never appears in the picture nor in the caption.
    Optional words (size, position, background) are dropped at random, so that a caption such
    as "a red circle" stands for any size, place and background.
    """
    background = str(rng.choice(list(BACKGROUNDS)))
    words = {
        "size": bool(rng.random() < P_SIZE_WORD),
        "background": bool(rng.random() < P_BACKGROUND_WORD),
    }
    if rng.random() < P_TWO_OBJECTS:
        y = rng.uniform(18, IMAGE_SIZE - 18, size=2)
        objects = []
        for x, y_ in zip(PAIR_X, y, strict=True):
            colour, shape = _pick_pair(rng, allow_held_out)
            size = str(rng.choice(list(SIZES)))
            objects.append(_make_object(rng, colour, shape, size, x + rng.uniform(-2, 2), y_))
        position = None
    else:
        colour, shape = _pick_pair(rng, allow_held_out)
        size = str(rng.choice(list(SIZES)))
        position = str(rng.choice(list(POSITIONS)))
        x, y = np.array(POSITIONS[position]) + rng.uniform(-JITTER, JITTER, size=2)
        objects = [_make_object(rng, colour, shape, size, x, y)]
        words["position"] = bool(rng.random() < P_POSITION_WORD)
    caption = make_caption(
        objects,
        background,
        position if words.get("position") else None,
        with_size=words["size"],
        with_background=words["background"],
    )
    return Scene(objects, background, caption, position, words)


def held_out_scene(rng: np.random.Generator, size: str | None = None, background: str | None = None) -> Scene:
    """One HELD_OUT object ("a purple triangle"), centred with jitter: textual inversion's images."""
    size = size or str(rng.choice(list(SIZES)))
    background = background or str(rng.choice(list(BACKGROUNDS)))
    x, y = np.array(POSITIONS["in the center"]) + rng.uniform(-JITTER, JITTER, size=2)
    obj = _make_object(rng, *HELD_OUT, size, x, y)
    return Scene([obj], background, make_caption([obj], background), "in the center")


def save_held_out_images(folder: str | Path, n: int = 5, seed: int = 0) -> list[Path]:
    """Write n pictures of the held-out pair as PNGs: a textual-inversion concept folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{HELD_OUT[0]}_{HELD_OUT[1]}_{i}.png" for i in range(n)]
    for i, path in enumerate(paths):
        Image.fromarray(render(held_out_scene(scene_rng(seed, i)))).save(path)
    return paths


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: a (64, 64, 3) uint8 array, objects anti-aliased by supersampling."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3))
    image[:] = BACKGROUNDS[scene.background]
    for obj in scene.objects:
        x0, x1 = int(np.floor(obj.x - obj.radius)), int(np.ceil(obj.x + obj.radius))
        y0, y1 = int(np.floor(obj.y - obj.radius)), int(np.ceil(obj.y + obj.radius))
        sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
        xs = (np.arange(x0, x1)[:, None] + sub).ravel()
        ys = (np.arange(y0, y1)[:, None] + sub).ravel()
        inside = shape_mask(obj.shape, (xs[None, :] - obj.x) / obj.radius, (ys[:, None] - obj.y) / obj.radius)
        coverage = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        patch = image[y0:y1, x0:x1]
        patch[:] = (1 - coverage) * patch + coverage * np.array(COLOURS[obj.colour])
    return np.round(image).astype(np.uint8)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of item `index` of the data set with seed `seed`, independent of all others."""
    return np.random.default_rng([seed, index])


def make_batch(seed: int, indices: range | list[int]) -> tuple[torch.Tensor, list[str]]:
    """Items `indices` of the data set `seed`: images as (B, 3, 64, 64) floats in [-1, 1], captions."""
    scenes = [sample_scene(scene_rng(seed, i)) for i in indices]
    images = np.stack([render(s) for s in scenes])
    return to_tensor(images), [s.caption for s in scenes]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (B, H, W, 3) to the diffusers convention: (B, 3, H, W) floats in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """The inverse of to_tensor: (B, 3, H, W) in [-1, 1] (clipped) to uint8 (B, H, W, 3)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class ShapesWorld(torch.utils.data.Dataset):
    """The training set as a torch Dataset of (image in [-1, 1], caption), drawn on the fly.

    Item i depends only on (seed, i), so the set is the same on every machine, in any order,
    with any number of DataLoader workers.
    """

    def __init__(self, length: int = 100_000, seed: int = 0):
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesWorld of length {self.length}")
        images, captions = make_batch(self.seed, [index])
        return images[0], captions[0]


@dataclass
class JudgedObject:
    """What the judge sees of one object."""

    colour: str
    shape: str
    size: str
    mask: np.ndarray  # (64, 64) bool
    shape_score: float  # IoU of the mask with the chosen shape's template


@dataclass
class Judgement:
    """What the judge sees in an image: the background's name and the objects, left to right."""

    background: str
    objects: list[JudgedObject]


def _nearest(palette: dict[str, tuple[int, int, int]], colour: np.ndarray) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.array([palette[n] for n in names], dtype=float) - colour, axis=1)
    return names[int(distances.argmin())]


def connected_regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 4-connected regions of a boolean mask, by propagating the smallest pixel index."""
    none = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        smallest = np.where(mask, np.minimum.reduce([labels, *neighbours]), none)
        if np.array_equal(smallest, labels):
            return [labels == label for label in np.unique(labels[mask])]
        labels = smallest


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """The shape whose template, fitted to the mask's bounding box, overlaps the mask best (IoU).

    Sharp tips (of a triangle, star or diamond) cover less than half a pixel and drop out of
    the mask, so each template is also tried in the box grown by SHAPE_BOX_GROWTH pixels a side.
    """
    rows, cols = np.nonzero(mask)
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = mask[y0:y1, x0:x1]
    scores = {}
    for grow in SHAPE_BOX_GROWTH:
        u = 2 * (np.arange(x1 - x0) + 0.5 + grow) / (x1 - x0 + 2 * grow) - 1
        v = 2 * (np.arange(y1 - y0) + 0.5 + grow) / (y1 - y0 + 2 * grow) - 1
        for shape in SHAPES:
            template = shape_mask(shape, u[None, :], v[:, None])
            iou = (template & box).sum() / (template | box).sum()
            scores[shape] = max(scores.get(shape, 0.0), float(iou))
    best = max(scores, key=scores.get)
    return best, scores[best]


def judge(image: np.ndarray) -> Judgement:
    """Read a (64, 64, 3) uint8 image into background and objects (step 2: the judge)."""
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"the judge reads (64, 64, 3) RGB images, got shape {image.shape}")
    pixels = image.astype(float)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)])
    border = np.concatenate([border, pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    offset = pixels - background
    distance = np.linalg.norm(offset, axis=-1)
    objects = []
    for region in connected_regions(distance > FOREGROUND_DISTANCE):
        if region.sum() < MIN_AREA:
            continue
        # The object's colour is that of its most saturated pixels, not its anti-aliased rim.
        core = region & (distance >= 0.7 * distance[region].max())
        colour = np.median(pixels[core], axis=0)
        direction = colour - background
        # Fraction of the way from the background to the object colour: coverage, for a drawn image.
        coverage = offset @ direction / (direction @ direction)
        mask = region & (coverage >= 0.5)
        if mask.sum() < MIN_AREA:
            continue
        rows, cols = np.nonzero(mask)
        side = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        shape, score = classify_shape(mask)
        size = "large" if side >= SIZE_SPLIT else "small"
        objects.append(JudgedObject(_nearest(COLOURS, colour), shape, size, mask, score))
    objects.sort(key=lambda o: np.nonzero(o.mask)[1].mean())
    return Judgement(_nearest(BACKGROUNDS, background), objects)


def objects_mask(seen: Judgement) -> np.ndarray:
    """Where the judge found any object: the union of the object masks."""
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    for obj in seen.objects:
        mask |= obj.mask
    return mask


def layout_iou(a: Judgement, b: Judgement) -> float:
    """IoU of the object masks of two images (1 when both are empty)."""
    mask_a, mask_b = objects_mask(a), objects_mask(b)
    union = (mask_a | mask_b).sum()
    return float((mask_a & mask_b).sum() / union) if union else 1.0


def judge_accuracy(
    n: int = 2000, seed: int = 1, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> dict[str, float]:
    """The judge on n ground-truth images of the data set: the share of objects it reads right.

    An object counts as right when the judge finds as many objects as were drawn and reads its
    colour, shape and size (objects are matched left to right). `transform`, if given, maps the
    (n, 64, 64, 3) uint8 images to others first (for example an autoencoder's reconstructions).
    """
    scenes = [sample_scene(scene_rng(seed, i)) for i in range(n)]
    images = np.stack([render(scene) for scene in scenes])
    if transform is not None:
        images = transform(images)
    right = {"colour": 0, "shape": 0, "size": 0, "all": 0}
    objects = background = counts = 0
    for scene, image in zip(scenes, images, strict=True):
        seen = judge(image)
        objects += len(scene.objects)
        background += seen.background == scene.background
        if len(seen.objects) != len(scene.objects):
            continue
        counts += 1
        for truth, read in zip(scene.objects, seen.objects, strict=True):
            hits = {key: getattr(truth, key) == getattr(read, key) for key in ("colour", "shape", "size")}
            hits["all"] = all(hits.values())
            for key, hit in hits.items():
                right[key] += hit
    report = {key: value / objects for key, value in right.items()}
    report.update(background=background / n, count=counts / n, images=n, objects=objects, seed=seed)
    return report


def save_grid(path: str, n: int = 16, seed: int = 0) -> None:
    """A figure of n data set items with their captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows))
    for i, ax in enumerate(np.ravel(axes)):
        ax.axis("off")
        if i < n:
            scene = sample_scene(scene_rng(seed, i))
            ax.imshow(render(scene))
            ax.set_title(scene.caption, fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(
        dest="command", metavar="{check,grid,held-out}", required=True, help="what to do"
    )
    check = commands.add_parser("check", help="measure the judge's accuracy on ground-truth images")
    check.add_argument("--n", type=cli.positive_int, default=2000, help="number of images")
    check.add_argument("--seed", type=int, default=1, help="data set seed")
    grid = commands.add_parser("grid", help="save a grid of data set samples with captions")
    grid.add_argument(
        "--out", default="outputs/shapes_grid.png", help="image file to write (.png, .jpg, .pdf, .svg, ...)"
    )
    grid.add_argument("--n", type=cli.positive_int, default=16, help="number of samples")
    grid.add_argument("--seed", type=int, default=0, help="data set seed")
    held_out = commands.add_parser("held-out", help="pictures of the held-out pair, for textual inversion")
    held_out.add_argument("--out", default="data/purple_triangle", help="folder to write the PNGs to")
    held_out.add_argument("--n", type=cli.positive_int, default=5, help="number of pictures")
    held_out.add_argument("--seed", type=int, default=0, help="seed of their sizes, places and backgrounds")
    args = parser.parse_args()
    if args.command == "check":
        print(json.dumps(judge_accuracy(args.n, args.seed)))
    elif args.command == "held-out":
        if Path(args.out).is_file():
            cli.usage_error(f"--out {args.out}: a file; give a folder for the pictures")
        paths = save_held_out_images(args.out, args.n, args.seed)
        print(f"wrote {len(paths)} pictures of a {' '.join(HELD_OUT)} to {args.out}")
    else:
        from matplotlib.backend_bases import FigureCanvasBase

        suffix = Path(args.out).suffix.lower().lstrip(".")
        formats = FigureCanvasBase.get_supported_filetypes()
        if suffix not in formats:
            cli.usage_error(f"--out {args.out}: name an image file ending in one of .{', .'.join(formats)}")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_grid(args.out, args.n, args.seed)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
