"""How usable a Shapes World autoencoder's latent space is for the diffusion model.

A diffusion model's sample is never exactly a latent of the data set. This reads, for the
autoencoder of a pipeline folder, what shapes_train.py's check after stage 1 reads (there on
other items and without the 0.1 level):
  channel_std       the spread of each latent channel over 256 images (scaled latents, so that
                    their overall std is about 1): a channel near 0 carries nothing
  posterior_std     the mean standard deviation of the encoder's posterior in each channel
                    (scaled): a channel near 1 has collapsed to the prior, pure noise
  noise_<s>         the share of objects the judge reads right (colour, shape and size) in the
                    reconstructions of 200 unseen images when Gaussian noise of s standard
                    deviations is added to their scaled latents before decoding
Prints one JSON object.

    python bench/shapes_autoencoder.py --model outputs/shapes_run/pipeline
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

import ptp_utils  # noqa: E402
from shapes_train import latent_report  # noqa: E402

NOISE_LEVELS = (0.0, 0.1, 0.2, 0.4)
JUDGED_IMAGES = 200
SEED = 7  # a data-set seed that training (seed 0) does not use: unseen items


def autoencoder_report(vae: AutoencoderKL, judged_images: int = JUDGED_IMAGES) -> dict:
    """The latent report of stage 1's check, on unseen items, at one more noise level."""
    scale = vae.config.scaling_factor
    return {"scaling_factor": scale, **latent_report(vae, scale, judged_images, SEED, NOISE_LEVELS)}


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", default="shapes", help="the shipped model's short name, or a pipeline folder"
    )
    parser.add_argument(
        "--images", type=cli.positive_int, default=JUDGED_IMAGES, help="images the judge reads per level"
    )
    args = parser.parse_args()
    vae = ptp_utils.load_pipeline(args.model, device="cpu", dtype=torch.float32).vae
    print(json.dumps({"model": args.model, **autoencoder_report(vae, args.images)}))


if __name__ == "__main__":
    main()
