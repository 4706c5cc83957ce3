"""Shared fixtures: the real CLIP tokenizer and tiny random-weight Stable Diffusion pipelines, all offline."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ptp_utils  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return ptp_utils.offline_clip_tokenizer()


@pytest.fixture
def tiny_pipe(tokenizer):
    """A fresh tiny pipeline per test (tests may change its tokenizer, embeddings or scheduler)."""
    return ptp_utils.make_tiny_pipeline(seed=0, tokenizer=tokenizer)
