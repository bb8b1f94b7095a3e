"""Run configuration: frozen dataclasses that hold every default exactly once.

A run is described by a :class:`RunConfig`; its ``model`` field holds the config of one
registered model (see :mod:`ppl_vae.models`). The leaf configs live next to what they configure
(:class:`~ppl_vae.data.DataConfig`, :class:`~ppl_vae.inference.objectives.ObjectiveConfig`,
:class:`~ppl_vae.metrics.EvalConfig`, each model's config in its file) and are assembled here.
The CLI flags are generated from these classes (``--train.epochs``, ``--model.z-dim``, ...),
their attribute docstrings are the ``--help`` text, and ``config.json`` in every run folder is
:func:`to_dict` of the config the run used.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ppl_vae.data import DataConfig
from ppl_vae.errors import ConfigError, check
from ppl_vae.inference.objectives import ObjectiveConfig
from ppl_vae.metrics import EvalConfig
from ppl_vae.models import REGISTRY, HVAEConfig, ModelConfig, VAEConfig, config_class


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    """Passes over the training set."""
    batch_size: int = 128
    """Images per SVI step."""
    lr: float = 1e-3
    """Adam learning rate (the first stage's rate under the burda schedule)."""
    lr_schedule: Literal["constant", "burda"] = "constant"
    """burda: 8 stages of 3^i epochs at lr·10^(-i/7), i = 0..7 (Burda et al. 2015)."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    seed: int = 0
    """Seeds torch, Pyro and the batch order."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks cuda when available."""
    precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """Arithmetic of the training steps. tf32: float32 matmuls and convolutions on TensorFloat-32
    tensor cores (CUDA only; on the CPU the same as fp32). bf16: the networks run under
    bfloat16 autocast (CPU or CUDA) and hand float32 outputs on, so log-densities, the ELBO's
    sums, a VQ-VAE's distances and EMA statistics stay float32; parameters, gradients and
    Adam's state stay float32. Validation, evaluation and the code prior's fit run in fp32."""
    progress: bool = True
    """Show progress bars (they stay quiet when output is not a terminal)."""

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "--train.epochs", "a positive integer", self.epochs)
        check(self.batch_size >= 1, "--train.batch-size", "a positive integer", self.batch_size)
        check(0 < self.lr < math.inf, "--train.lr", "positive and finite", self.lr)
        check(
            0 < self.adam_eps < math.inf, "--train.adam-eps", "positive and finite", self.adam_eps
        )


@dataclass(frozen=True)
class RunConfig:
    name: str | None = None
    """Run folder name under --runs-dir (default: <model>-<date>-<time>)."""
    runs_dir: Path = Path("runs")
    """Where run folders are written."""
    fast: bool = True
    """The fast paths, for training and evaluation: Pyro validation on the first step only, the
    lean ELBO and importance weights (fused log-densities, no trace objects), recorded and
    replayed as graphs of tensor ops for models that opt in. The same loss and gradients as the
    programs run by Pyro (tests/test_fast_paths.py), refused wherever they could differ.
    --no-fast runs Pyro's Trace_ELBO with its validation at every step and no recording:
    slower (about 1.4x per step at batch 128 on a CPU), for debugging a new model."""
    model: ModelConfig = field(default_factory=VAEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.name is not None:
            check(
                self.name not in ("", ".", "..")
                and Path(self.name).name == self.name
                and "\0" not in self.name,
                "--name",
                "one folder name (no '/', not '.' or '..'); --runs-dir says where it goes",
                self.name,
            )
        self.model.check_data(self.data.binarization)  # e.g. Bernoulli needs binarized pixels


DEFAULT_INPUT = (784, 1)  # (x_dim, channels) of an image model config left at its defaults


def shaped_for(cfg: RunConfig, shape: tuple[int, int, int], source: Path | str) -> RunConfig:
    """``cfg`` with an image model left at the default input (784 values, 1 channel) given the
    data's: x_dim = C·H·W and its channels. Flags given for another shape are left as they are
    (:func:`check_fits` then names them); --model.channels must match the data's."""
    model = cfg.model
    if not hasattr(model, "x_dim"):
        return cfg
    x_dim, channels = math.prod(shape), shape[0]
    current = (model.x_dim, getattr(model, "channels", 1))
    if current == DEFAULT_INPUT and (x_dim, channels) != DEFAULT_INPUT:
        side = f"{shape[1]}x{shape[2]}"
        try:
            return replace(cfg, model=replace(model, x_dim=x_dim, channels=channels))
        except ConfigError as err:
            raise ConfigError(f"{source}: {side} images with {channels} channel(s) do not fit "
                              f"this model ({err})") from None  # fmt: skip
    if hasattr(model, "channels") and model.channels != channels and model.x_dim == x_dim:
        raise ConfigError(
            f"--model.channels {model.channels}: the images of {source} have {channels} "
            f"channel(s); pass --model.channels {channels}"
        )
    return cfg


def check_fits(cfg: RunConfig, num_pixels: int, source: Path | str) -> None:
    """The model's input size must be that of the dataset's images."""
    x_dim = getattr(cfg.model, "x_dim", None)
    if x_dim is not None and x_dim != num_pixels:
        raise ConfigError(
            f"--model.x-dim {x_dim}: the images of {source} have {num_pixels} values each; "
            f"pass --model.x-dim {num_pixels} (or data of {x_dim} values per image)"
        )


def burda_epochs(stages: int = 8) -> int:
    return sum(3**i for i in range(stages))


PRESETS: dict[str, RunConfig] = {
    "default": RunConfig(),
    # Pyro's examples/vae/vae.py: 784-400-50 softplus, batch 256, Adam 1e-3, 101 epochs.
    "pyro-example": RunConfig(
        model=VAEConfig(z_dim=50, hidden=(400,), activation="softplus"),
        train=TrainConfig(epochs=101, batch_size=256, lr=1e-3),
    ),
    # Burda, Grosse & Salakhutdinov (2015), one stochastic layer: 784-200-200-50 tanh, batch 20,
    # Adam(eps=1e-4) with 8 stages of 3^i epochs at 1e-3·10^(-i/7): 3280 epochs in all.
    "burda-1l": RunConfig(
        model=VAEConfig(z_dim=50, hidden=(200, 200), activation="tanh"),
        train=TrainConfig(
            epochs=burda_epochs(), batch_size=20, lr=1e-3, lr_schedule="burda", adam_eps=1e-4
        ),
    ),
    # Burda et al. (2015), two stochastic layers (the hvae model): 784-200-200-100 to z and
    # 100-100-100-50 to z2, tanh, with the schedule of burda-1l.
    "burda-2l": RunConfig(
        model=HVAEConfig(
            z_dim=100, z2_dim=50, hidden=(200, 200), hidden2=(100, 100), activation="tanh"
        ),
        train=TrainConfig(
            epochs=burda_epochs(), batch_size=20, lr=1e-3, lr_schedule="burda", adam_eps=1e-4
        ),
    ),
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def with_model(cfg: RunConfig, kind: str) -> RunConfig:
    """``cfg`` with its model switched to ``kind`` (kept as is when it is already that kind)."""
    return cfg if cfg.model.kind == kind else replace(cfg, model=config_class(kind)())


# ----------------------------------------------------------------------------- (de)serialization


def to_dict(cfg: Any) -> Any:
    """A JSON-ready dict of a config; model configs carry their ``kind``."""
    if dataclasses.is_dataclass(cfg):
        out = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        if isinstance(cfg, ModelConfig):
            out = {"kind": cfg.kind, **out}
        return out
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Rebuild a config written by :func:`to_dict`; unknown keys, values of the wrong type and
    values outside a field's choices are a :class:`ConfigError` naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected an object, got {_shown(data)}")
    if issubclass(cls, ModelConfig):
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        try:
            cls = config_class(kind)
        except (KeyError, ConfigError, TypeError):
            found = f"unknown model {_shown(kind)}" if kind != "" else "missing"
            raise ConfigError(f"{where}kind: {found}; one of {', '.join(REGISTRY)}") from None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(
            f"{where.rstrip('.') or cls.__name__}: unknown field(s) {sorted(map(str, unknown))} "
            f"of {cls.__name__}"
        )
    values = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    return cls(**values)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(tp, value, where)
    wrong = ConfigError(f"{where}: {_shown(value)} is not {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{where}: {_shown(value)} is not one of {choices}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise wrong
        (item, *_) = typing.get_args(tp)
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, f"{where}.")
    if tp is Path:
        if not isinstance(value, str) or not value or "\0" in value:
            raise wrong
        return Path(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise wrong
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the range of floats
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: must be a finite number (got {_shown(value)})")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    return value


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return "a list"
    return {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a string",
        Path: "a path",
    }.get(tp, getattr(tp, "__name__", str(tp)))
