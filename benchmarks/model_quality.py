"""Test NLL of the richer programs at one training budget, side by side.

Each model of :data:`MODELS` is trained by ``ppl_vae.train.fit`` on the same Fashion-MNIST
training images (dynamic binarization, the same seed, batch, learning rate and number of
epochs), then scored on the test images by importance sampling with ``k`` draws from its guide
(``ppl_vae.metrics.log_likelihood``, seeded): the mean -log p(x) in nats with its standard
error over test images, and its difference from the one-layer VAE on the same images with the
paired standard error (the models share the test images, so this is the error of a
comparison), with the active units (Burda et al.'s criterion) where the guide is Gaussian.
The literature's ordering on MNIST (Burda et al. 2015: two stochastic layers 85.33 against
one layer 86.76; Tomczak & Welling 2018: VampPrior 85.57) is what the table is read against;
Fashion-MNIST's numbers are larger (its images carry more bits).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import machine
from ppl_vae import data, runs
from ppl_vae.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from ppl_vae.metrics import active_units, log_likelihood
from ppl_vae.models.capabilities import GaussianGuide
from ppl_vae.train import fit


def model_configs() -> dict:
    """The models compared: name → model config (Burda et al.'s sizes, tanh)."""
    from ppl_vae.models import VAEConfig

    one_layer = VAEConfig(z_dim=50, hidden=(200, 200), activation="tanh")
    configs = {"VAE, one layer (784-200-200-50)": one_layer}
    configs.update(extra_configs(one_layer))
    return configs


def extra_configs(one_layer) -> dict:
    """The two-layer, flow-guide and VampPrior variants, at the one-layer model's sizes."""
    from ppl_vae.models.flow import FlowVAEConfig
    from ppl_vae.models.hvae import HVAEConfig

    return {
        "hvae, two layers (Burda et al.'s 100 and 50 units)": HVAEConfig(),
        "VAE, IAF guide (2 steps)": FlowVAEConfig(
            z_dim=50, hidden=(200, 200), activation="tanh", guide_flow="iaf", flow_steps=2
        ),
        "VAE, VampPrior (K = 500 pseudo-inputs)": replace(
            one_layer, prior="vamp", prior_components=500
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.model_quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs per model (default 10)")
    parser.add_argument("--train-images", type=int, default=0,
                        help="training images (default 0: all 50,000)")  # fmt: skip
    parser.add_argument("--test-images", type=int, default=10_000, help="default 10000")
    parser.add_argument("--k", type=int, default=1000, help="IS draws per image (default 1000)")
    parser.add_argument("--batch-size", type=int, default=100, help="default 100")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's rate (default 1e-3)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", nargs="*", default=None, help="model names to run (default all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    print(machine(device, args.threads))
    dataset = data.load(DataConfig(), device)
    test_x = data.eval_inputs(dataset.test, "dynamic")[: args.test_images]
    print(f"Fashion-MNIST, {args.train_images or len(dataset.train)} training images, "
          f"{args.epochs} epochs, batch {args.batch_size}, Adam {args.lr:g}; test -log p(x) by "
          f"IS with k = {args.k} over {test_x.shape[0]} test images")  # fmt: skip
    print("| model | test -log p(x) (nats) | ± s.e. | Δ vs one layer ± paired s.e. | active "
          "units | final val -ELBO | train s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    first = None  # the first model's per-image log p(x): the others are paired with it
    runs_dir = Path(tempfile.mkdtemp(prefix="ppl-vae-quality-"))
    for name, model_cfg in model_configs().items():
        if args.only and name not in args.only:
            continue
        cfg = RunConfig(
            name=f"m{len(list(runs_dir.iterdir()))}",
            runs_dir=runs_dir,
            model=model_cfg,
            data=DataConfig(train_subset=args.train_images),
            train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              device="cpu", progress=False),  # fmt: skip
            eval=EvalConfig(),
        )
        started = time.perf_counter()
        run_dir = fit(cfg, dataset=dataset)
        seconds = time.perf_counter() - started
        _, model, _ = runs.load_model(run_dir, device)
        model.eval()
        with torch.no_grad():
            log_px = log_likelihood(model, test_x, k=args.k, batch_size=100,
                                    particle_chunk=min(args.k, 100), seed=0)  # fmt: skip
            active = (active_units(model, test_x)["active_units"]
                      if isinstance(model, GaussianGuide) else "—")  # fmt: skip
        nll = -log_px.mean().item()
        se = log_px.std().item() / math.sqrt(log_px.numel())
        if first is None:
            first, paired = log_px, "—"
        else:
            gap = first - log_px  # per image: this model's -log p(x) minus the first's
            paired = f"{gap.mean().item():+.2f} ± {gap.std().item() / math.sqrt(gap.numel()):.2f}"
        val = runs.read_metrics(run_dir)[-1]["val_neg_elbo"]
        print(f"| {name} | {nll:.2f} | {se:.2f} | {paired} | {active} | {val:.2f} | "
              f"{seconds:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
