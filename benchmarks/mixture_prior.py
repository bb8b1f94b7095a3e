"""The learned priors' density, side by side: ``DiagonalNormalMixture`` against torch's
``MixtureSameFamily`` over the same K diagonal Gaussians.

Contenders, on their own copies of one VAE with ``--model.prior vamp`` (K pseudo-inputs, the
784-200-200-50 tanh networks of the quality table): one training step (the recorded loss of
``loss_module`` and Adam, as ``ppl_vae.train`` runs it), with p(z) either the library's
``DiagonalNormalMixture`` (two matrix products, float64) or ``MixtureSameFamily`` over the
same components (its ``(B, K, d)`` broadcast, float32). Before timing, the two log-densities
of one batch of draws are compared and their largest difference printed. The figure printed
last is the paired ratio of the library's step time to MixtureSameFamily's (below 1: faster).
"""

from __future__ import annotations

import copy
import types

import pyro.distributions as dist
import torch

from benchmarks.common import describe, interleave, make_parser, paired_ratio, setup
from ppl_vae.inference.objectives import ObjectiveConfig, loss_module
from ppl_vae.inference.recording import record
from ppl_vae.inference.svi import SVIStep
from ppl_vae.models import VAEConfig, build


def torch_mixture(self, x, posterior):
    """The VampPrior's p(z) as ``MixtureSameFamily`` (a method for one model's prior)."""
    components = posterior(self.pseudo_inputs.to(x.dtype))
    logits = x.new_zeros(components.batch_shape)
    mixture = dist.MixtureSameFamily(dist.Categorical(logits=logits), components)
    return mixture.expand([x.shape[0]])


def contender(model, x: torch.Tensor, steps: int):
    step = SVIStep(record(loss_module(model, ObjectiveConfig()), model),
                   torch.optim.Adam(model.parameters(), lr=1e-4))  # fmt: skip
    model.train()

    def block() -> None:
        for _ in range(steps):
            step(x)

    return block


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("benchmarks.mixture_prior", __doc__, repeats=7, warmup=2)
    parser.add_argument("--components", type=int, nargs="+", default=[50, 500],
                        help="K pseudo-inputs (default 50 500)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=100, help="images per step (default 100)")
    parser.add_argument("--steps", type=int, default=10, help="steps per sample (default 10)")
    args = parser.parse_args(argv)
    device = setup(args)
    for k in args.components:
        torch.manual_seed(args.seed)
        cfg = VAEConfig(z_dim=50, hidden=(200, 200), activation="tanh", prior="vamp",
                        prior_components=k)  # fmt: skip
        library = build(cfg).to(device)
        reference = copy.deepcopy(library)
        prior = reference.learned_prior
        prior.distribution = types.MethodType(torch_mixture, prior)
        x = torch.bernoulli(torch.full((args.batch, 784), 0.3, device=device))
        with torch.no_grad():
            z = library.posterior(x).sample()
            ours = library.prior(x).log_prob(z)
            theirs = reference.prior(x).log_prob(z)
        gap, size = float((ours - theirs).abs().max()), float(ours.abs().max())
        print(f"K = {k}: largest |log p(z) difference| {gap:.2e} over {args.batch} draws "
              f"(|log p(z)| up to {size:.1f})")  # fmt: skip
        blocks = {"DiagonalNormalMixture": contender(library, x, args.steps),
                  "MixtureSameFamily": contender(reference, x, args.steps)}  # fmt: skip
        timings = interleave(blocks, args.repeats, args.warmup, device, args.clock)
        for t in timings.values():
            print(describe(t, args.steps, "step"))
        median, lo, hi = paired_ratio(timings["DiagonalNormalMixture"],
                                      timings["MixtureSameFamily"])  # fmt: skip
        print(f"ratio DiagonalNormalMixture/MixtureSameFamily step K={k} batch {args.batch} "
              f"{device.type}: {median:.3f} (IQR {lo:.3f}–{hi:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
