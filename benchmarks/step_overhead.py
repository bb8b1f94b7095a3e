"""One SVI training step of ppl_vae against the hand-written PyTorch step, interleaved.

Contenders (same 784-400-50 softplus networks from ppl_vae.nets, Adam 1e-3, same batch):

* ``reference``: benchmarks/reference_vae.py, -ELBO written by hand with the analytic KL;
* ``ppl_vae``: what ``ppl_vae.train.fit`` runs per batch by default: the model's step hook,
  then ppl_vae.fast.TrainStep over the lean Trace_ELBO recorded and replayed as a graph of
  tensor ops (ppl_vae.fast.capture / CapturedELBO), Pyro validation on the first step;
* ``ppl_vae_lean`` (unless --no-lean): the same with ``--no-train.capture``: the Pyro
  programs run at every step under the lean ELBO;
* ``ppl_vae_plain`` (unless --no-plain): the foundation's step, Pyro's Trace_ELBO with
  validation on at every step: the "before" figure.

Rounds alternate the order of the contenders; each timed sample is a block of steps. The last
lines printed are the paired ratios ppl_vae / reference, one per batch size.

    python -m benchmarks.step_overhead                 # CPU, batch 128 and 1024
    python -m benchmarks.step_overhead --device cuda   # adds batch 8192
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    add_step_flags,
    batch_sizes,
    describe,
    interleave,
    make_parser,
    ratio_lines,
    setup,
)
from benchmarks.reference_vae import ReferenceStep, ReferenceVAE
from ppl_vae import fast
from ppl_vae.config import ObjectiveConfig
from ppl_vae.fast import TrainStep, capture
from ppl_vae.models import VAEConfig, build
from ppl_vae.models.base import LatentVariableModel

PYRO_EXAMPLE = VAEConfig(z_dim=50, hidden=(400,), activation="softplus")


def batch_of_images(n: int, device: torch.device) -> torch.Tensor:
    """``n`` dynamically binarized Fashion-MNIST training images (random pixels if unavailable)."""
    from ppl_vae import data
    from ppl_vae.config import DataConfig
    from ppl_vae.errors import DataError

    try:
        images = data.load(DataConfig(), device).train.images
    except DataError:
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, device=device)
    images = images[torch.arange(n, device=device) % images.shape[0]]
    return data.to_input(images, "dynamic")


class FitStep:
    """One iteration of ``ppl_vae.train.fit``'s loop: the model's step hook, then the step."""

    def __init__(self, model: LatentVariableModel, step: TrainStep):
        self.model, self.train_step, self.steps = model, step, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.model.on_train_step(self.steps)
        self.steps += 1
        return self.train_step(x)


def ppl_vae_step(device: torch.device, variant: str = "default", config=PYRO_EXAMPLE) -> FitStep:
    """The step fit builds for ``config`` (default: Pyro's example VAE): ``default`` (the loss
    recorded and replayed where the model allows it, fast.capture), ``lean``
    (--no-train.capture: the programs run at every step) or ``plain`` (the foundation's
    Trace_ELBO, validated at every step); ``unsimplified`` (an ablation): the recorded graph
    replayed without fast.simplify_graph's rewrites."""
    from ppl_vae.objectives import loss_module

    model = build(config).to(device)
    loss_fn = loss_module(model, ObjectiveConfig("trace"), lean=variant != "plain")
    if variant in ("default", "unsimplified"):
        loss_fn = capture(loss_fn, model)
        if variant == "unsimplified":
            loss_fn.simplify = False
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = TrainStep(loss_fn, optimizer, validate="always" if variant == "plain" else "first")
    return FitStep(model, step)


def unfused(step: FitStep):
    """``step`` with ppl_vae.fast's fused log-density sums switched off while it runs."""

    def run(x: torch.Tensor) -> torch.Tensor:
        fast.FUSED_LOG_PROBS = False
        try:
            return step(x)
        finally:
            fast.FUSED_LOG_PROBS = True

    return run


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("benchmarks.step_overhead", __doc__, repeats=20, warmup=3)
    add_step_flags(parser, images_per_sample=2048)
    parser.add_argument(
        "--no-plain", action="store_true", help="leave out the foundation's plain Trace_ELBO step"
    )
    parser.add_argument(
        "--no-lean", action="store_true", help="leave out the --no-train.capture step"
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="add the steps between plain and ppl_vae, one optimization at a time:"
        " ablate_validate_first (Trace_ELBO, validation on the first step only) and"
        " ablate_lean_unfused (LeanTrace_ELBO with every density through log_prob, no"
        " capture) and ablate_unsimplified (the recorded loss without simplify_graph)",
    )
    args = parser.parse_args(argv)
    device = setup(args)
    sizes = batch_sizes(args, device)
    x_all = batch_of_images(max(sizes), device)
    summary = []
    for batch in sizes:
        x = x_all[:batch]
        steps = max(1, args.images_per_sample // batch)
        reference = ReferenceStep(ReferenceVAE(PYRO_EXAMPLE).to(device))
        contenders = {"reference": reference, "ppl_vae": ppl_vae_step(device)}
        if not args.no_lean:
            contenders["ppl_vae_lean"] = ppl_vae_step(device, "lean")
        if not args.no_plain:
            contenders["ppl_vae_plain"] = ppl_vae_step(device, "plain")
        if args.ablation:
            validate_first = ppl_vae_step(device, "plain")
            validate_first.train_step.validate = "first"
            contenders["ablate_validate_first"] = validate_first
            contenders["ablate_lean_unfused"] = unfused(ppl_vae_step(device, "lean"))
            contenders["ablate_unsimplified"] = ppl_vae_step(device, "unsimplified")
        blocks = {
            name: (lambda step=step, x=x, steps=steps: [step(x) for _ in range(steps)])
            for name, step in contenders.items()
        }
        timings = interleave(blocks, args.repeats, args.warmup, device, args.clock)
        print(
            f"batch {batch} ({steps} steps per sample, {args.repeats} rounds, {args.clock} clock)"
        )
        for t in timings.values():
            print(describe(t, steps, "step"), f" {batch * steps / t.median:10.0f} images/s")
        summary += ratio_lines(timings, f"batch {batch}", device)
    print("\n".join(summary))


if __name__ == "__main__":
    main()
