"""Importance-sampled log p(x) (k draws per image) of ppl_vae against hand-written PyTorch.

Contenders, all with the same 784-400-50 softplus networks and weights, the same images,
batch size and particle chunk:

* ``reference``: reference_log_likelihood in benchmarks/reference_vae.py (weights written out
  by hand from the maths);
* ``ppl_vae``: ppl_vae.metrics.log_likelihood, what ``ppl-vae evaluate`` runs;
* ``ppl_vae_plain`` (unless --no-plain): the same with every chunk through Pyro traces
  (``--no-fast``), the foundation's path: the "before" figure.

Prints images/s per contender, the time the full 10,000-image test set would take at that
rate (with --images 10000 it is measured), the largest difference between the estimates of
ppl_vae and the reference (same seed per round), and the paired ratios last.

    python -m benchmarks.eval_throughput                         # 500 test images, k = 1000
    python -m benchmarks.eval_throughput --images 10000 --repeats 1 --no-plain --only-ppl-vae
"""

from __future__ import annotations

import pyro
import torch

from benchmarks.common import FASHION_TEST, describe, interleave, make_parser, ratio_lines, setup
from benchmarks.reference_vae import ReferenceVAE, reference_log_likelihood
from benchmarks.step_overhead import PYRO_EXAMPLE
from ppl_vae import data
from ppl_vae.config import DataConfig, EvalConfig
from ppl_vae.errors import DataError
from ppl_vae.metrics import log_likelihood
from ppl_vae.models import VAE


def test_inputs(n: int, device: torch.device) -> torch.Tensor:
    try:
        return data.eval_inputs(data.load(DataConfig(), device).test, "dynamic")[:n]
    except DataError:
        return torch.bernoulli(torch.full((n, 784), 0.3, device=device))


def main(argv: list[str] | None = None) -> None:
    defaults = EvalConfig()
    parser = make_parser("benchmarks.eval_throughput", __doc__, repeats=3, warmup=0)
    parser.add_argument("--images", type=int, default=500, help="test images (default 500)")
    parser.add_argument("--k", type=int, default=1000, help="draws per image (default 1000)")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="images per batch"
    )
    parser.add_argument(
        "--particle-chunk",
        type=int,
        default=defaults.particle_chunk,
        help=f"draws at once (default {defaults.particle_chunk}, as ppl_vae.metrics.EvalConfig)",
    )
    parser.add_argument("--no-plain", action="store_true", help="leave out ppl_vae_plain")
    parser.add_argument(
        "--only-ppl-vae", action="store_true", help="time ppl_vae alone (no reference, no ratio)"
    )
    args = parser.parse_args(argv)
    device = setup(args)
    inputs = test_inputs(args.images, device)
    model = VAE(PYRO_EXAMPLE).to(device).eval()
    reference = ReferenceVAE(PYRO_EXAMPLE).to(device).eval()
    reference.load_state_dict(model.state_dict())
    chunking = dict(k=args.k, batch_size=args.batch_size, particle_chunk=args.particle_chunk,
                    seed=args.seed)  # the same per-batch streams for every contender
    estimates: dict[str, torch.Tensor] = {}

    def run(name, fn):
        def timed():
            pyro.set_rng_seed(args.seed)  # same draws for every contender in a round
            estimates[name] = fn()

        return timed

    contenders = {"ppl_vae": run("ppl_vae", lambda: log_likelihood(model, inputs, **chunking))}
    if not args.only_ppl_vae:
        contenders["reference"] = run(
            "reference", lambda: reference_log_likelihood(reference, inputs, **chunking)
        )
        if not args.no_plain:
            contenders["ppl_vae_plain"] = run(
                "ppl_vae_plain", lambda: log_likelihood(model, inputs, **chunking, fast=False)
            )
    timings = interleave(contenders, args.repeats, args.warmup, device, args.clock)
    n = inputs.shape[0]
    print(
        f"IS log p(x): {n} images, k={args.k}, batch {args.batch_size}, particle chunk"
        f" {args.particle_chunk}, {args.repeats} rounds, {args.clock} clock"
    )
    for t in timings.values():
        seconds_full = t.median / n * FASHION_TEST
        print(
            describe(t, 1, "run"),
            f" {n / t.median:8.0f} images/s  → {seconds_full:6.1f} s for {FASHION_TEST} images",
        )
    if "reference" in estimates:
        gap = (estimates["ppl_vae"] - estimates["reference"]).abs().max().item()
        print(f"max |ppl_vae − reference| log p(x) estimate: {gap:.2e} nats")
        print(f"mean NLL estimate: {-estimates['ppl_vae'].mean().item():.3f} nats")
        print("\n".join(ratio_lines(timings, "IS eval", device)))


if __name__ == "__main__":
    main()
