"""One process of the two-process textual-inversion test: `torchrun --nproc_per_node 2 ti_ddp_worker.py
IMAGES OUT` trains the tiny pipeline (gloo on CPU with ACCELERATE_USE_CPU=1), then writes this
process's embedding matrix, before and after, and the losses it computed to OUT/rank<N>.pt."""

import argparse
import sys
from pathlib import Path

import torch
from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_textual_inversion import make_config  # noqa: E402

import offline_models  # noqa: E402
import textual_inversion as ti  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("images", help="the folder of training images")
parser.add_argument("output_dir", help="where the embeddings and rank<N>.pt go")
args = parser.parse_args()
torch.set_num_threads(1)
wrapper = ti.StableDiffusionWrapper(offline_models.make_tiny_pipeline(seed=0))
config = make_config(args.images, args.output_dir)
losses = []
compute_loss = ti.compute_standard_diffusion_loss


def recording_loss(*loss_args):
    loss = compute_loss(*loss_args)
    losses.append(loss.item())
    return loss


ti.compute_standard_diffusion_loss = recording_loss
before = wrapper.text_encoder.get_input_embeddings().weight.detach().clone()
ti.textual_inversion(wrapper, config)
after = wrapper.text_encoder.get_input_embeddings().weight.detach()
torch.save(
    {"before": before, "after": after, "losses": losses},
    Path(args.output_dir) / f"rank{PartialState().process_index}.pt",
)
