"""Diffusion in practice: the sampler grid and the negative-prompt pair, on the tiny pipeline."""

import numpy as np
import pytest
import torch

import ptp_utils

PROMPT = "a red circle"


def pipeline_image(pipe, seed: int, steps: int, **kwargs) -> np.ndarray:
    """The stock pipeline's own image for this seed and its current scheduler, as uint8: what a tile shows."""
    generator = torch.Generator().manual_seed(seed)
    image = pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="np", **kwargs).images[0]
    return (image * 255).round().astype(np.uint8)


def test_scheduler_grid_has_steps_as_rows_and_samplers_as_columns(tiny_pipe, tmp_path):
    original = tiny_pipe.scheduler
    path = tmp_path / "grid.png"
    grid = ptp_utils.scheduler_grid(tiny_pipe, PROMPT, seed=0, step_counts=(4, 6), save_path=path)
    # Tiles are as high as the highest caption makes them.
    height = max(
        ptp_utils.text_under_image(np.zeros((32, 32, 3), np.uint8), f"{name}, {steps}").shape[0]
        for name in ptp_utils.SCHEDULERS
        for steps in (4, 6)
    )
    gap = int(height * 0.02)
    assert grid.size == (5 * 32 + 4 * gap, 2 * height + gap)
    # Row 2 is 6 steps; DDIM's column (the tiny pipeline's own sampler) holds what the pipeline draws.
    top, left = height + gap, list(ptp_utils.SCHEDULERS).index("DDIM") * (32 + gap)
    ddim_tile = np.asarray(grid)[top : top + 32, left : left + 32]
    assert np.array_equal(ddim_tile, pipeline_image(tiny_pipe, seed=0, steps=6))
    assert path.exists()
    assert tiny_pipe.scheduler is original


def test_scheduler_grid_columns_use_their_sampler(tiny_pipe):
    ddim = pipeline_image(tiny_pipe, seed=0, steps=4)
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
    plain = pipeline_image(tiny_pipe, seed=1, steps=4)
    steered = pipeline_image(tiny_pipe, seed=1, steps=4, negative_prompt="blue")
    gap = pair.shape[1] - 64
    assert np.array_equal(pair[:32, :32], plain)
    assert np.array_equal(pair[:32, 32 + gap : 64 + gap], steered)
    assert not np.array_equal(plain, steered)
    assert (tmp_path / "pair.png").exists()
