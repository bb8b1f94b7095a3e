"""One SVI training step of ppl_vae against the hand-written PyTorch step, interleaved.

Contenders (same 784-400-50 softplus networks from ppl_vae.nets, Adam 1e-3, same batch):

* ``reference``: benchmarks/reference_vae.py, -ELBO written by hand with the analytic KL;
* ``ppl_vae``: what ``ppl_vae.train.fit`` runs per batch by default: the model's step hook,
  then ppl_vae.inference.svi.SVIStep over the lean Trace_ELBO recorded and replayed as a
  graph of tensor ops (ppl_vae.inference.recording.record), Pyro validation on the first step;
* ``ppl_vae_lean`` (unless --no-lean): the same without the recording: the Pyro programs run
  at every step under the lean ELBO (what a model that does not opt in to recording gets);
* ``ppl_vae_plain`` (unless --no-plain): ``--no-fast``, the foundation's step: Pyro's
  Trace_ELBO with validation on at every step: the "before" figure.

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
from ppl_vae import data
from ppl_vae.config import DataConfig, ObjectiveConfig
from ppl_vae.errors import DataError
from ppl_vae.inference import recording
from ppl_vae.inference.estimators import LeanTrace_ELBO
from ppl_vae.inference.objectives import loss_module, own_parameters
from ppl_vae.inference.recording import record
from ppl_vae.inference.svi import SVIStep
from ppl_vae.models import VAEConfig, build
from ppl_vae.models.base import LatentVariableModel
from ppl_vae.models.capabilities import TrainingHooks

PYRO_EXAMPLE = VAEConfig(z_dim=50, hidden=(400,), activation="softplus")


def batch_of_images(n: int, device: torch.device) -> torch.Tensor:
    """``n`` dynamically binarized Fashion-MNIST training images (random pixels if unavailable)."""
    try:
        images = data.load(DataConfig(), device).train.images
    except DataError:
        images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, device=device)
    images = images[torch.arange(n, device=device) % images.shape[0]]
    return data.to_input(images, "dynamic")


class FitStep:
    """One iteration of ``ppl_vae.train.fit``'s loop: the model's step hook, then the step."""

    def __init__(self, model: LatentVariableModel, step: SVIStep):
        self.model, self.train_step, self.steps = model, step, 0
        self.hooks = model if isinstance(model, TrainingHooks) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.hooks is not None:
            self.hooks.on_train_step(self.steps)
        self.steps += 1
        return self.train_step(x)


def ppl_vae_step(device: torch.device, variant: str = "default", config=PYRO_EXAMPLE) -> FitStep:
    """The step fit builds for ``config`` (default: Pyro's example VAE): ``default`` (the loss
    recorded and replayed where the model opts in), ``lean`` (not recorded: the programs run at
    every step) or ``plain`` (``--no-fast``: Trace_ELBO, validated at every step). Ablations,
    one optimization at a time: ``validate_first`` (Trace_ELBO validated on the first step
    only), ``lean_unfused`` (the lean ELBO with every density through ``log_prob``) and
    ``unsimplified`` (the recorded graph replayed without simplify_graph's rewrites)."""
    model = build(config).to(device)
    cfg = ObjectiveConfig("trace")
    if variant == "lean_unfused":
        loss_fn = LeanTrace_ELBO(own_params=own_parameters(model), fused=False)(
            model.model, model.guide
        )
    else:
        loss_fn = loss_module(model, cfg, fast=variant not in ("plain", "validate_first"))
    if variant in ("default", "unsimplified"):
        loss_fn = record(loss_fn, model)
    if variant == "unsimplified":
        loss_fn = Unsimplified(loss_fn)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return FitStep(model, SVIStep(loss_fn, optimizer, fast=variant != "plain"))


class Unsimplified:
    """A recorded loss whose graphs are recorded without simplify_graph (an ablation)."""

    def __init__(self, recorded):
        self.recorded = recorded

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        simplify = recording.simplify_graph
        recording.simplify_graph = lambda graph: graph.recompile()
        try:
            return self.recorded(x)
        finally:
            recording.simplify_graph = simplify


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("benchmarks.step_overhead", __doc__, repeats=20, warmup=3)
    add_step_flags(parser, images_per_sample=2048)
    parser.add_argument(
        "--no-plain", action="store_true", help="leave out the foundation's plain Trace_ELBO step"
    )
    parser.add_argument(
        "--no-lean", action="store_true", help="leave out the unrecorded lean step"
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="add the steps between plain and ppl_vae, one optimization at a time:"
        " ablate_validate_first (Trace_ELBO, validation on the first step only) and"
        " ablate_lean_unfused (LeanTrace_ELBO with every density through log_prob, not"
        " recorded) and ablate_unsimplified (the recorded loss without simplify_graph)",
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
            for name in ("validate_first", "lean_unfused", "unsimplified"):
                contenders[f"ablate_{name}"] = ppl_vae_step(device, name)
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
