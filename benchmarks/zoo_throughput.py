"""Training images/s of the model zoo: the MLP VAE, the conv VAE and the VQ-VAE.

Each model trains through the step ``ppl_vae.train.fit`` builds for it (its step hook, then
ppl_vae.inference.svi.SVIStep over the lean Trace_ELBO, recorded and replayed where the model
opts in: the VQ-VAE runs lean), Adam 1e-3, on one batch of dynamically binarized Fashion-MNIST
images kept on the device. Models are timed interleaved, rounds alternating their order. There
is no hand-written reference here: these are absolute figures, the GPU ones the issue asks for
(on a CPU they show where each model spends its time, not a ratio).

    python -m benchmarks.zoo_throughput                          # CPU, batch 128 and 1024
    python -m benchmarks.zoo_throughput --device cuda            # adds batch 8192
"""

from __future__ import annotations

from benchmarks.common import add_step_flags, batch_sizes, describe, interleave, make_parser, setup
from benchmarks.step_overhead import PYRO_EXAMPLE, batch_of_images, ppl_vae_step
from ppl_vae.models import VAEConfig, VQVAEConfig

MODELS = {
    "vae_mlp": PYRO_EXAMPLE,
    "vae_conv": VAEConfig(arch="conv"),
    "vqvae": VQVAEConfig(),
}


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("benchmarks.zoo_throughput", __doc__, repeats=5, warmup=2)
    add_step_flags(parser, images_per_sample=4096)
    parser.add_argument(
        "--models", nargs="+", choices=sorted(MODELS), default=list(MODELS), help="which models"
    )
    args = parser.parse_args(argv)
    device = setup(args)
    sizes = batch_sizes(args, device)
    x_all = batch_of_images(max(sizes), device)
    summary = []
    for batch in sizes:
        x = x_all[:batch]
        steps = max(1, args.images_per_sample // batch)
        blocks = {}
        for name in args.models:
            step = ppl_vae_step(device, config=MODELS[name])
            blocks[name] = lambda step=step, x=x, steps=steps: [step(x) for _ in range(steps)]
        timings = interleave(blocks, args.repeats, args.warmup, device, args.clock)
        print(f"batch {batch} ({steps} steps per sample, {args.repeats} rounds, {args.clock})")
        for name, t in timings.items():
            rate = batch * steps / t.median
            print(describe(t, steps, "step"), f" {rate:10.0f} images/s")
            summary.append(f"images/s {name} batch {batch} {device.type}: {rate:.0f}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
