"""``fit()``: training a model with SVI, epoch by epoch, into its run folder.

The loss is Pyro's module form of the ELBO (``elbo(model.model, model.guide)``), optimized by
``torch.optim.Adam`` over the model's parameters, as in Pyro's ``examples/svi_torch.py``, through
the one SVI loop of :mod:`ppl_vae.inference.svi`. Batches are slices of a device-resident uint8
tensor; the loss is read back to the host once per epoch, not per step. After every epoch the
validation -ELBO is measured (under ``torch.no_grad``: no parameter or optimizer state changes),
a row goes to ``metrics.csv`` and the checkpoint is replaced atomically, so ``--resume RUN_DIR``
continues from the last finished epoch.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pyro
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ppl_vae import data, files, runs
from ppl_vae.config import RunConfig, TrainConfig, check_fits, shaped_for, to_dict
from ppl_vae.distributed import (
    STAND_IN,
    barrier,
    broadcast,
    gather,
    seeded,
    shard,
    stream_seed,
    world,
)
from ppl_vae.distributed import total as sum_over_ranks
from ppl_vae.errors import ConfigError, Diverged, RunDirError, UserError
from ppl_vae.inference.objectives import ObjectiveConfig, loss_module, make_elbo
from ppl_vae.inference.recording import record
from ppl_vae.inference.svi import SVIStep, check_program, run_svi
from ppl_vae.metrics import neg_elbo
from ppl_vae.models import build
from ppl_vae.models.capabilities import AuxiliaryFit, AuxiliaryFits, TrainingHooks

BURDA_STAGES = 8
NOTHING_TO_RESUME = (
    "free space or fix the permissions, then train again (no epoch was saved, so the run "
    "folder is removed)"
)


def learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for 0-based ``epoch``; under ``burda`` stage i lasts 3^i epochs."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    stage, end = 0, 1
    while epoch >= end and stage < BURDA_STAGES - 1:
        stage += 1
        end += 3**stage
    return cfg.lr * 10 ** (-stage / 7)


def seed_everything(seed: int) -> None:
    pyro.set_rng_seed(seed)  # python random, numpy and torch (all devices)


def rng_state(batch_order: torch.Generator) -> dict:
    """The random streams training draws from: torch (sampling, binarization), batch order."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "batch_order": batch_order.get_state(),
    }


def set_rng_state(state: dict, batch_order: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    batch_order.set_state(state["batch_order"].cpu())


def fit(
    cfg: RunConfig | None = None,
    *,
    resume: Path | None = None,
    epochs: int | None = None,
    dataset: data.Dataset | None = None,
) -> Path:
    """Train a model with SVI and return its run folder.

    Everything is checked (flags, data, the data against the model, and when resuming the
    checkpoint against the config) before a file is written. A new run folder that fails before
    its first epoch is finished is removed again; a non-finite loss stops training with
    :class:`~ppl_vae.errors.Diverged`, keeping the last finite epoch's checkpoint.

    :param cfg: the run to start; ignored when ``resume`` is given.
    :param resume: a run folder to continue from its last finished epoch, with its saved config.
    :param epochs: when resuming, a new total number of epochs (default: the saved one).
    :param dataset: an already loaded dataset on the right device (tests and notebooks reuse one).
    """
    if resume is not None:
        run_dir = Path(resume)
        cfg = runs.open_for_writing(run_dir, runs.CHECKPOINT)
        if epochs is not None:
            cfg = replace(cfg, train=replace(cfg.train, epochs=epochs))
    cfg = cfg or RunConfig()
    me = world()
    device = data.resolve_device(cfg.train.device, "--train.device")
    if resume is None:  # a new run's model takes its input shape from the data
        dataset = dataset or data.load(cfg.data, device)
        cfg = shaped_for(cfg, dataset.shape, dataset.source)
    seed_everything(cfg.train.seed)
    model = build(cfg.model).to(device)  # the same initial weights on every rank
    check_precision(model, cfg.train.precision)
    if me.size > 1:
        check_distributable(model)
        if not me.main:  # each rank its own draws; rank 0 keeps one process's stream
            torch.manual_seed(stream_seed(cfg.train.seed, me.rank))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, eps=cfg.train.adam_eps)
    batch_order = torch.Generator().manual_seed(cfg.train.seed)
    start_epoch, step, rows, state = 0, 0, [], None
    if resume is not None:  # the checkpoint is checked against the config before the data
        state = runs.load_checkpoint(run_dir, device, runs.RESUME_KEYS)
        path = run_dir / runs.CHECKPOINT
        runs.load_state(model, state["model"], path, "the model of config.json")
        runs.load_state(optimizer, state["optimizer"], path, "the optimizer of config.json")
        saved_size = state.get("world_size", 1)
        if saved_size != me.size:
            raise RunDirError(
                f"{path}: was written by {saved_size} process(es), this job has {me.size}; "
                f"resume with the same number (torchrun --nproc-per-node {saved_size})"
            )
        try:
            start_epoch, step = int(state["epoch"]), int(state["step"])
            set_rng_state(state.get("rng_ranks", [state["rng"]])[me.rank], batch_order)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError):
            raise RunDirError(f"{path}: its epoch, step or random state is damaged") from None
        rows = runs.history(state, run_dir)
    dataset = dataset or data.load(cfg.data, device)
    check_fits(cfg, dataset.train.num_pixels, dataset.source)
    source, mode = data.train_source(cfg.data, dataset.train, len(dataset.val))
    if cfg.train.progress and me.main:
        where = Path(dataset.source).parent if Path(dataset.source).is_file() else dataset.source
        streamed = " (streamed from host memory)" if dataset.train.streamed_to else ""
        tqdm.write(
            f"data: {source.shape[0]} training{streamed}, {len(dataset.val)} validation and "
            f"{len(dataset.test)} test images of {'x'.join(map(str, dataset.shape))} from "
            f"{where}"
        )

    loss_fn = loss_module(model, cfg.objective, cfg.fast)
    check_objective(model, loss_fn, dataset.val, cfg.data.binarization)
    created = None  # the topmost folder a new run created, removed if no epoch finishes
    if resume is None:  # rank 0 claims the folder and tells the others
        claimed = runs.new_run_dir(cfg, data.source_record(dataset, cfg.data)) if me.main else None
        run_dir, created = broadcast(claimed)
    elif cfg != runs.read_config(run_dir) and me.main:  # only --train.epochs may differ
        runs.write_config(run_dir, cfg, runs.data_source(run_dir))
    try:
        state = _train(cfg, model, loss_fn, optimizer, batch_order, dataset, source, mode,
                       run_dir, start_epoch, step, rows, state)  # fmt: skip
    except BaseException as err:
        if created is not None and not (run_dir / runs.CHECKPOINT).exists():
            files.remove_created(run_dir, created)  # a run that finished no epoch leaves nothing
            hint = runs.disk_hint(run_dir)  # a disk error's "then --resume RUN_DIR"
            if isinstance(err, UserError) and hint in str(err):
                raise type(err)(str(err).replace(hint, NOTHING_TO_RESUME)) from None
        raise
    # Parts fitted on the trained model (a VQ-VAE's code prior) live in its state_dict: the
    # checkpoint is rewritten with them.
    model.eval()
    fits = model.auxiliary_fits() if isinstance(model, AuxiliaryFits) else []
    if fits and state is not None:
        train_inputs = data.eval_inputs(dataset.train, cfg.data.binarization)
        val_inputs = data.eval_inputs(dataset.val, cfg.data.binarization)
        auxiliary: dict[str, float] = {}
        for aux in fits:
            auxiliary.update(
                fit_auxiliary(aux, train_inputs, val_inputs, cfg.fast, cfg.train.progress)
            )
        if auxiliary:
            runs.save_epoch(run_dir, {**state, "model": model.state_dict()}, state["history"])
            if cfg.train.progress:
                tqdm.write("  ".join(f"{k} {v:.4g}" for k, v in auxiliary.items()))
    barrier()  # rank 0's last checkpoint is on disk before any rank reads it
    return run_dir


def check_precision(model: torch.nn.Module, name: str) -> None:
    """bf16 needs a model that runs its networks through ``network`` (``mixed_precision``)."""
    if name == "bf16" and not getattr(model, "mixed_precision", False):
        raise ConfigError(
            f"--train.precision bf16: {type(model).__name__} does not run its networks through "
            "LatentVariableModel.network, so bf16 would not reach them; use fp32 or tf32"
        )


@contextmanager
def precision(model: torch.nn.Module, name: str):
    """The training steps' arithmetic (``--train.precision``) inside the block, fp32 after it.

    bf16 sets the model's ``autocast`` dtype (see ``LatentVariableModel.network``); tf32 lets
    CUDA's float32 matmuls and cuDNN's convolutions use TensorFloat-32 and puts back the
    settings it found."""
    if name == "fp32":
        yield
        return
    if name == "bf16":
        model.autocast = torch.bfloat16
        try:
            yield
        finally:
            del model.autocast
        return
    # torch >= 2.9 names the setting fp32_precision; older releases allow_tf32
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        flags = [(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
                 (torch.backends.cudnn.conv, "fp32_precision", "tf32")]  # fmt: skip
    else:
        flags = [(torch.backends.cuda.matmul, "allow_tf32", True),
                 (torch.backends.cudnn, "allow_tf32", True)]  # fmt: skip
    before = [getattr(owner, attr) for owner, attr, _ in flags]
    for owner, attr, value in flags:
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for (owner, attr, _), value in zip(flags, before, strict=True):
            setattr(owner, attr, value)


class DistributedLoss(torch.nn.Module):
    """The loss as a module that owns the model, so that DistributedDataParallel sees its
    parameters (an ELBO built from bound methods owns none) and all-reduces their gradients
    on every call (through ``forward``)."""

    def __init__(self, model: torch.nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(x)


def check_objective(model, loss_fn, split: data.Split, binarization: str) -> None:
    """Run the loss once on two validation images with Pyro's validation, before a file is
    written: an objective that the model's programs do not admit (meanfield with a mixture
    prior, stl or dreg with a guide site that has no rsample) is then a one-line error with no
    run folder to remove.
    Without gradients, its random draws undone and the model in eval mode for the call, so
    training runs as if it had not happened."""
    if len(split) == 0:
        return
    training = model.training
    model.eval()
    try:
        check_program(loss_fn, data.eval_inputs(split.head(2), binarization))
    finally:
        model.train(training)


def check_distributable(model: torch.nn.Module) -> None:
    """Models whose state changes outside gradients (buffers such as an EMA codebook) or that
    fit parts after training are not shared over processes yet: refused in one line. Buffers
    pass when the model keeps them equal over the ranks itself (``syncs_buffers``: the
    VQ-VAE's quantizer) or never writes them after construction (``constant_buffers``: a flow
    guide's masks and variable orders, built from the seed every rank shares)."""
    names = {name for name, _ in model.named_parameters()}
    buffers = sorted(set(model.state_dict()) - names)
    shared = getattr(model, "syncs_buffers", False) or getattr(model, "constant_buffers", False)
    if buffers and not shared:
        what = f"buffers {', '.join(buffers[:3])}"
        raise ConfigError(
            f"{type(model).__name__} has {what}, which distributed training does not share "
            "over processes yet; train it as one process (without torchrun)"
        )


def _train(cfg, model, loss_fn, optimizer, batch_order, dataset, source, mode, run_dir,
           start_epoch, step, rows, state):  # fmt: skip
    """The epochs ``start_epoch .. cfg.train.epochs`` of :func:`fit`; returns the last
    checkpoint state written (``state`` when no epoch was left to run)."""
    me = world()
    if me.size > 1:  # gradients all-reduced on every call, through DDP's forward
        ids = [model.device.index] if model.device.type == "cuda" else None
        # parts fitted after training (a code prior) take no part in the loss: left out of
        # DDP, which would otherwise wait for their gradients
        later = [p for aux in (model.auxiliary_fits() if isinstance(model, AuxiliaryFits)
                               else []) for p in aux.module.parameters()]  # fmt: skip
        for p in later:
            p.requires_grad_(False)
        loss_fn = DistributedDataParallel(DistributedLoss(model, loss_fn), device_ids=ids)
        for p in later:
            p.requires_grad_(True)
    elif cfg.fast:
        loss_fn = record(loss_fn, model)  # replayed where that is exact (inference.recording)
    train_step = SVIStep(loss_fn, optimizer, cfg.fast)  # validates its first step
    progress = cfg.train.progress and me.main

    def inputs(batches):
        """This rank's part of each global batch, and the step's denominator: global batch
        over ranks, so that DDP's mean of the ranks' gradients is one process's gradient."""
        for images in batches:
            part = shard(images)
            train_step.denominator = images.shape[0] / me.size if me.size > 1 else None
            STAND_IN["now"] = part.shape[0] == 0
            if STAND_IN["now"]:  # a last batch smaller than the number of ranks
                part, train_step.denominator = images[:1], math.inf
            yield data.to_input(part, mode)
        STAND_IN["now"] = False

    hooks = model if isinstance(model, TrainingHooks) else None

    def before_step() -> None:
        nonlocal step
        if hooks is not None:
            hooks.on_train_step(step)  # step-dependent schedules (KL warm-up), code revival
        step += 1

    val_inputs = data.eval_inputs(dataset.val, cfg.data.binarization)
    n_train = source.shape[0]
    steps_per_epoch = data.num_batches(n_train, cfg.train.batch_size)
    for epoch in range(start_epoch, cfg.train.epochs):
        lr = learning_rate(cfg.train, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        started = time.perf_counter()
        batches = data.batches(source, cfg.train.batch_size, batch_order,
                               to=dataset.train.streamed_to)  # fmt: skip
        kept = state["epoch"] if state is not None else None
        try:
            with precision(model, cfg.train.precision):
                summed = run_svi(
                    train_step,
                    inputs(batches),
                    before_step=before_step,
                    total=steps_per_epoch,
                    desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                    progress=progress,
                )
            train_loss = sum_over_ranks(summed).item() / n_train  # the epoch's one host sync
            seconds = time.perf_counter() - started
            if not math.isfinite(train_loss):  # before the validation's checks see NaN weights
                raise diverged(run_dir, epoch + 1, step, f"train -ELBO {train_loss}", kept)
            model.eval()
            val_loss = neg_elbo(model, val_inputs, cfg.objective, cfg.eval.batch_size, cfg.fast)
        except ValueError as err:
            # Pyro's validation (every step under --no-fast) meets NaN/inf distribution
            # arguments: divergence when trained weights give a non-finite loss, else a bug.
            if step <= 1 or math.isfinite(unchecked_loss(model, val_inputs, cfg)):
                raise
            raise diverged(run_dir, epoch + 1, step, invalid_values(err), kept) from None
        if not math.isfinite(val_loss):
            raise diverged(run_dir, epoch + 1, step, f"val -ELBO {val_loss}", kept)
        row = {
            "epoch": epoch + 1,
            "train_neg_elbo": round(train_loss, 4),
            "val_neg_elbo": round(val_loss, 4),
            "lr": lr,
            "seconds": round(seconds, 3),
            "images_per_s": round(n_train / seconds, 1),
            # model-specific columns (codebook usage, KL weight)
            **(hooks.epoch_metrics() if hooks is not None else {}),
        }
        rows = [*rows, row]
        every_rng = gather(rng_state(batch_order))  # each rank's streams, for --resume
        state = {
            "config": to_dict(cfg),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "step": step,
            "rng": every_rng[0],
            **({"rng_ranks": every_rng, "world_size": me.size} if me.size > 1 else {}),
        }
        if me.main:  # rank 0 writes
            runs.save_epoch(run_dir, state, rows)
        state["history"] = rows
        if progress:
            tqdm.write(
                f"epoch {epoch + 1:>4}  train -ELBO {train_loss:9.3f}  val -ELBO {val_loss:9.3f}"
                f"  {seconds:6.1f}s  {n_train / seconds:8.0f} img/s"
            )
    return state


def diverged(run_dir: Path, epoch: int, step: int, which: str, kept_epoch: int | None) -> Diverged:
    """The one-line error of a non-finite loss in ``epoch`` (nothing of that epoch is saved);
    ``which`` says what was not finite."""
    kept = (
        f"the checkpoint of epoch {kept_epoch} is kept in {run_dir}"
        if kept_epoch is not None
        else "no epoch finished, so the run folder is removed"
    )
    return Diverged(
        f"training diverged in epoch {epoch} (by step {step}): {which}; {kept}; "
        "lower --train.lr or use another --objective"
    )


def invalid_values(err: ValueError) -> str:
    """What Pyro's validation found, short: ``NaN or inf in the logits of a Bernoulli``."""
    lines = str(err).strip().splitlines()
    found = re.match(
        r"Expected parameter (\w+) .*? of distribution (\w+)", lines[0] if lines else ""
    )
    if found is None:
        return f"non-finite values ({' '.join(str(err).split())[:100]})"
    return f"NaN or inf in the {found[1]} of a {found[2]}"


def unchecked_loss(model, inputs: torch.Tensor, cfg: RunConfig) -> float:
    """The -ELBO of the first evaluation batch of ``inputs`` with Pyro's validation off (NaN
    or inf where the model's weights have diverged), on a forked random stream."""
    with seeded(0, inputs.device), pyro.validation_enabled(False):
        batch = inputs[: cfg.eval.batch_size]
        return neg_elbo(model, batch, cfg.objective, cfg.eval.batch_size, cfg.fast)


def fit_auxiliary(
    aux: AuxiliaryFit,
    train_inputs: torch.Tensor,
    val_inputs: torch.Tensor,
    fast: bool = True,
    progress: bool = False,
) -> dict[str, float]:
    """Fit an auxiliary model/guide pair by SVI (Adam, Trace_ELBO, the one SVI loop) on data
    made from the training images, in a fixed batch order (seed 0); returns its validation
    numbers."""
    with torch.no_grad():
        train_data, val_data = aux.data(train_inputs), aux.data(val_inputs)
    # A fresh, seeded start on a forked random stream: the fit depends on the trained model
    # only (a resumed run refits from scratch, as an uninterrupted one fits once) and leaves
    # training's random state alone.
    with seeded(0, train_data.device):
        for layer in aux.module.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        return _fit_auxiliary(aux, train_data, val_data, fast, progress)


def _fit_auxiliary(aux, train_data, val_data, fast, progress) -> dict[str, float]:
    elbo = make_elbo(ObjectiveConfig("trace"), fast, aux.module.parameters())
    optimizer = torch.optim.Adam(aux.module.parameters(), lr=aux.lr)
    step = SVIStep(elbo(aux.model, aux.guide), optimizer, fast)
    order = torch.Generator().manual_seed(0)
    aux.module.train()
    with torch.enable_grad():
        for _ in tqdm(range(aux.epochs), desc=aux.name, disable=None if progress else True):
            run_svi(step, data.batches(train_data, aux.batch_size, order))
    aux.module.eval()
    aux.done()
    return aux.evaluate(val_data)
