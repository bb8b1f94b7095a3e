"""Several processes, one result: plain ``torch.distributed`` as launched by ``torchrun``.

``torchrun --nproc-per-node N -m ppl_vae COMMAND ...`` starts N copies of the CLI with
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set; :func:`launched` joins them into one process group
(gloo on the CPU, NCCL on GPUs) and leaves it at the end. Without those variables everything
runs as one process and nothing here communicates.

:func:`map_batches` is the one way work is shared: the batches of a fixed batching of the
inputs are dealt round-robin to the ranks, batch ``b`` is computed on random streams seeded by
``(seed, b)`` whichever rank computes it, and the results are summed into one tensor that every
rank receives (each row is written by exactly one rank, the others add zeros, so the sum is
exact). The numbers therefore do not depend on the number of processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

TIMEOUT_S = float(os.environ.get("PPL_VAE_DIST_TIMEOUT", "300"))
"""How long a collective waits for a rank that died before the job ends (seconds)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0, the one process that writes files and prints."""
        return self.rank == 0


def world() -> World:
    """This process's place among the processes of the job (one process: rank 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return World(dist.get_rank(), dist.get_world_size(), local)
    return World()


def requested() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def launched() -> Iterator[World]:
    """Join the process group torchrun set up (when it did), and leave it at the end."""
    if requested() <= 1 or (dist.is_available() and dist.is_initialized()):
        yield world()
        return
    use_nccl = torch.cuda.is_available() and os.environ.get("PPL_VAE_DIST_BACKEND") != "gloo"
    if use_nccl:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_nccl else "gloo", timeout=timedelta(seconds=TIMEOUT_S))
    try:
        yield world()
    finally:
        dist.destroy_process_group()


def device_for(name: str) -> str:
    """``cuda`` means this rank's own GPU (``cuda:LOCAL_RANK``) when several processes run."""
    if name == "cuda" and requested() > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def stream_seed(seed: int, index: int) -> int:
    """The seed of work item ``index`` of a computation seeded with ``seed``."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu"):
    """Run a block on torch's random streams seeded with ``seed``; the streams outside the
    block are left as they were."""
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def map_batches(
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    batch_size: int,
    seed: int,
    per_image: bool = True,
    shape: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float32,
    on_batch: Callable[[], None] | None = None,
) -> torch.Tensor:
    """``fn`` over the batches ``inputs[b·batch_size : (b+1)·batch_size]``, shared over the
    ranks, every rank getting the whole result.

    :param fn: batch → a tensor of shape ``(batch, *shape)`` (``per_image``) or ``shape``.
    :param seed: batch ``b`` runs on random streams seeded by :func:`stream_seed` of it.
    :returns: ``(N, *shape)`` (``per_image``) or ``(batches, *shape)``, in ``dtype``.
    """
    n = inputs.shape[0]
    batches = -(-n // batch_size)
    me = world()
    rows = n if per_image else batches
    out = torch.zeros((rows, *shape), dtype=torch.float64, device=inputs.device)
    for b in range(me.rank, batches, me.size):
        start = b * batch_size
        x = inputs[start : start + batch_size]
        with seeded(stream_seed(seed, b), inputs.device):
            value = fn(x)
        if per_image:
            out[start : start + x.shape[0]] = value.to(torch.float64)
        else:
            out[b] = value.to(torch.float64)
        if on_batch is not None:
            on_batch()
    if me.size > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(dtype)


def broadcast(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (a run folder's path)."""
    if world().size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: object) -> list:
    """Every rank's ``obj``, in rank order, on every rank (their random states)."""
    if world().size == 1:
        return [obj]
    out: list = [None] * world().size
    dist.all_gather_object(out, obj)
    return out


def total(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over the ranks (a copy; ``value`` itself is left alone)."""
    value = value.detach().clone()
    if world().size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch: rows rank, rank + size, ... (sizes differ by at
    most one; a rank may get none of a last batch smaller than the number of ranks)."""
    me = world()
    return batch if me.size == 1 else batch[me.rank :: me.size]


STAND_IN = {"now": False}
"""Set by the training loop while a rank steps on a zero-weight stand-in batch (a last batch
with fewer images than ranks): :func:`gather_rows` then contributes no rows for it."""


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """The global batch whose rank-strided shards (:func:`shard`) the ranks hold, rows in
    their global order, on every rank (a quantizer's statistics over the whole batch)."""
    me = world()
    if me.size == 1:
        return local
    if STAND_IN["now"]:
        local = local[:0]
    sizes = [torch.zeros((), dtype=torch.long, device=local.device) for _ in range(me.size)]
    dist.all_gather(sizes, torch.tensor(local.shape[0], device=local.device))
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(me.size)]
    dist.all_gather(parts, padded)
    out = torch.empty((sum(counts), *local.shape[1:]), dtype=local.dtype, device=local.device)
    for r, (part, n) in enumerate(zip(parts, counts, strict=True)):
        out[r :: me.size] = part[:n]
    return out


def from_rank0(value: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``value`` on every rank (a random choice that all ranks must share)."""
    if world().size > 1:
        dist.broadcast(value, src=0)
    return value


def barrier() -> None:
    """Wait until every rank is here (rank 0's files are written before others read them)."""
    if world().size > 1:
        dist.barrier()


def share_of(total: int) -> int:
    """How many of ``total`` equal work items this rank does under :func:`map_batches`."""
    me = world()
    return len(range(me.rank, total, me.size))
