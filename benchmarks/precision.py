"""Training step time at each --train.precision, side by side in one process.

Every contender is the training step of ``ppl_vae.train`` (``SVIStep`` over the recorded loss
of ``loss_module``, inside ``train.precision``) on its own copy of one model (the same initial
weights), timed as blocks of steps in interleaved rounds (``benchmarks.common.interleave``).
The figure printed last is the paired ratio of each precision's time to fp32's (below 1:
faster). tf32 changes nothing on a CPU and is timed on CUDA only.
"""

from __future__ import annotations

import copy

import torch

from benchmarks.common import (
    add_step_flags,
    batch_sizes,
    describe,
    interleave,
    make_parser,
    paired_ratio,
    setup,
)
from ppl_vae.inference.objectives import ObjectiveConfig, loss_module
from ppl_vae.inference.recording import record
from ppl_vae.inference.svi import SVIStep
from ppl_vae.models import VAEConfig, VQVAEConfig, build
from ppl_vae.train import precision

MODELS = {
    "mlp-vae": VAEConfig(),
    "conv-vae": VAEConfig(arch="conv"),
    "vqvae": VQVAEConfig(),
}


def contender(model, name: str, x: torch.Tensor, steps: int):
    """A block of ``steps`` training steps of ``model`` at precision ``name``."""
    step = SVIStep(record(loss_module(model, ObjectiveConfig()), model),
                   torch.optim.Adam(model.parameters(), lr=1e-4))  # fmt: skip
    model.train()

    def block() -> None:
        with precision(model, name):
            for _ in range(steps):
                step(x)

    return block


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("benchmarks.precision", __doc__, repeats=7, warmup=2)
    add_step_flags(parser, images_per_sample=4096)
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), help="models to time"
    )
    args = parser.parse_args(argv)
    device = setup(args)
    names = ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    for kind in args.models:
        torch.manual_seed(args.seed)
        base = build(MODELS[kind]).to(device)
        for batch in batch_sizes(args, device):
            steps = max(1, args.images_per_sample // batch)
            x = torch.bernoulli(torch.full((batch, 784), 0.3, device=device))
            blocks = {n: contender(copy.deepcopy(base), n, x, steps) for n in names}
            timings = interleave(blocks, args.repeats, args.warmup, device, args.clock)
            print(f"{kind}, batch {batch}, {steps} steps per sample:")
            for t in timings.values():
                print(describe(t, steps, "step"))
            for n in names[1:]:
                median, lo, hi = paired_ratio(timings[n], timings["fp32"])
                print(
                    f"ratio {n}/fp32 step {kind} batch {batch} {device.type}: "
                    f"{median:.3f} (IQR {lo:.3f}–{hi:.3f})"
                )


if __name__ == "__main__":
    main()
