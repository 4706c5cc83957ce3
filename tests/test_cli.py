"""Every script's command line, run as a user runs it: --help prints the usage and nothing else, and
a user's mistake ends with one line on stderr that names the flag, exit code 2, and no file written."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cli

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(path.relative_to(REPO).as_posix() for path in [*REPO.glob("*.py"), *REPO.glob("bench/*.py")])
# Each process spends seconds importing torch and diffusers: they run side by side.
WORKERS = max(2, os.cpu_count() or 1)

TI = ["textual_inversion.py", "--token", "<thing>", "--init", "ball", "--model", "tiny"]
# Name: the command line (run in a folder holding `images/`, three pictures, and `empty/`), and the
# flag its error must name.
MISTAKES = {
    "ti_missing_folder": ([*TI, "--images", "missing"], "--images"),
    "ti_empty_folder": ([*TI, "--images", "empty"], "--images"),
    "ti_token_in_vocabulary": ([*TI, "--images", "images", "--token", "dog"], "--token"),
    "ti_init_of_two_tokens": ([*TI, "--images", "images", "--init", "red ball"], "--init"),
    "ti_zero_steps": ([*TI, "--images", "images", "--steps", "0"], "--steps"),
    "vae_zero_epochs": (["vae_mnist.py", "--epochs", "0"], "--epochs"),
    "vae_negative_epochs": (["vae_mnist.py", "--epochs", "-3"], "--epochs"),
    "vae_resume_without_checkpoint": (["vae_mnist.py", "--resume"], "--resume"),
    "vae_negative_lr": (["vae_mnist.py", "--lr", "-1"], "--lr"),
    "shapes_world_no_samples": (["shapes_world.py", "grid", "--n", "0"], "--n"),
    "shapes_world_not_an_image_file": (["shapes_world.py", "grid", "--out", "grid.txt"], "--out"),
    "shapes_train_no_autoencoder": (["shapes_train.py", "--out", "run", "--vae-steps", "0"], "--vae-steps"),
}


def run_script(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    script, *args = command
    # A user's environment: without the settings that importing cli (here, or through a module under
    # test) leaves in this process's.
    env = {name: value for name, value in os.environ.items() if name not in cli.QUIET_ENVIRONMENT}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def listing(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))


def run_mistake(command: list[str], folder: Path) -> tuple[subprocess.CompletedProcess, list[str], list[str]]:
    """The command's result, and the folder's files before and after it."""
    (folder / "images").mkdir()
    (folder / "empty").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i}.png"
        )
    before = listing(folder)
    result = run_script(command, folder)
    return result, before, listing(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every script's --help, and every mistake, each in a fresh folder."""
    with ThreadPoolExecutor(WORKERS) as pool:
        helps = {script: pool.submit(run_script, [script, "--help"], REPO) for script in SCRIPTS}
        mistakes = {
            name: pool.submit(run_mistake, command, tmp_path_factory.mktemp(name))
            for name, (command, _) in MISTAKES.items()
        }
        return {name: future.result() for name, future in {**helps, **mistakes}.items()}


def test_every_module_and_script_is_covered():
    assert {"cli.py", "textual_inversion.py", "vae_mnist.py", "shapes_world.py", "shapes_train.py"} <= set(
        SCRIPTS
    )
    assert "bench/ti_step_bench.py" in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_the_usage_and_nothing_on_stderr(runs, script):
    result = runs[script]
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: ")
    assert "--verbose" in result.stdout  # the package's parser, cli.ArgumentParser
    assert result.stderr == ""


@pytest.mark.parametrize("name", MISTAKES)
def test_a_mistake_is_one_line_naming_the_flag_with_exit_code_2_and_nothing_written(runs, name):
    result, before, after = runs[name]
    _, flag = MISTAKES[name]
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], result.stderr
    assert result.stdout == ""
    assert after == before


@pytest.mark.parametrize(
    "kind, text, value",
    [
        (cli.positive_int, "3", 3),
        (cli.positive_int, "0", None),
        (cli.positive_int, "-3", None),
        (cli.positive_int, "2.5", None),
        (cli.non_negative_int, "0", 0),
        (cli.non_negative_int, "-1", None),
        (cli.positive_float, "1e-4", 1e-4),
        (cli.positive_float, "0", None),
        (cli.positive_float, "nan", None),
        (cli.positive_float, "inf", None),
        (cli.non_negative_float, "0", 0.0),
        (cli.fraction, "1", 1.0),
        (cli.fraction, "1.5", None),
    ],
)
def test_number_types_take_their_range_and_refuse_the_rest(kind, text, value):
    parser = cli.ArgumentParser()
    parser.add_argument("--x", type=kind, help="a number")
    if value is None:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--x", text])
        assert exit_.value.code == 2
    else:
        assert parser.parse_args(["--x", text]).x == value


def test_user_errors_end_with_the_flag_and_the_message_and_let_other_errors_through(capsys):
    with pytest.raises(SystemExit) as exit_, cli.user_errors("--images", ValueError):
        raise ValueError("No images in empty: add 3-10 pictures.")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: --images: No images in empty: add 3-10 pictures.\n"
    with pytest.raises(KeyError), cli.user_errors("--images", ValueError):
        raise KeyError("a bug")


def test_help_keeps_the_description_as_written_and_shows_the_defaults():
    parser = cli.ArgumentParser(description="What it does.\n\n    python x.py --n 3   # an example")
    parser.add_argument("--n", type=cli.positive_int, default=5, help="how many")
    parser.add_argument("--resume", help="a checkpoint (default: start afresh)")
    text = parser.format_help()
    assert "\n    python x.py --n 3   # an example\n" in text
    assert "how many (default: 5)" in text
    assert "(default: start afresh)" in " ".join(text.split())
    assert "None" not in text
