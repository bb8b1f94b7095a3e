"""The one SVI loop: a step (loss, backward, optimizer step) and a pass of it over batches.

Training (:func:`ppl_vae.train.fit`), the VQ-VAE's code prior and the local q*(z|x) of the
diagnostics all run their optimization through :func:`run_svi`, as in Pyro's
``examples/svi_torch.py``: the ELBO in module form, ``elbo(model, guide)``, driven by a torch
optimizer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm


class SVIStep:
    """One SVI step: −ELBO summed over the batch, backward of its mean per datum, optimizer
    step, cleared gradients (and a learning-rate scheduler step, if given).

    With ``fast`` (the default) the first call runs Pyro's validation in a separate pass
    without gradients whose random draws are undone afterwards (:meth:`check`): the full checks
    (model/guide site match, distribution arguments, observation support, plate shapes) see the
    real data and networks once, and the steps that train are the same arithmetic whether or
    not they follow a check, so a resumed run repeats an uninterrupted one bit for bit. Later
    calls run with validation off, because they would repeat the same checks on the same
    program; what can still change between steps, a loss that becomes NaN or infinite, is
    checked on the summed loss read back once per pass (:meth:`check_finite`). Without
    ``fast`` every step runs as Pyro's validation is set (Pyro's default behaviour).

    :param loss_fn: the ELBO in module form, ``elbo(model, guide)``: batch → summed −ELBO.
    :param optimizer: a torch optimizer over the parameters to fit.
    :param scheduler: stepped after every optimizer step (e.g. an exponential decay).
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        fast: bool = True,
        scheduler=None,
    ):
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.fast = fast
        self.scheduler = scheduler
        self.calls = 0
        self.denominator: float | None = None
        """Divides the summed loss before backward (default: the batch size). Under
        DistributedDataParallel, which averages gradients over the N ranks, it is the global
        batch over N, so the step is that of one process on the whole global batch."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Take one step on the batch ``x``; returns the detached −ELBO summed over the batch."""
        if not self.fast:
            loss = self.loss_fn(x)
        else:
            if is_validation_enabled() and self.calls == 0:
                self.check(x)
            with pyro.validation_enabled(False):
                loss = self.loss_fn(x)
        self.calls += 1
        denominator = self.denominator or x.shape[0]
        (loss / denominator).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if math.isinf(denominator):  # a stand-in batch that only keeps the ranks in step
            return torch.zeros_like(loss.detach())
        return loss.detach()

    def check(self, x: torch.Tensor) -> None:
        """Run the loss once with Pyro's validation on, for its checks alone."""
        check_program(self.loss_fn, x)

    @staticmethod
    def check_finite(total: float, where: str) -> None:
        """Warn, as Pyro's per-step validation would, when a read-back loss is NaN or ±inf."""
        if not math.isfinite(total):
            warnings.warn(f"-ELBO is {total} in {where}: training diverged", stacklevel=2)


def check_program(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> None:
    """Run ``fn(x)`` once with Pyro's validation on, for its checks alone: no gradients, and
    its random draws undone, so what runs after it draws as if it had not run."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        with pyro.validation_enabled(True):
            fn(x)


def run_svi(
    step: SVIStep,
    batches: Iterable[torch.Tensor],
    *,
    before_step: Callable[[], None] | None = None,
    total: int | None = None,
    desc: str = "SVI",
    progress: bool = False,
) -> torch.Tensor:
    """One pass of ``step`` over ``batches``; returns the summed −ELBO, left on the device
    (no host synchronization).

    :param before_step: called before every step (a model's step-dependent schedules).
    :param total: the number of batches, for the progress bar.
    :param progress: show a progress bar (tqdm, quiet when output is not a terminal).
    """
    summed = None
    bar = tqdm(batches, total=total, desc=desc, disable=None if progress else True, leave=False)
    for x in bar:
        if before_step is not None:
            before_step()
        loss = step(x)
        summed = loss if summed is None else summed + loss
    return summed if summed is not None else torch.zeros(())
