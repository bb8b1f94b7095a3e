"""Shared benchmark plumbing: flags, machine description, interleaved A/B timing, summaries.

Timing is paired: every round runs each contender once, the order alternating between rounds
(A B, B A, A B, ...), so slow drifts of a shared machine hit both sides alike. Each contender's
figure is the median over rounds with its interquartile range; the headline ratio is the median
of the per-round ratios (paired), which is what the scripts print last.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyro
import torch

from ppl_vae.data import resolve_device

FASHION_TRAIN = 50_000  # training images after the 10k validation split
FASHION_TEST = 10_000


def make_parser(prog: str, doc: str | None, repeats: int, warmup: int) -> argparse.ArgumentParser:
    """A parser whose --help is the script's docstring, with the flags every script shares."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {prog}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_flags(parser, repeats, warmup)
    return parser


def add_step_flags(parser: argparse.ArgumentParser, images_per_sample: int) -> None:
    """--batch-sizes and --images-per-sample, for the scripts that time blocks of steps."""
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes (default: 128 1024 on CPU, 128 1024 8192 on CUDA)",
    )
    parser.add_argument(
        "--images-per-sample",
        type=int,
        default=images_per_sample,
        help="each timed sample is a block of max(1, this // batch) steps"
        f" (default {images_per_sample})",
    )


def batch_sizes(args: argparse.Namespace, device: torch.device) -> list[int]:
    """The --batch-sizes given, or 128 and 1024 (and 8192 on CUDA)."""
    return args.batch_sizes or ([128, 1024, 8192] if device.type == "cuda" else [128, 1024])


def ratio_lines(timings: dict[str, Timings], what: str, device: torch.device) -> list[str]:
    """``ratio NAME/reference WHAT DEVICE: median (IQR lo–hi)`` for every non-reference entry."""
    lines = []
    for name, t in timings.items():
        if name != "reference" and "reference" in timings:
            median, lo, hi = paired_ratio(t, timings["reference"])
            lines.append(
                f"ratio {name}/reference {what} {device.type}: {median:.3f} (IQR {lo:.3f}–{hi:.3f})"
            )
    return lines


def add_common_flags(parser: argparse.ArgumentParser, repeats: int, warmup: int) -> None:
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="where both contenders run (auto: cuda when available); default cpu",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch.set_num_threads for both contenders (default: torch's choice here,"
        f" {torch.get_num_threads()})",
    )
    parser.add_argument(
        "--repeats", type=int, default=repeats, help=f"timed rounds (default {repeats})"
    )
    parser.add_argument(
        "--warmup", type=int, default=warmup, help=f"untimed rounds first (default {warmup})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds torch and Pyro")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, which is steadier on a"
        " shared machine (with --threads 1 it is the work done; CUDA always uses wall)",
    )


def setup(args: argparse.Namespace) -> torch.device:
    """Resolve the device, fix the thread count and seeds; print the machine description."""
    device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    print(machine(device, args.threads))
    return device


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(device: torch.device, threads: int) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none used"
    return (
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC | CPU {cpu_model()} ({os.cpu_count()} cores,"
        f" {threads} torch threads) | GPU {gpu} | torch {torch.__version__} | pyro"
        f" {pyro.__version__} | python {platform.python_version()}"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timings:
    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def iqr(self) -> tuple[float, float]:
        q = statistics.quantiles(self.seconds, n=4) if len(self.seconds) > 1 else [self.median] * 3
        return q[0], q[2]


def interleave(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    clock: str = "wall",
) -> dict[str, Timings]:
    """Time each zero-argument callable once per round, alternating the order between rounds.

    The device is synchronized before and after every timed call, so a CUDA figure is the
    time until the work is done, not until it is queued. ``clock="cpu"`` measures the process's
    CPU time instead of elapsed time (ignored on CUDA, where the GPU's time is what counts).
    """
    now = time.process_time if clock == "cpu" and device.type == "cpu" else time.perf_counter
    names = list(contenders)
    timings = {name: Timings(name, []) for name in names}
    for round_ in range(warmup + repeats):
        order = names if round_ % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            start = now()
            contenders[name]()
            synchronize(device)
            if round_ >= warmup:
                timings[name].seconds.append(now() - start)
    return timings


def paired_ratio(a: Timings, b: Timings) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios a/b."""
    ratios = [x / y for x, y in zip(a.seconds, b.seconds, strict=True)]
    if len(ratios) == 1:
        return ratios[0], ratios[0], ratios[0]
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q[0], q[2]


def describe(t: Timings, per: int, unit: str) -> str:
    """``name: median (IQR lo–hi) per unit``, times scaled to ms per ``per`` calls."""
    lo, hi = t.iqr
    scale = 1e3 / per
    return (
        f"{t.name:>18}: {t.median * scale:8.3f} ms/{unit}  (IQR {lo * scale:.3f}–{hi * scale:.3f})"
    )
