"""Scaling of distributed training: images/s of 1 against N processes at the same global batch.

Every process runs the training step of ``ppl_vae.train`` under torch.distributed (gloo on the
CPU, NCCL with one GPU per process on CUDA): ``SVIStep`` over
``DistributedDataParallel(DistributedLoss(model, loss))``, the default VAE, its share of the
global batch (rows rank, rank + N, ...), one torch thread per process on the CPU. Rounds
alternate the process counts (1, N, N, 1, ...); each round starts fresh processes and times a
block of steps after a warm-up inside them. Communication is the time of the same block with
the all-reduce left out (``DDP.no_sync()``, for timing only) subtracted from the real one. The
idle all-reduce is one ``all_reduce`` of the gradient's bytes with no training running: the
floor of what the step's communication can cost.

The scaling efficiency is (images/s with N) / (N · images/s with 1), the median over rounds of
the paired ratios.
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import machine, make_parser
from ppl_vae.inference.objectives import ObjectiveConfig, loss_module
from ppl_vae.inference.svi import SVIStep
from ppl_vae.models import VAE, VAEConfig
from ppl_vae.train import DistributedLoss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, size, port, batch, steps, warmup, device_name, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cuda = device_name == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if size > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size)
    try:
        torch.manual_seed(0)
        model = VAE(VAEConfig()).to(device)
        loss_fn = loss_module(model, ObjectiveConfig("trace"))
        ddp = None
        if size > 1:
            ddp = torch.nn.parallel.DistributedDataParallel(
                DistributedLoss(model, loss_fn), device_ids=[rank] if cuda else None
            )
            loss_fn = ddp
        step = SVIStep(loss_fn, torch.optim.Adam(model.parameters(), lr=1e-4))
        step.denominator = batch / size
        gen = torch.Generator().manual_seed(rank)
        x = torch.bernoulli(torch.full((len(range(rank, batch, size)), 784), 0.3), generator=gen)
        x = x.to(device)

        def block(n: int) -> float:
            if cuda:
                torch.cuda.synchronize()
            if size > 1:
                dist.barrier()
            started = time.perf_counter()
            for _ in range(n):
                step(x)
            if cuda:
                torch.cuda.synchronize()
            if size > 1:
                dist.barrier()
            return time.perf_counter() - started

        block(warmup)
        seconds = block(steps)
        local = seconds
        idle = 0.0
        if ddp is not None:
            with ddp.no_sync():
                local = block(steps)
            idle = idle_all_reduce(model, steps)
        if rank == 0:
            results.put((seconds, seconds - local, idle))
    finally:
        if size > 1:
            dist.destroy_process_group()


def idle_all_reduce(model: torch.nn.Module, steps: int) -> float:
    """Seconds of one all-reduce of the gradient's bytes with nothing else running."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for _ in range(3):
        dist.all_reduce(flat)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        dist.all_reduce(flat)
    dist.barrier()
    return (time.perf_counter() - started) / steps


def measure(size, batch, steps, warmup, device_name) -> tuple[float, float, float]:
    """(images/s, seconds of communication per step, seconds of an idle all-reduce of the
    gradient) of one fresh group of ``size``."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=worker, args=(r, size, port, batch, steps, warmup, device_name, results))
        for r in range(size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a worker of {size} process(es) exited with {p.exitcode}")
    seconds, comm, idle = results.get()
    return steps * batch / seconds, comm / steps, idle


def main(argv: list[str] | None = None) -> None:
    parser = make_parser("benchmarks.ddp_scaling", __doc__, repeats=3, warmup=3)
    parser.add_argument("--processes", type=int, default=2, help="N (default 2)")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[128, 1024], help="global batches"
    )
    parser.add_argument("--images", type=int, default=16384, help="images per timed block")
    args = parser.parse_args(argv)
    device_name = "cuda" if args.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu"
    n = args.processes
    if device_name == "cuda" and torch.cuda.device_count() < n:
        print(f"unmeasured: {n} processes need {n} GPUs, {torch.cuda.device_count()} visible")
        return
    print(f"# {machine(torch.device(device_name), 1)} | one torch thread per process")
    print(f"DDP scaling, default VAE (784-512-256-32), 1 vs {n} processes, {args.repeats} rounds")
    print(
        "| global batch | 1 process img/s | N processes img/s | efficiency | comm ms/step "
        "| idle all-reduce ms |"
    )
    print("|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        steps = max(2, args.images // batch)
        ips = {1: [], n: []}
        comm, idle = [], []
        for r in range(args.repeats):
            for size in (1, n) if r % 2 == 0 else (n, 1):
                value, c, i = measure(size, batch, steps, args.warmup, device_name)
                ips[size].append(value)
                if size == n:
                    comm.append(c)
                    idle.append(i)
        efficiency = statistics.median(b / (n * a) for a, b in zip(ips[1], ips[n], strict=True))
        print(
            f"| {batch} | {statistics.median(ips[1]):.0f} | {statistics.median(ips[n]):.0f} "
            f"| {efficiency:.1%} | {1000 * statistics.median(comm):.2f} "
            f"| {1000 * statistics.median(idle):.2f} |"
        )


if __name__ == "__main__":
    main()
