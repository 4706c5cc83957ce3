"""Shared fixtures: the real CLIP tokenizer and tiny random-weight Stable Diffusion pipelines, all offline."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import offline_models  # noqa: E402

# The test models are tiny: thread start-up costs more than it saves, and with other jobs on a
# 2-core machine extra threads oversubscribe the cores (20x slower in a measurement here).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return offline_models.offline_clip_tokenizer()


@pytest.fixture
def tiny_pipe():
    """A fresh tiny pipeline, with its own tokenizer, per test: tests may add tokens or swap schedulers."""
    return offline_models.make_tiny_pipeline(seed=0)


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.nn.Module.compile with dynamo's eager backend (inductor takes minutes on a CPU): dynamo
    still captures the graphs. Returns the class names of the modules compiled, in order."""
    real_compile = torch.nn.Module.compile
    compiled_modules = []

    def compile_eagerly(module):
        compiled_modules.append(type(module).__name__)
        real_compile(module, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", compile_eagerly)
    return compiled_modules
