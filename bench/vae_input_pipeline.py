"""Times one training epoch of vae_mnist.py's in-memory input path against a torchvision + DataLoader path.

Both epochs train the same VAE with the same optimizer, batch size and train_epoch(); only where
the binarized batches come from differs:

- ours: the whole training set is one float tensor; batches are slices of a random permutation,
  binarized with one torch.bernoulli call per batch (vae_mnist.in_memory_batches);
- reference: the PyTorch example's path, torchvision.datasets.MNIST with ToTensor() and a
  per-image Bernoulli draw, through torch.utils.data.DataLoader(shuffle=True), no workers.
  When torchvision is not importable (it cannot be installed next to every torch), an equivalent
  per-item Dataset does the same work per image: uint8 array -> PIL image -> float tensor / 255
  -> Bernoulli draw. The report says which one ran.

    python bench/vae_input_pipeline.py            # one epoch each on the CPU, prints the ratio
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

import vae_mnist  # noqa: E402


class PerItemMNIST(Dataset):
    """What torchvision's MNIST + ToTensor() + a Bernoulli transform do for each image."""

    def __init__(self, images: torch.Tensor):
        self.images = images.reshape(-1, 28, 28).numpy()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.images[i], mode="L")
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).float().div(255).unsqueeze(0)
        return torch.bernoulli(x), 0


def _write_idx(images: torch.Tensor, labels_count: int, raw: Path, prefix: str) -> None:
    """MNIST's IDX files, so that torchvision.datasets.MNIST reads our copy instead of downloading."""
    raw.mkdir(parents=True, exist_ok=True)
    header = np.array([2051, len(images), 28, 28], dtype=">i4").tobytes()
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.numpy().tobytes())
    header = np.array([2049, labels_count], dtype=">i4").tobytes()
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + bytes(labels_count))


def reference_dataset(
    train_images: torch.Tensor, test_images: torch.Tensor, root: str
) -> tuple[Dataset, str]:
    try:
        from torchvision import transforms
        from torchvision.datasets import MNIST
    except ImportError:
        return PerItemMNIST(train_images), "a per-item Dataset doing what torchvision's MNIST does"
    raw = Path(root) / "MNIST" / "raw"
    _write_idx(train_images, len(train_images), raw, "train")
    _write_idx(test_images, len(test_images), raw, "t10k")
    transform = transforms.Compose([transforms.ToTensor(), transforms.Lambda(torch.bernoulli)])
    return MNIST(root, train=True, download=False, transform=transform), "torchvision.datasets.MNIST"


def time_epoch(batches, total: int, config: vae_mnist.VAEConfig, data_mean: torch.Tensor, name: str) -> float:
    torch.manual_seed(config.seed)
    model = vae_mnist.VAE(config.latent_dim, config.hidden, data_mean)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * total)
    warmup = config.kl_warmup_epochs * total
    start = time.perf_counter()
    loss = vae_mnist.train_epoch(model, optimizer, scheduler, batches, warmup, desc=name, total=total)
    seconds = time.perf_counter() - start
    print(f"{name:>10}: {seconds:6.1f} s per epoch, train -ELBO {loss:.1f}")
    return seconds


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--batch-size", type=cli.positive_int, default=vae_mnist.VAEConfig.batch_size, help="images per step"
    )
    parser.add_argument("--data-dir", default=vae_mnist.DATA_DIR, help=vae_mnist.DATA_DIR_HELP)
    args = parser.parse_args()

    config = vae_mnist.VAEConfig(batch_size=args.batch_size)
    train_images, test_images = vae_mnist.load_mnist(args.data_dir)
    intensities = train_images.float() / 255
    total = math.ceil(len(train_images) / config.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch size {config.batch_size}")

    generator = torch.Generator().manual_seed(config.seed)
    ours = time_epoch(
        vae_mnist.in_memory_batches(intensities, config.batch_size, generator),
        total,
        config,
        intensities.mean(0),
        "in-memory",
    )
    with tempfile.TemporaryDirectory() as root:
        dataset, which = reference_dataset(train_images, test_images, root)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=0)
        reference = time_epoch((x for x, _ in loader), total, config, intensities.mean(0), "DataLoader")
    print(f"reference path: {which}")
    print(f"DataLoader / in-memory time per epoch: {reference / ours:.2f}x")


if __name__ == "__main__":
    main()
