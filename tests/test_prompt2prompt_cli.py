"""The command lines of prompt2prompt.py, ptp_utils.py and seq_aligner.py, run as a user runs them: a
mistake ends with one line on stderr that names the flag, exit code 2, no traceback, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
LONG_PROMPT = "cat " * 80  # 82 tokens with the start and end tokens: more than CLIP's 77
PHOTO = ["--model", "tiny", "--steps", "5", "--image", "photo.png", "--source", "a cat", "--target", "a dog"]

MISTAKES = {
    "prompt2prompt.py": [
        (["--edit", "replace", "--target", "a dog"], "--edit replace swaps words, but the source has 8"),
        (["--edit", "reweight"], "--edit reweight: give --reweight WORD=SCALE"),
        (["--edit", "reweight", "--target", "a dog", "--reweight", "cat=2"], "--edit reweight reweights one"),
        (["--reweight", "cat"], "argument --reweight: 'cat': give a word and a scale"),
        (["--reweight-sweep", "cat="], "argument --reweight-sweep: 'cat=': give a word and its scales"),
        (["--steps", "0"], "argument --steps: give a whole number of at least 1, not '0'"),
        (["--cross-replace-steps", "1.5"], "argument --cross-replace-steps: '1.5': give a fraction"),
        (
            ["--out", "edit.pdf.txt"],
            "argument --out: 'edit.pdf.txt': give a file name with an image extension",
        ),
        (["--device", "banana"], "--device banana: give cpu, cuda, cuda:N or mps"),
        (["--model", "no-such-user/no-such-model"], "--model no-such-user/no-such-model: Could not load"),
        (["--model", "tiny", "--reweight", "dog=2"], "--reweight dog=2: 'dog' is not a word of the prompt"),
        (["--model", "tiny", "--source", LONG_PROMPT], "--source: the prompt has 82 tokens"),
        (["--inversion", "ddim"], "--inversion inverts a picture: give --image"),
        (["--save-inversion", "cat.safetensors"], "--save-inversion inverts a picture: give --image"),
        (["--load-inversion", "cat.safetensors"], "--load-inversion inverts a picture: give --image"),
        (["--target-null-weight", "0.5"], "--target-null-weight weighs the null embeddings of an inversion"),
        (PHOTO + ["--target-null-weight", "2"], "--target-null-weight"),
        (["--image", "cat.png"], "--image: give --source, the picture's caption"),
        (["--image", "cat.png", "--source", "a cat"], "--image: give --target, the caption edited"),
        (PHOTO + ["--image", "missing.png"], "--image: Cannot read the image 'missing.png'"),
        (
            PHOTO + ["--save-inversion", "cat.pt"],
            "argument --save-inversion: 'cat.pt': give a file name ending",
        ),
        (
            PHOTO + ["--load-inversion", "cat.safetensors", "--inversion", "ddim"],
            "--load-inversion reads a finished inversion: drop --inversion",
        ),
    ],
    "ptp_utils.py": [
        (["schedulers", "--model", "tiny", "--steps", "2"], "--steps 2: the PNDM sampler cannot run so few"),
        (["negative-prompt", "--out", "pair"], "argument --out: 'pair': give a file name with an image"),
    ],
    "seq_aligner.py": [
        (["A lion eating", "A big lion eating"], "the source has 3 and the target 4: add --refine"),
    ],
}
CASES = [(script, args, message) for script, cases in MISTAKES.items() for args, message in cases]


def run_script(script, args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize(("script", "args", "message"), CASES, ids=[f"{s}:{a[-1][:20]}" for s, a, _ in CASES])
def test_a_mistake_ends_with_one_line_that_names_the_flag(tmp_path, script, args, message):
    result = run_script(script, args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert list(tmp_path.iterdir()) == []  # the default output (outputs/...) was not written


# Mistakes about files: the picture, and inversions (tiny's latent is (1, 4, 16, 16), its embeddings 32 wide).
FILE_MISTAKES = [
    (["--image", "broken.png"], "--image: Cannot read the image 'broken.png'"),
    (["--save-inversion", "photo.png/cat.safetensors"], "--save-inversion photo.png/cat.safetensors: cannot"),
    (["--load-inversion", "notes.txt"], "--load-inversion notes.txt: Cannot read the inversion"),
    (["--load-inversion", "weights.safetensors"], "weights.safetensors' is not a saved inversion"),
    (["--load-inversion", "three_steps.safetensors"], "the inversion has 3 steps but --steps is 5: pass"),
    (["--load-inversion", "wide.safetensors"], "it holds x_T (1, 4, 16, 16) and 64-wide embeddings, but"),
]


@pytest.mark.parametrize(("args", "message"), FILE_MISTAKES, ids=[a[-1] for a, _ in FILE_MISTAKES])
def test_a_wrong_picture_or_inversion_file_ends_with_one_line_that_names_the_flag(tmp_path, args, message):
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "photo.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("not tensors")
    save_file({"weight": torch.zeros(3)}, tmp_path / "weights.safetensors")
    for name, steps, dim in [("three_steps", 3, 32), ("wide", 5, 64)]:
        inversion = {"x_t": torch.zeros(1, 4, 16, 16), "uncond_embeddings": torch.zeros(steps, 77, dim)}
        save_file(inversion, tmp_path / f"{name}.safetensors")
    files = sorted(tmp_path.iterdir())
    result = run_script("prompt2prompt.py", PHOTO + args, tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert message in result.stderr
    assert sorted(tmp_path.iterdir()) == files  # nothing written


def test_importing_prompt2prompt_leaves_the_heavy_libraries_unloaded():
    heavy = ("diffusers", "transformers", "matplotlib")
    code = f"import sys, prompt2prompt; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
