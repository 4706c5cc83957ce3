"""Diffusion in practice: the sampler grid and the negative-prompt pair, on the tiny pipeline."""

import numpy as np
import pytest

import ptp_utils

PROMPT = "a red circle"


def test_scheduler_grid_has_steps_as_rows_and_samplers_as_columns(tiny_pipe, tmp_path):
    original = tiny_pipe.scheduler
    path = tmp_path / "grid.png"
    grid = ptp_utils.scheduler_grid(tiny_pipe, PROMPT, seed=0, step_counts=(4, 6), save_path=path)
    tile = ptp_utils.text_under_image(np.zeros((32, 32, 3), np.uint8), "DPM-Solver++, 4")
    gap = int(tile.shape[0] * 0.02)
    assert grid.size[0] == 5 * 32 + 4 * gap
    assert path.exists()
    assert tiny_pipe.scheduler is original


def test_scheduler_grid_columns_use_their_sampler(tiny_pipe):
    ddim = ptp_utils.generate(tiny_pipe, PROMPT, seed=0, num_inference_steps=4)
    grid = np.asarray(
        ptp_utils.scheduler_grid(tiny_pipe, PROMPT, seed=0, step_counts=(4,), schedulers=("DDIM",))
    )
    assert np.array_equal(grid[:32, :32], ddim)
    euler = np.asarray(
        ptp_utils.scheduler_grid(tiny_pipe, PROMPT, seed=0, step_counts=(4,), schedulers=("Euler",))
    )
    assert not np.array_equal(euler[:32, :32], ddim)


def test_unknown_scheduler_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match="choose from"):
        ptp_utils.scheduler_grid(tiny_pipe, PROMPT, seed=0, schedulers=("Heun",))


def test_negative_prompt_pair_shares_the_noise(tiny_pipe, tmp_path):
    pair = np.asarray(
        ptp_utils.negative_prompt_pair(
            tiny_pipe, PROMPT, "blue", seed=1, num_inference_steps=4, save_path=tmp_path / "pair.png"
        )
    )
    plain = ptp_utils.generate(tiny_pipe, PROMPT, seed=1, num_inference_steps=4)
    steered = ptp_utils.generate(tiny_pipe, PROMPT, seed=1, num_inference_steps=4, negative_prompt="blue")
    gap = pair.shape[1] - 64
    assert np.array_equal(pair[:32, :32], plain)
    assert np.array_equal(pair[:32, 32 + gap : 64 + gap], steered)
    assert not np.array_equal(plain, steered)
    assert (tmp_path / "pair.png").exists()
