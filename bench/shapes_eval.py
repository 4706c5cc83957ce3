"""The measured figures of the shipped Shapes World model, read by the judge of shapes_world.py.

  adherence         200 random captions of the training vocabulary (50 DDIM steps, guidance 7.5):
                    the share of captioned objects whose colour and shape the judge finds
  p2p_*, plain_*    word swaps (colour, shape, background) over --seeds seeds: the edit succeeds
                    when the judge sees the new word; the layout is kept as the IoU of the object
                    masks of source and edit. Prompt-to-Prompt (AttentionReplace) against plain
                    regeneration of the target prompt from the same x_T; background swaps
                    without self-attention injection (SELF_REPLACE_STEPS).
  ti_success        textual inversion of the held-out pair (HELD_OUT, never in a training caption)
                    from 5 rendered images: the share of samples of "a <token>" that the judge reads
                    as that pair; init_success is the same for the initializer word alone,
                    named_success for the pair's own words ("a purple triangle").
  inversion_*       --inversion-scenes rendered one-object scenes (ground truth, not generated), each
                    inverted with its own caption by DDIM inversion, negative-prompt inversion and
                    null-text inversion: the PSNR of the reconstruction (guidance 7.5) against the
                    picture, with the VAE's own round trip (vae_roundtrip_psnr) as the ceiling, and
                    seconds per picture of each method. real_edit_success: a shape swap made with
                    Prompt-to-Prompt on the null-text inversion, the target taking
                    --target-null-weight of each step's null embedding, is judged the new shape
                    with the picture's colour, background and position; real_edit_layout_iou
                    against the picture; real_edit_by_method: each inversion's plain swap too, the
                    swap keeping the source's tokens (keep_source_tokens), and "generated": the
                    same swap on a picture the model generated from noise with the same caption,
                    judged alike against that picture (size aside): what this model's
                    Prompt-to-Prompt swap reaches without an inversion.
  refine_*          --edit-scenes one-object captions without a size word ("a red circle on a black
                    background"), refined with AttentionRefine to "a small ..." and "a large ...":
                    success when the judge reads the asked size with the source's colour, shape,
                    background and place; layout IoU against the source; plain_refine_* regenerates
                    the targets from the same x_T. The targets take the source's latents for the
                    first --refine-shared-steps, chosen on other scenes (--refine-seed's help).
  reweight_*        "a large red circle ..." against itself with AttentionReweight, the weight of
                    "large" at 0, 1, 2 and 4: reweight_monotonic is the share of scenes in which the
                    main object's area never shrinks along the weights and ends larger than it began.
  local_blend_*     shape swaps of one object of two-object scenes, AttentionReplace with a LocalBlend
                    on that object's colour and shape words (p2p_*: without): the share of background
                    pixels (outside both images' objects) that change by more than 10 levels, whether
                    the other object keeps its colour, shape and mask (IoU >= 0.8), the swap's success;
                    local_blend_region: the share of the image inside the blend region at the last
                    step; *_first, *_second: the change and the region when the swapped object is
                    the caption's first or second; local_blend_background_change_rim,
                    _in_region, _outside_region: its change split among pixels within one pixel of
                    an object (the anti-aliased rim), the rest of the region, and outside the region;
                    p2p_background_change_rim, ...: P2P's change split by the same places.

Prints one JSON object last; --json writes it to a file too.

    python bench/shapes_eval.py                 # the full evaluation (docs/shapes_world.md's figures)
    python bench/shapes_eval.py --quick         # a few of each, to check the plumbing
    python bench/shapes_eval.py --parts inversion --inversion-steps 20 --threads 1   # inversion alone
    python bench/shapes_eval.py --parts inversion --inversion-steps 20 --threads 1 \
        --inversion-seed 1404 --inversion-scenes 24   # its development scenes
    python bench/shapes_eval.py --parts refine reweight local_blend --edit-steps 20 --threads 1
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import prompt2prompt as p2p  # noqa: E402
import ptp_utils  # noqa: E402
import textual_inversion as ti  # noqa: E402
from shapes_world import (  # noqa: E402
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    IMAGE_SIZE,
    SHAPES,
    SIZES,
    JudgedObject,
    Judgement,
    Scene,
    ShapeObject,
    judge,
    layout_iou,
    make_caption,
    objects_mask,
    render,
    sample_scene,
    save_held_out_images,
    scene_rng,
)

STEPS = ptp_utils.NUM_DIFFUSION_STEPS
GUIDANCE = ptp_utils.GUIDANCE_SCALE
BATCH = 25  # captions per pipeline call
ADHERENCE_CAPTIONS = 200
P2P_SEEDS = 120
SWAPS = ("colour", "shape", "background")
PARTS = ("adherence", "p2p", "ti", "inversion", "refine", "reweight", "local_blend")
# Self-attention injection keeps the source's structure, and on this model the background is part
# of it: a background swap is a global edit, made without it (docs/shapes_runs.md, run 8's 40
# background swaps: 30% succeed with the editor's 0.4, 62.5% with 0).
SELF_REPLACE_STEPS = {"colour": p2p.SELF_REPLACE_STEPS, "shape": p2p.SELF_REPLACE_STEPS, "background": 0.0}
TI_IMAGES = 5
TI_SAMPLES = 100
TI_TOKEN = "<held-out>"
TI_INIT = HELD_OUT[1]  # "triangle": the shape word, which carries the pair's outline but no colour
# The model reads a pair from two words, colour and shape: two vectors, one per word's place. One
# vector drifted to blue triangles (docs/shapes_runs.md, run 9: 41% with one, 96% with two).
TI_VECTORS = 2
TI_TEMPLATES = ["a {}", "a {} in the center"]
TI_STEPS = 600
TI_LR = 5e-3
TI_BATCH = 8
INVERSION_SCENES = 100
INVERSION_METHODS = ("ddim", "negative_prompt", "null_text")
# The swap of record on a null-text inversion: the target takes half of each step's null embedding
# (chosen on the development scenes, docs/benchmarks.md); beside it, the target keeping the source's tokens.
RECORD_EDIT, KEPT_TOKENS_EDIT = "null_text_target_null_weight", "null_text_keep_source_tokens"
TARGET_NULL_WEIGHT = 0.5
GENERATED_EDIT = "generated"  # the same swaps on pictures the model generated: no inversion
# An edited object is in the picture's place when its box's centre is this close (pixels): the
# named positions are jittered by 3 px, and every shape fills its box, so a swap keeps the centre.
POSITION_TOLERANCE = 3.0
EDIT_SCENES = 100
# Attention reweighting of the size word "large": its weights, from none to four times.
REWEIGHTS = (0.0, 1.0, 2.0, 4.0)
BACKGROUND_LEVELS = 10  # a background pixel has changed when a channel moves by more than this
KEPT_IOU = 0.8  # an untouched object keeps its mask when source and edit overlap this much (IoU)
# Base seeds of the studies; the data set was drawn with seed 0 (shapes_train.py).
ADHERENCE_SEED, P2P_SEED, TI_SEED, INVERSION_SEED = 101, 202, 303, 404
REFINE_SEED, REWEIGHT_SEED, BLEND_SEED = 505, 606, 707
# Settings are chosen on scenes of a study's seed plus this (development), and reported on its own (test).
DEV_SEED_OFFSET = 1000


def load_cpu_model(model_id: str) -> StableDiffusionPipeline:
    """A Shapes World pipeline (short name or folder) in fp32 on the CPU, its progress bars off."""
    model = ptp_utils.load_pipeline(model_id, device="cpu", dtype=torch.float32)
    model.set_progress_bar_config(disable=True)
    return model


def pipeline_images(model: StableDiffusionPipeline, prompts: list[str], seeds: list[int]) -> np.ndarray:
    """The evaluation's images (STEPS DDIM steps, guidance GUIDANCE), prompt i from the noise of seeds[i]."""
    return ptp_utils.generate_images(model, prompts, seeds, STEPS, GUIDANCE, batch_size=BATCH)


def matched_objects(wanted: list[tuple[str, str]], seen: Judgement) -> int:
    """How many wanted (colour, shape) pairs the judge found, each judged object used once."""
    found = [(o.colour, o.shape) for o in seen.objects]
    hits = 0
    for pair in wanted:
        if pair in found:
            found.remove(pair)
            hits += 1
    return hits


def adherence(model: StableDiffusionPipeline, n: int) -> dict:
    """Share of captioned objects (colour and shape) that the judge finds in the generated images."""
    scenes = [sample_scene(scene_rng(ADHERENCE_SEED, i)) for i in range(n)]
    images = pipeline_images(model, [s.caption for s in scenes], [ADHERENCE_SEED + i for i in range(n)])
    objects = hits = exact = 0
    for scene, image in zip(scenes, images, strict=True):
        seen = judge(image)
        wanted = [(o.colour, o.shape) for o in scene.objects]
        found = matched_objects(wanted, seen)
        objects, hits = objects + len(wanted), hits + found
        exact += found == len(wanted) == len(seen.objects)
    return {"adherence": hits / objects, "adherence_exact_images": exact / n, "adherence_objects": objects}


def swap_pair(rng: np.random.Generator, kind: str) -> tuple[str, str, str]:
    """A one-object source caption, its target with one word swapped, and the new word."""
    colour, shape = HELD_OUT
    while (colour, shape) == HELD_OUT:
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    background = str(rng.choice(list(BACKGROUNDS)))
    # The size word is always there, so that "a" stays the article whatever colour follows.
    obj = ShapeObject(colour, shape, str(rng.choice(list(SIZES))), 0, 0, 0)
    source = make_caption([obj], background)
    choices = {"colour": list(COLOURS), "shape": list(SHAPES), "background": list(BACKGROUNDS)}[kind]
    old = {"colour": colour, "shape": shape, "background": background}[kind]
    while True:
        new = str(rng.choice([c for c in choices if c != old]))
        pair = (new, shape) if kind == "colour" else (colour, new) if kind == "shape" else (colour, shape)
        if pair != HELD_OUT:
            break
    return source, source.replace(f" {old} ", f" {new} "), new


def main_object(seen: Judgement) -> JudgedObject | None:
    """The largest object the judge found, if any: what a one-object caption is about."""
    return max(seen.objects, key=lambda o: o.mask.sum(), default=None)


def sees(seen: Judgement, kind: str, word: str) -> bool:
    """Whether the judge reads `word`: as the background, or as the main object's colour or shape."""
    if kind == "background":
        return seen.background == word
    main = main_object(seen)
    return main is not None and getattr(main, kind) == word


def p2p_study(
    model: StableDiffusionPipeline,
    seeds: int,
    out: Path,
    swaps: tuple[str, ...] = SWAPS,
    self_replace: dict = SELF_REPLACE_STEPS,
) -> dict:
    """Word swaps with Prompt-to-Prompt and with plain regeneration from the same x_T.

    Seed i swaps a word of kind SWAPS[i % 3]; `swaps` keeps those of some kinds (the same seeds).
    """
    rows = []
    for i in tqdm(range(seeds), desc="p2p"):
        kind = SWAPS[i % len(SWAPS)]
        if kind not in swaps:
            continue
        source, target, new = swap_pair(np.random.default_rng([P2P_SEED, i]), kind)
        controller = p2p.AttentionReplace(
            [source, target],
            STEPS,
            cross_replace_steps=p2p.CROSS_REPLACE_STEPS,
            self_replace_steps=self_replace[kind],
            tokenizer=model.tokenizer,
            device=model.device,
        )
        generator = torch.Generator().manual_seed(P2P_SEED + i)
        (src, edit), x_t = p2p.text2image_ldm(model, [source, target], controller, STEPS, GUIDANCE, generator)
        (plain,), _ = p2p.text2image_ldm(model, [target], p2p.EmptyControl(), STEPS, GUIDANCE, latent=x_t)
        seen_src, seen_edit, seen_plain = judge(src), judge(edit), judge(plain)
        rows.append(
            dict(
                kind=kind,
                p2p_success=sees(seen_edit, kind, new),
                plain_success=sees(seen_plain, kind, new),
                p2p_iou=layout_iou(seen_src, seen_edit),
                plain_iou=layout_iou(seen_src, seen_plain),
            )
        )
        if i < 12:
            tiles = [
                ptp_utils.text_under_image(image, text)
                for image, text in ((src, source), (edit, f"P2P: {target}"), (plain, f"plain: {target}"))
            ]
            ptp_utils.view_images(tiles, save_path=out / f"p2p_{i:03d}.png")

    def mean(key: str, kind: str | None = None) -> float:
        return float(np.mean([r[key] for r in rows if kind in (None, r["kind"])]))

    report = {
        "p2p_edit_success": mean("p2p_success"),
        "plain_edit_success": mean("plain_success"),
        "p2p_layout_iou": mean("p2p_iou"),
        "plain_layout_iou": mean("plain_iou"),
        "seeds": seeds,
        "edits": len(rows),
    }
    for kind in swaps:
        report[f"by_swap_{kind}"] = {
            key: mean(key, kind) for key in ("p2p_success", "plain_success", "p2p_iou", "plain_iou")
        }
    return report


def is_held_out(image: np.ndarray) -> bool:
    """Whether the judge reads the image's main object as the held-out colour-shape pair."""
    main = main_object(judge(image))
    return main is not None and (main.colour, main.shape) == HELD_OUT


def ti_study(
    model_id: str, samples: int, steps: int, work: Path, every: int = 0, vectors: int = TI_VECTORS
) -> dict:
    """Textual inversion of the held-out pair from TI_IMAGES rendered images, judged on `samples` samples.

    With `every`, the run stops every `every` steps, is judged, and resumes from its checkpoint
    (which ends where one uninterrupted run does): the success along training.
    """
    folder = work / "held_out_images"
    save_held_out_images(folder, TI_IMAGES, TI_SEED)
    seeds = [TI_SEED + i for i in range(samples)]
    stops = list(range(every, steps, every)) + [steps] if every else [steps]
    success_by_step = {}
    for stop in stops:
        # A fresh pipeline each time: the placeholder tokens are added anew, their rows resumed.
        pipe = load_cpu_model(model_id)
        config = ti.TextualInversionConfig(
            target_folder=str(folder),
            placeholder_tokens=ti.multi_vector_tokens(TI_TOKEN, vectors),
            initializer_token=TI_INIT,
            prompt_templates=TI_TEMPLATES,
            learning_rate=TI_LR,
            num_inversion_steps=stop,
            batch_size=TI_BATCH,
            gradient_accumulation_steps=1,
            show_every=0,
            checkpoint_every=every,
            resume_from="latest" if stop != stops[0] else None,
            seed=TI_SEED,
            output_dir=str(work / "textual_inversion"),
            resolution=IMAGE_SIZE,
        )
        ti.textual_inversion(ti.StableDiffusionWrapper(pipe), config)
        learned = pipeline_images(pipe, [f"a {TI_TOKEN}"] * samples, seeds)
        success_by_step[stop] = float(np.mean([is_held_out(image) for image in learned]))
    initial = pipeline_images(pipe, [f"a {TI_INIT}"] * samples, seeds)
    named = pipeline_images(pipe, [f"a {HELD_OUT[0]} {HELD_OUT[1]}"] * samples, seeds)
    readings = Counter(
        f"{main.colour} {main.shape}" if (main := main_object(judge(image))) else "nothing"
        for image in learned
    )
    embeddings = pipe.text_encoder.get_input_embeddings().weight
    token_ids = pipe.tokenizer.convert_tokens_to_ids(ti.multi_vector_tokens(TI_TOKEN, vectors))
    token_ids.append(pipe.tokenizer.encode(TI_INIT)[1])
    report = {
        "ti_success": success_by_step[steps],
        "init_success": float(np.mean([is_held_out(image) for image in initial])),
        "named_success": float(np.mean([is_held_out(image) for image in named])),
        "ti_samples": samples,
        "ti_steps": steps,
        "ti_readings": {what: count / samples for what, count in readings.most_common(4)},
        "ti_norms_learned_then_init": [round(embeddings[i].norm().item(), 3) for i in token_ids],
    }
    if every:
        report["ti_success_by_step"] = success_by_step
    return report


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB."""
    mse = np.mean((image.astype(float) - reference.astype(float)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def one_object_scenes(n: int, seed: int) -> list[Scene]:
    """The first n one-object scenes of the data set stream `seed` (captions as the model was trained)."""
    return scenes_of(n, seed, objects=1)


def scenes_of(n: int, seed: int, objects: int) -> list[Scene]:
    """The first n scenes with `objects` objects of the data set stream `seed`."""
    scenes, i = [], 0
    while len(scenes) < n:
        scene = sample_scene(scene_rng(seed, i))
        if len(scene.objects) == objects:
            scenes.append(scene)
        i += 1
    return scenes


def box_centre(mask: np.ndarray) -> tuple[float, float]:
    """The (x, y) centre of a mask's bounding box, in the coordinates that render() draws in."""
    rows, cols = np.nonzero(mask)
    # Pixel (r, c) covers [c, c + 1).
    return (cols.min() + cols.max() + 1) / 2, (rows.min() + rows.max() + 1) / 2


def shape_swap(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """The scene's caption with its object's shape swapped for another (never the held-out pair)."""
    obj = scene.objects[0]
    new = str(rng.choice([s for s in SHAPES if s != obj.shape and (obj.colour, s) != HELD_OUT]))
    return scene.caption.replace(f" {obj.shape}", f" {new}"), new


def keeps_all_but_the_shape(seen: Judgement, scene: Scene, shape: str) -> bool:
    """Whether the judge reads `shape`, with the scene's colour, background and place (box centre)."""
    main, obj = main_object(seen), scene.objects[0]
    if main is None:
        return False
    centre = box_centre(main.mask)
    return (
        main.shape == shape
        and main.colour == obj.colour
        and seen.background == scene.background
        and np.hypot(centre[0] - obj.x, centre[1] - obj.y) <= POSITION_TOLERANCE
    )


def invert(
    model: StableDiffusionPipeline, method: str, image: np.ndarray, caption: str, steps: int, inner_steps: int
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """x_T and the per-step null embeddings (None: the empty prompt's) of one inversion method."""
    if method == "ddim":
        return p2p.ddim_inversion(model, image, caption, steps)[-1], None
    if method == "negative_prompt":
        return p2p.negative_prompt_inversion(model, image, caption, steps)
    return p2p.NullInversion(model, steps, GUIDANCE).invert(image, caption, inner_steps)


def swap(
    model: StableDiffusionPipeline,
    prompts: list[str],
    steps: int,
    latent: torch.Tensor | None = None,
    uncond_embeddings: list[torch.Tensor] | None = None,
    keep_source_tokens: bool = False,
    generator: torch.Generator | None = None,
    target_null_weight: float = p2p.TARGET_NULL_WEIGHT,
) -> np.ndarray:
    """Source and target images of a word swap (AttentionReplace, the editor's injection), from an
    inversion's x_T and null embeddings or from the noise of `generator`."""
    controller = p2p.AttentionReplace(
        prompts,
        steps,
        p2p.CROSS_REPLACE_STEPS,
        p2p.SELF_REPLACE_STEPS,
        tokenizer=model.tokenizer,
        device=model.device,
    )
    images, _ = p2p.text2image_ldm(
        model,
        prompts,
        controller,
        steps,
        GUIDANCE,
        generator,
        latent,
        uncond_embeddings=uncond_embeddings,
        keep_source_tokens=keep_source_tokens,
        target_null_weight=target_null_weight,
    )
    return images


def generated_swap(
    model: StableDiffusionPipeline, prompts: list[str], shape: str, steps: int, seed: int
) -> tuple[bool, float]:
    """The same swap on a picture the model draws from the noise of `seed`: whether the judge reads the
    new shape with the source's colour, background and place (the criteria of real_edit_success, size
    aside), and the layout IoU. What Prompt-to-Prompt reaches on this model when no inversion is in
    the way: the reference for the real-picture swap."""
    src, edit = swap(model, prompts, steps, generator=torch.Generator().manual_seed(seed))
    seen_src, seen_edit = judge(src), judge(edit)
    wrong = [key for key in differences(seen_edit, seen_src, shape=shape) if key != "size"]
    return not wrong, layout_iou(seen_src, seen_edit)


def inversion_study(
    model: StableDiffusionPipeline,
    n: int,
    steps: int,
    inner_steps: int,
    out: Path,
    seed: int = INVERSION_SEED,
    target_null_weight: float = TARGET_NULL_WEIGHT,
) -> dict:
    """Rendered pictures inverted by each method: reconstruction PSNR, seconds, and real-picture edits."""
    seconds = {method: [] for method in INVERSION_METHODS}
    psnrs = {method: [] for method in ("vae_roundtrip", *INVERSION_METHODS)}
    null_text_edits = {
        RECORD_EDIT: dict(target_null_weight=target_null_weight),
        KEPT_TOKENS_EDIT: dict(keep_source_tokens=True),
    }
    success = {method: [] for method in (*INVERSION_METHODS, *null_text_edits, GENERATED_EDIT)}
    iou = {method: [] for method in (*INVERSION_METHODS, *null_text_edits, GENERATED_EDIT)}
    for i, scene in enumerate(tqdm(one_object_scenes(n, seed), desc="inversion")):
        image, caption = render(scene), scene.caption
        target, shape = shape_swap(scene, np.random.default_rng([seed, i]))
        seen_image = judge(image)
        vae = ptp_utils.latent2image(model.vae, p2p.image2latent(model, image))[0]
        psnrs["vae_roundtrip"].append(psnr(vae, image))
        tiles = [(image, caption), (vae, "VAE round trip")]
        inversions = {}
        for method in INVERSION_METHODS:  # interleaved: each picture is inverted by every method in turn
            started = time.perf_counter()
            x_t, uncond_embeddings = invert(model, method, image, caption, steps, inner_steps)
            seconds[method].append(time.perf_counter() - started)
            inversions[method] = x_t, uncond_embeddings
            (rebuilt,), _ = p2p.text2image_ldm(
                model,
                [caption],
                p2p.EmptyControl(),
                steps,
                GUIDANCE,
                latent=x_t,
                uncond_embeddings=uncond_embeddings,
            )
            psnrs[method].append(psnr(rebuilt, image))
            _, edit = swap(model, [caption, target], steps, x_t, uncond_embeddings)
            seen_edit = judge(edit)
            success[method].append(keeps_all_but_the_shape(seen_edit, scene, shape))
            iou[method].append(layout_iou(seen_image, seen_edit))
            name = method.replace("_", "-")
            tiles += [(rebuilt, name), (edit, f"{name}, P2P: {target}")]
        for name, options in null_text_edits.items():
            _, edit = swap(model, [caption, target], steps, *inversions["null_text"], **options)
            seen_edit = judge(edit)
            success[name].append(keeps_all_but_the_shape(seen_edit, scene, shape))
            iou[name].append(layout_iou(seen_image, seen_edit))
            tiles.append((edit, f"null-text, {name.removeprefix('null_text_').replace('_', ' ')}: {target}"))
        generated = generated_swap(model, [caption, target], shape, steps, seed + i)
        success[GENERATED_EDIT].append(generated[0])
        iou[GENERATED_EDIT].append(generated[1])
        if i < 12:
            captioned = [
                ptp_utils.text_under_image(np.kron(t, np.ones((2, 2, 1), np.uint8)), c) for t, c in tiles
            ]
            ptp_utils.view_images(captioned, save_path=out / f"inversion_{i:03d}.png")

    report = {f"inversion_psnr_{method}": float(np.mean(psnrs[method])) for method in INVERSION_METHODS}
    report["vae_roundtrip_psnr"] = float(np.mean(psnrs["vae_roundtrip"]))
    # The edit of record; each method's plain edit, and the same swaps on generated pictures, for comparison.
    report["real_edit_success"] = float(np.mean(success[RECORD_EDIT]))
    report["real_edit_layout_iou"] = float(np.mean(iou[RECORD_EDIT]))
    report["real_edit_by_method"] = {
        method: {"success": float(np.mean(success[method])), "layout_iou": float(np.mean(iou[method]))}
        for method in success
    }
    report["inversion_seconds_per_image"] = {
        method: {key: float(f(times)) for key, f in (("min", np.min), ("median", np.median), ("max", np.max))}
        for method, times in seconds.items()
    }
    report["null_text_over_negative_prompt_time"] = float(
        np.median(seconds["null_text"]) / np.median(seconds["negative_prompt"])
    )
    report |= {"inversion_scenes": n, "inversion_steps": steps, "inversion_inner_steps": inner_steps}
    report["target_null_weight"] = target_null_weight
    report["inversion_seed"] = seed
    return report


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks (1 when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def differences(seen: Judgement, source: Judgement, **changed: str) -> list[str]:
    """What the judge reads wrong in `seen` against the source's main object, the `changed` attributes
    (size=..., shape=...) wanted instead of the source's: "object" when either has none, else any of
    "colour", "shape", "size", "background" and "place" (box centre beyond POSITION_TOLERANCE). None:
    the source's object kept with the changes asked."""
    main, before = main_object(seen), main_object(source)
    if main is None or before is None:
        return ["object"]
    wanted = {key: changed.get(key, getattr(before, key)) for key in ("colour", "shape", "size")}
    wrong = [key for key, value in wanted.items() if getattr(main, key) != value]
    if seen.background != source.background:
        wrong.append("background")
    if np.hypot(*np.subtract(box_centre(main.mask), box_centre(before.mask))) > POSITION_TOLERANCE:
        wrong.append("place")
    return wrong


def save_edit_figure(path: Path, images: list[np.ndarray], captions: list[str]) -> None:
    """A row of 64 px images, each enlarged twice with its caption under it."""
    tiles = [
        ptp_utils.text_under_image(np.kron(image, np.ones((2, 2, 1), np.uint8)), caption)
        for image, caption in zip(images, captions, strict=True)
    ]
    ptp_utils.view_images(tiles, save_path=path)


def refine_study(
    model: StableDiffusionPipeline,
    n: int,
    steps: int,
    out: Path,
    seed: int = REFINE_SEED,
    shared_steps: float = p2p.REFINE_SHARED_STEPS,
    cross_replace_steps: float = p2p.CROSS_REPLACE_STEPS,
    self_replace_steps: float = p2p.SELF_REPLACE_STEPS,
    guidance: float = GUIDANCE,
) -> dict:
    """Refinement by a size word: "a red circle ..." to "a small red circle ..." and "a large ...",
    with AttentionRefine (the source's cross- and self-attention injected for `cross_replace_steps` and
    `self_replace_steps`, the targets on the source's latents for the first `shared_steps`) and with
    plain regeneration of the targets from the same x_T, all at `guidance`; scenes and noise drawn
    from `seed`."""
    rows = []
    for i, scene in enumerate(tqdm(scenes_of(n, seed, objects=1), desc="refine")):
        obj = scene.objects[0]
        source = make_caption([obj], scene.background, with_size=False)
        targets = [make_caption([dataclasses.replace(obj, size=size)], scene.background) for size in SIZES]
        prompts = [source, *targets]
        controller = p2p.AttentionRefine(
            prompts,
            steps,
            cross_replace_steps,
            self_replace_steps,
            tokenizer=model.tokenizer,
            device=model.device,
        )
        controller.shared_steps = shared_steps
        generator = torch.Generator().manual_seed(seed + i)
        (src, *edits), x_t = p2p.text2image_ldm(model, prompts, controller, steps, guidance, generator)
        plains, _ = p2p.text2image_ldm(model, targets, p2p.EmptyControl(), steps, guidance, latent=x_t)
        seen_src = judge(src)
        source_size = getattr(main_object(seen_src), "size", None)
        for size, edit, plain in zip(SIZES, edits, plains, strict=True):
            seen_edit, seen_plain = judge(edit), judge(plain)
            wrong, plain_wrong = (
                differences(seen_edit, seen_src, size=size),
                differences(seen_plain, seen_src, size=size),
            )
            rows.append(
                dict(
                    success=not wrong,
                    plain_success=not plain_wrong,
                    wrong=wrong,
                    plain_wrong=plain_wrong,
                    resized=size != source_size,
                    iou=layout_iou(seen_src, seen_edit),
                    plain_iou=layout_iou(seen_src, seen_plain),
                )
            )
        if i < 6:
            captions = [source] + [f"P2P: {t}" for t in targets] + [f"plain: {t}" for t in targets]
            save_edit_figure(out / f"refine_{i:03d}.png", [src, *edits, *plains], captions)
    return {
        "refine_success": float(np.mean([r["success"] for r in rows])),
        "plain_refine_success": float(np.mean([r["plain_success"] for r in rows])),
        # The edits that ask for the other size than the source's, and what the failed edits got wrong.
        "refine_success_resized": float(np.mean([r["success"] for r in rows if r["resized"]])),
        "plain_refine_success_resized": float(np.mean([r["plain_success"] for r in rows if r["resized"]])),
        "refine_resized_edits": sum(r["resized"] for r in rows),
        "refine_wrong": dict(Counter(key for r in rows for key in r["wrong"])),
        "plain_refine_wrong": dict(Counter(key for r in rows for key in r["plain_wrong"])),
        "refine_layout_iou": float(np.mean([r["iou"] for r in rows])),
        "plain_refine_layout_iou": float(np.mean([r["plain_iou"] for r in rows])),
        "refine_scenes": n,
        "refine_edits": len(rows),
        "refine_seed": seed,
        "refine_shared_steps": shared_steps,
        "refine_cross_replace_steps": cross_replace_steps,
        "refine_self_replace_steps": self_replace_steps,
        "refine_guidance": guidance,
    }


def grows(areas: list[int]) -> bool:
    """Whether the areas never shrink from one to the next, and the last is larger than the first."""
    return all(b >= a for a, b in zip(areas, areas[1:])) and areas[-1] > areas[0]


def reweight_study(model: StableDiffusionPipeline, n: int, steps: int, out: Path) -> dict:
    """Attention reweighting of the size word of "a large red circle ...", alone (one prompt against
    itself) at each weight of REWEIGHTS: the main object's area along the weights."""
    areas_by_scene, large_by_weight = [], np.zeros(len(REWEIGHTS))
    for i, scene in enumerate(tqdm(scenes_of(n, REWEIGHT_SEED, objects=1), desc="reweight")):
        source = make_caption([dataclasses.replace(scene.objects[0], size="large")], scene.background)
        prompts = [source] * (1 + len(REWEIGHTS))
        controller = p2p.AttentionReweight(
            prompts,
            steps,
            p2p.CROSS_REPLACE_STEPS,
            p2p.SELF_REPLACE_STEPS,
            equalizer=p2p.get_equalizer(source, "large", REWEIGHTS, model.tokenizer),
            tokenizer=model.tokenizer,
            device=model.device,
        )
        generator = torch.Generator().manual_seed(REWEIGHT_SEED + i)
        (src, *edits), _ = p2p.text2image_ldm(model, prompts, controller, steps, GUIDANCE, generator)
        mains = [main_object(judge(edit)) for edit in edits]
        areas_by_scene.append([0 if main is None else int(main.mask.sum()) for main in mains])
        large_by_weight += [main is not None and main.size == "large" for main in mains]
        if i < 6:
            captions = [source] + [f"large x{weight:g}" for weight in REWEIGHTS]
            save_edit_figure(out / f"reweight_{i:03d}.png", [src, *edits], captions)
    areas = np.array(areas_by_scene)
    return {
        "reweight_monotonic": float(np.mean([grows(list(a)) for a in areas_by_scene])),
        "reweight_weights": list(REWEIGHTS),
        "reweight_mean_area": [round(float(a), 1) for a in areas.mean(0)],
        "reweight_judged_large": [float(x) for x in large_by_weight / n],
        "reweight_scenes": n,
    }


def changed_background(
    source: np.ndarray, edit: np.ndarray, seen_source: Judgement, seen_edit: Judgement
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean maps of the background (outside both images' objects) and of its pixels that change by
    more than BACKGROUND_LEVELS in any channel from source to edit."""
    background = ~(objects_mask(seen_source) | objects_mask(seen_edit))
    changed = (np.abs(source.astype(int) - edit.astype(int)) > BACKGROUND_LEVELS).any(-1) & background
    return background, changed


BLEND_PLACES = ("rim", "in_region", "outside_region")
OUTLINE = (255, 0, 255)  # the blend region's edge in the figures: no background or object colour


def dilated(mask: np.ndarray) -> np.ndarray:
    """A boolean (H, W) mask grown by one pixel in every direction (diagonals included)."""
    grown = F.max_pool2d(torch.from_numpy(mask)[None].float(), kernel_size=3, stride=1, padding=1)
    return grown[0].bool().numpy()


def background_change_by_place(
    source: np.ndarray, edit: np.ndarray, seen_source: Judgement, seen_edit: Judgement, region: np.ndarray
) -> dict[str, float]:
    """The share of background pixels (outside both images' objects) that change by more than
    BACKGROUND_LEVELS from source to edit, split by where they lie: within one pixel of an object of
    either image (the anti-aliased rim the judge leaves out of the objects), else inside `region` (a
    blend region at the image's size), else outside it."""
    background, changed = changed_background(source, edit, seen_source, seen_edit)
    rim = dilated(~background)
    places = dict(zip(BLEND_PLACES, (rim, ~rim & region, ~rim & ~region), strict=True))
    total = max(background.sum(), 1)
    return {place: float((changed & where).sum() / total) for place, where in places.items()}


def keeps_object(seen: Judgement, obj: JudgedObject) -> bool:
    """Whether `seen` holds an object of obj's colour and shape whose mask overlaps obj's by KEPT_IOU."""
    return any(
        (o.colour, o.shape) == (obj.colour, obj.shape) and mask_iou(o.mask, obj.mask) >= KEPT_IOU
        for o in seen.objects
    )


def local_blend_study(
    model: StableDiffusionPipeline,
    n: int,
    steps: int,
    out: Path,
    seed: int = BLEND_SEED,
    words_after: bool = False,
) -> dict:
    """Shape swaps of one object of two-object scenes, with Prompt-to-Prompt alone and with a LocalBlend
    on the object's colour and shape words (with `words_after`, the second object's blend also takes
    the caption's words after it: bench/shapes_attention.py shows they are where this model's
    cross-attention locates it): the background's change, the other object kept, the swap.

    Runs scenes drawn from `seed` until n sources show two objects (the other object is then the one
    not swapped); the background change counts every scene run.
    """
    rows, kept, i = [], [], 0
    progress = tqdm(total=n, desc="local blend")
    while len(kept) < n:
        scene = sample_scene(scene_rng(seed, i))
        i += 1
        if len(scene.objects) != 2:
            continue
        rng = np.random.default_rng([seed, i])
        k = len(rows) % 2  # the swapped object: left and right in turn
        obj = scene.objects[k]
        new = str(rng.choice([s for s in SHAPES if s != obj.shape and (obj.colour, s) != HELD_OUT]))
        objects = list(scene.objects)
        source = make_caption(objects, scene.background)
        objects[k] = dataclasses.replace(obj, shape=new)
        target = make_caption(objects, scene.background)
        # Word places, not words: the other object may share the colour or the shape.
        first = len(make_caption(objects[:k], "", with_background=False).split()) + 1 if k else 0
        words = [first + 2, first + 3]  # "a SIZE COLOUR SHAPE"
        if words_after and k == 1:
            words += list(range(first + 4, len(source.split())))
        blends = {"p2p": None, "local_blend": p2p.LocalBlend([source, target], [words] * 2, model.tokenizer)}
        images, x_t = {}, None
        for name, blend in blends.items():
            controller = p2p.AttentionReplace(
                [source, target],
                steps,
                p2p.CROSS_REPLACE_STEPS,
                p2p.SELF_REPLACE_STEPS,
                local_blend=blend,
                tokenizer=model.tokenizer,
                device=model.device,
            )
            generator = torch.Generator().manual_seed(seed + len(rows))
            (src, images[name]), x_t = p2p.text2image_ldm(
                model, [source, target], controller, steps, GUIDANCE, generator, latent=x_t
            )
        seen_src = judge(src)
        # The region the edit took from its own latents at the last step, at the image's size.
        region = blends["local_blend"].mask[0, 0].cpu().numpy()
        region = np.kron(region, np.ones((IMAGE_SIZE // region.shape[0],) * 2, bool))
        row = {"swapped": k, "local_blend_region": float(region.mean())}
        for name, edit in images.items():
            seen_edit = judge(edit)
            # Both edits split by the blend's places: what the blend kept is P2P's change outside it.
            places = background_change_by_place(src, edit, seen_src, seen_edit, region)
            row |= {f"{name}_background_change_{place}": share for place, share in places.items()}
            row[f"{name}_background_change"] = sum(places.values())  # the places split the background
            swapped = [o for o in seen_edit.objects if o.shape == new and o.colour == obj.colour]
            row[f"{name}_swap_success"] = bool(swapped)
            if len(seen_src.objects) == 2:
                row[f"{name}_other_object_kept"] = keeps_object(seen_edit, seen_src.objects[1 - k])
        rows.append(row)
        if len(seen_src.objects) == 2:
            kept.append(row)
            progress.update()
        if len(rows) <= 6:
            captions = [source, f"P2P: {target}", f"local blend: {target}", "its blend region, outlined"]
            edge = region & dilated(~region)
            outlined = np.where(edge[..., None], np.array(OUTLINE, np.uint8), images["local_blend"])
            save_edit_figure(
                out / f"local_blend_{len(rows) - 1:03d}.png", [src, *images.values(), outlined], captions
            )
    progress.close()
    report = {}
    for name in ("local_blend", "p2p"):
        report[f"{name}_background_change"] = float(np.mean([r[f"{name}_background_change"] for r in rows]))
        report[f"{name}_other_object_kept"] = float(np.mean([r[f"{name}_other_object_kept"] for r in kept]))
        report[f"{name}_swap_success"] = float(np.mean([r[f"{name}_swap_success"] for r in rows]))
    places = [f"{name}_background_change_{p}" for name in ("local_blend", "p2p") for p in BLEND_PLACES]
    for key in ("local_blend_region", *places):
        report[key] = float(np.mean([r[key] for r in rows]))
    for key in ("local_blend_background_change", "p2p_background_change", "local_blend_region"):
        for swapped, which in enumerate(("first", "second")):
            report[f"{key}_{which}"] = float(np.mean([r[key] for r in rows if r["swapped"] == swapped]))
    report |= {
        "local_blend_scenes": len(rows),
        "local_blend_two_object_sources": len(kept),
        "local_blend_seed": seed,
        "local_blend_words_after": words_after,
    }
    return report


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default="shapes", help="the shipped model's short name, or a pipeline folder"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few of each: checks the plumbing, not the model"
    )
    parser.add_argument("--seeds", type=int, default=P2P_SEEDS, help="Prompt-to-Prompt seeds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    parser.add_argument("--figures", default="outputs/shapes_eval", help="folder for the first 12 edits")
    parser.add_argument("--json", help="also write the JSON object to this file")
    parser.add_argument(
        "--ti-every", type=int, default=0, help="also judge textual inversion every N of its steps"
    )
    parser.add_argument("--ti-vectors", type=int, default=TI_VECTORS, help="vectors of the learned word")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="the studies to run")
    parser.add_argument(
        "--edit-scenes",
        type=cli.positive_int,
        default=EDIT_SCENES,
        help="scenes of each of refine, reweight and local_blend",
    )
    parser.add_argument(
        "--edit-steps",
        type=cli.positive_int,
        default=STEPS,
        help="DDIM steps of refine, reweight and local_blend",
    )
    parser.add_argument(
        "--refine-seed",
        type=int,
        default=REFINE_SEED,
        help="base seed of the refine scenes: the default is the test split; the refinement's settings "
        f"were chosen on the development split, {REFINE_SEED + DEV_SEED_OFFSET}",
    )
    for flag, default, steps in [
        (
            "--refine-shared-steps",
            p2p.REFINE_SHARED_STEPS,
            "the first steps in which the targets take the source's latents",
        ),
        (
            "--refine-cross-replace",
            p2p.CROSS_REPLACE_STEPS,
            "the steps in which the targets take the source's cross-attention maps",
        ),
        (
            "--refine-self-replace",
            p2p.SELF_REPLACE_STEPS,
            "the steps in which the targets take the source's self-attention maps",
        ),
    ]:
        parser.add_argument(flag, type=cli.fraction, default=default, help=f"refine: share of {steps}")
    parser.add_argument(
        "--refine-guidance", type=float, default=GUIDANCE, help="refine: the classifier-free guidance scale"
    )
    parser.add_argument(
        "--blend-seed",
        type=int,
        default=BLEND_SEED,
        help=f"base seed of the local_blend scenes: the default is the test split; the development "
        f"split is {BLEND_SEED + DEV_SEED_OFFSET}",
    )
    parser.add_argument(
        "--blend-words-after",
        action="store_true",
        help="local_blend: the second object's blend also takes the caption's words after it",
    )
    parser.add_argument("--swaps", nargs="+", choices=SWAPS, default=SWAPS, help="word swaps of these kinds")
    parser.add_argument(
        "--background-self-replace",
        type=float,
        default=SELF_REPLACE_STEPS["background"],
        help="self-attention injection of background swaps",
    )
    parser.add_argument(
        "--inversion-scenes", type=int, default=INVERSION_SCENES, help="rendered pictures to invert"
    )
    parser.add_argument("--inversion-steps", type=int, default=STEPS, help="DDIM steps of inversion and edit")
    parser.add_argument(
        "--inversion-seed",
        type=int,
        default=INVERSION_SEED,
        help="seed of the inversion's scenes: the default is the test split; choose methods on others "
        f"(the development split: {INVERSION_SEED + DEV_SEED_OFFSET})",
    )
    parser.add_argument(
        "--inner-steps", type=int, default=p2p.NUM_INNER_STEPS, help="null-text optimisation steps per step"
    )
    parser.add_argument(
        "--target-null-weight",
        type=float,
        default=TARGET_NULL_WEIGHT,
        help="the swap of record: the share of each step's null embedding that the target takes",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    figures = Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    model = load_cpu_model(args.model)
    report = {"model": args.model}
    if "adherence" in args.parts:
        report |= adherence(model, 10 if args.quick else ADHERENCE_CAPTIONS)
        print("adherence:", json.dumps(report), flush=True)
    if "p2p" in args.parts:
        self_replace = SELF_REPLACE_STEPS | {"background": args.background_self_replace}
        report |= p2p_study(model, 3 if args.quick else args.seeds, figures, tuple(args.swaps), self_replace)
    if "ti" in args.parts:
        with tempfile.TemporaryDirectory() as work:
            report |= ti_study(
                args.model,
                4 if args.quick else TI_SAMPLES,
                5 if args.quick else TI_STEPS,
                Path(work),
                args.ti_every,
                args.ti_vectors,
            )
    if "inversion" in args.parts:
        report |= inversion_study(
            model,
            3 if args.quick else args.inversion_scenes,
            args.inversion_steps,
            args.inner_steps,
            figures,
            args.inversion_seed,
            args.target_null_weight,
        )
    refine = functools.partial(
        refine_study,
        seed=args.refine_seed,
        shared_steps=args.refine_shared_steps,
        cross_replace_steps=args.refine_cross_replace,
        self_replace_steps=args.refine_self_replace,
        guidance=args.refine_guidance,
    )
    local_blend = functools.partial(
        local_blend_study, seed=args.blend_seed, words_after=args.blend_words_after
    )
    edit_studies = {"refine": refine, "reweight": reweight_study, "local_blend": local_blend}
    for part, study in edit_studies.items():
        if part in args.parts:
            report |= study(model, 2 if args.quick else args.edit_scenes, args.edit_steps, figures)
            report[f"{part}_steps"] = args.edit_steps
            print(f"{part}:", json.dumps(report), flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
