"""The command lines of prompt2prompt.py, ptp_utils.py and seq_aligner.py, run as a user runs them: a
mistake ends with one line on stderr that names the flag, exit code 2, no traceback, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LONG_PROMPT = "cat " * 80  # 82 tokens with the start and end tokens: more than CLIP's 77

MISTAKES = {
    "prompt2prompt.py": [
        (["--edit", "replace", "--target", "a dog"], "--edit replace swaps words, but the source has 8"),
        (["--edit", "reweight"], "--edit reweight: give --reweight WORD=SCALE"),
        (["--edit", "reweight", "--target", "a dog", "--reweight", "cat=2"], "--edit reweight reweights one"),
        (["--reweight", "cat"], "argument --reweight: 'cat': give a word and a scale"),
        (["--reweight-sweep", "cat="], "argument --reweight-sweep: 'cat=': give a word and its scales"),
        (["--steps", "0"], "argument --steps: '0': give a positive whole number"),
        (["--cross-replace-steps", "1.5"], "argument --cross-replace-steps: '1.5': give a fraction"),
        (
            ["--out", "edit.pdf.txt"],
            "argument --out: 'edit.pdf.txt': give a file name with an image extension",
        ),
        (["--device", "banana"], "--device banana: give cpu, cuda, cuda:N or mps"),
        (["--model", "no-such-user/no-such-model"], "--model no-such-user/no-such-model: Could not load"),
        (["--model", "tiny", "--reweight", "dog=2"], "--reweight dog=2: 'dog' is not a word of the prompt"),
        (["--model", "tiny", "--source", LONG_PROMPT], "--source: the prompt has 82 tokens"),
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


def test_importing_prompt2prompt_leaves_the_heavy_libraries_unloaded():
    heavy = ("diffusers", "transformers", "matplotlib")
    code = f"import sys, prompt2prompt; print([m for m in {heavy!r} if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
