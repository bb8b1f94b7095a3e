"""What a ``torchrun`` job of ppl_vae joins: the process group of ppl_vae.distributed.launched().

``torchrun -m ppl_vae train`` runs the CLI inside ``distributed.launched()``; this runs the
same context and prints one line: the backend of the process group it formed (``none`` when it
formed none), this rank, the world size, the device ``--train.device cuda`` would give this
rank, and the result of one all-reduce of a 1 on that device (the world size, when the group
communicates). benchmarks/gpu_check.sh runs it next to its torchrun training step, so that the
results say which path that step took.

    torchrun --standalone --nproc-per-node 1 -m benchmarks.torchrun_world [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from ppl_vae import distributed
from ppl_vae.data import resolve_device


def describe(device_name: str) -> str:
    """The one line about this rank's process group (inside ``distributed.launched()``)."""
    me = distributed.world()
    device = resolve_device(device_name)
    if dist.is_available() and dist.is_initialized():
        backend = str(dist.get_backend())
        one = torch.ones((), device=device)
        dist.all_reduce(one)
        reduced = f"all-reduce of 1 = {one.item():g}"
    else:
        backend, reduced = "none", "no collective (one process, no group)"
    return (
        f"process group: {backend}; rank {me.rank} of world size {me.size}; device {device};"
        f" {reduced}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.torchrun_world",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="as --train.device"
    )
    args = parser.parse_args(argv)
    with distributed.launched():
        line = describe(args.device)
        if distributed.world().main:
            print(line)


if __name__ == "__main__":
    main()
