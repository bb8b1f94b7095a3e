"""Images/s over a full training epoch: ppl_vae against hand-written PyTorch, interleaved.

One epoch = every one of the 50,000 Fashion-MNIST training images once, in a seeded random
order, dynamically binarized per batch, exactly as ``ppl_vae.train.fit`` feeds them (index
slices of the device-resident uint8 tensor, ``data.to_input``), with the loss summed on the
device and read back once at the end of the epoch. Contenders differ only in the step:

* ``reference``: benchmarks/reference_vae.ReferenceStep (analytic KL, written by hand);
* ``ppl_vae``: fit's default step, the model's step hook included (benchmarks.step_overhead);
* ``ppl_vae_lean`` (unless --no-lean): the same without the recorded loss (the programs
  run at every step under the lean ELBO);
* ``ppl_vae_plain`` (unless --no-plain): ``--no-fast``, Trace_ELBO validated at every step
  (the "before").

Network: Pyro's VAE example (784-400-50 softplus), Adam 1e-3, batch 256 by default. Each
contender keeps its model and optimizer across rounds; epochs alternate in order between
rounds. The last lines are the paired ratios of epoch times.

    python -m benchmarks.epoch_throughput
    python -m benchmarks.epoch_throughput --device cuda --batch-size 1024
"""

from __future__ import annotations

import torch

from benchmarks.common import describe, interleave, make_parser, ratio_lines, setup
from benchmarks.reference_vae import ReferenceStep, ReferenceVAE
from benchmarks.step_overhead import PYRO_EXAMPLE, ppl_vae_step
from ppl_vae import data
from ppl_vae.config import DataConfig
from ppl_vae.errors import DataError


def training_images(n: int, device: torch.device) -> torch.Tensor:
    try:
        images = data.load(DataConfig(), device).train.images
    except DataError:  # no dataset here: random pixels of the same shape
        images = torch.randint(0, 256, (50_000, 28, 28), dtype=torch.uint8, device=device)
    return images[:n] if n else images


def epoch(step, source: torch.Tensor, batch_size: int, order: torch.Generator) -> float:
    """One pass over ``source`` as fit makes it; returns the mean -ELBO (one host sync)."""
    total = torch.zeros((), device=source.device)
    for images in data.batches(source, batch_size, order):
        total += step(data.to_input(images, "dynamic"))
    return total.item() / source.shape[0]


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("benchmarks.epoch_throughput", __doc__, repeats=5, warmup=1)
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (256)")
    parser.add_argument(
        "--images", type=int, default=0, help="train on the first N images only (0: all 50,000)"
    )
    parser.add_argument("--no-plain", action="store_true", help="leave out ppl_vae_plain")
    parser.add_argument("--no-lean", action="store_true", help="leave out ppl_vae_lean")
    args = parser.parse_args(argv)
    device = setup(args)
    source = training_images(args.images, device)
    steps = {
        "reference": ReferenceStep(ReferenceVAE(PYRO_EXAMPLE).to(device)),
        "ppl_vae": ppl_vae_step(device),
    }
    if not args.no_lean:
        steps["ppl_vae_lean"] = ppl_vae_step(device, "lean")
    if not args.no_plain:
        steps["ppl_vae_plain"] = ppl_vae_step(device, "plain")
    orders = {name: torch.Generator().manual_seed(args.seed) for name in steps}
    losses: dict[str, float] = {}

    def run(name):
        def one_epoch():
            losses[name] = epoch(steps[name], source, args.batch_size, orders[name])

        return one_epoch

    timings = interleave(
        {name: run(name) for name in steps}, args.repeats, args.warmup, device, args.clock
    )
    n = source.shape[0]
    print(
        f"epoch of {n} images, batch {args.batch_size}, {args.repeats} rounds, {args.clock} clock"
    )
    for name, t in timings.items():
        print(
            describe(t, 1, "epoch"),
            f" {n / t.median:8.0f} images/s  (last epoch's mean -ELBO {losses[name]:.2f})",
        )
    print("\n".join(ratio_lines(timings, f"epoch batch {args.batch_size}", device)))


if __name__ == "__main__":
    main()
