"""``ppl-vae``: parsing only. Flags are generated from the config dataclasses in
:mod:`ppl_vae.config` (``--train.epochs``, ``--model.z-dim``, ...), with their attribute
docstrings as help. A user error prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import math
import sys
import textwrap
import types
import typing
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from ppl_vae import (
    data,
    diagnostics,
    distributed,
    evaluate,
    files,
    models,
    plots,
    report,
    runs,
    train,
)
from ppl_vae.config import PRESETS, EvalConfig, RunConfig, preset, with_model
from ppl_vae.distributed import seeded, world
from ppl_vae.errors import ConfigError, UserError
from ppl_vae.metrics import format_results

PROG = "ppl-vae"


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``ppl-vae train: error: ... (see --help)``, exit code 2.

    An unknown flag that is the tail of a real one (``--epochs`` for ``--train.epochs``) or
    close to one gets a "did you mean" naming it; one that is an option of other models
    (:attr:`elsewhere`: ``--model.guide-flow`` → ``flow``) says which. Flags are never
    abbreviated.
    """

    def __init__(self, *args, elsewhere: dict[str, list[str]] | None = None, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.elsewhere = elsewhere or {}

    def error(self, message: str) -> typing.NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            unknown = message[len(prefix) :].split()
            flags = [a.split("=", 1)[0] for a in unknown if a.startswith("--")]
            kinds = [f"{f} is an option of {PROG} train " + " or ".join(self.elsewhere[f])
                     for f in flags if f in self.elsewhere]  # fmt: skip
            hints = [h for h in (self.suggest(f) for f in flags if f not in self.elsewhere) if h]
            if kinds:
                message += "; " + "; ".join(kinds)
            if hints:
                message += "; did you mean " + ", ".join(hints) + "?"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def suggest(self, flag: str) -> str | None:
        """The real flag(s) ``flag`` most likely means: same last component, else close."""
        flag = flag.split("=", 1)[0]
        options = [o for o in self._option_string_actions if o.startswith("--")]

        def tail(option: str) -> str:
            negated = option.startswith("--no-")
            last = option.removeprefix("--no-" if negated else "--").split(".")[-1]
            return ("--no-" if negated else "--") + last

        same_tail = [o for o in options if "." in o and tail(o) == flag]
        if same_tail:
            return " or ".join(same_tail)
        close = difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
        return close[0] if close else None


# ----------------------------------------------------------------------------- dataclass → flags


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right below a field) of ``cls`` and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _argument_spec(tp: Any) -> dict[str, Any]:
    """argparse keyword arguments for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _argument_spec(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        return {"choices": choices, "type": type(choices[0])}
    if origin is tuple:
        return {"nargs": "+", "type": typing.get_args(tp)[0], "metavar": "N"}
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if tp is float:
        return {"type": finite_float, "metavar": "FLOAT"}
    return {"type": tp, "metavar": tp.__name__.upper()}


def finite_float(text: str) -> float:
    """A flag's number: nan and ±inf are refused here, with the flag named by argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number (got {text})")
    return value


def add_config_flags(parser: argparse.ArgumentParser, default: Any, prefix: str = "") -> None:
    """One flag per leaf field of the dataclass instance ``default`` (nested ones get a prefix)."""
    cls = type(default)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    group = parser.add_argument_group(f"{prefix.rstrip('.') or 'run'} options")
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            add_config_flags(parser, value, f"{prefix}{f.name}.")
            continue
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
        text = f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%")  # argparse formats
        group.add_argument(
            f"--{prefix}{f.name}".replace("_", "-"),
            dest=f"{prefix}{f.name}",
            default=argparse.SUPPRESS,
            help=text,
            **_argument_spec(hints[f.name]),
        )


def apply_flags(default: Any, flags: dict[str, Any]) -> Any:
    """``default`` with the dotted ``flags`` (``{"train.epochs": 3}``) replaced, validated anew."""
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flags.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            changes[head] = tuple(value) if isinstance(value, list) else value
    for head, sub in nested.items():
        changes[head] = apply_flags(getattr(default, head), sub)
    return replace(default, **changes) if changes else default


# ----------------------------------------------------------------------------- commands


def parse_train(argv: list[str]) -> tuple[RunConfig | None, Path | None, int | None]:
    """``ppl-vae train`` arguments → ``(config, None, None)`` for a new run, or
    ``(None, RUN_DIR, epochs)`` to resume one. Exits with code 2 on a bad argument."""
    kinds = list(models.REGISTRY)
    # The model kind is the first argument, a subcommand (`ppl-vae train vqvae --model.ema`),
    # never read out of another flag's value; the flags depend on it and on the preset.
    kind = None
    if argv and not argv[0].startswith("-"):
        kind, argv = argv[0], argv[1:]
        if kind not in kinds:
            raise UserError(
                f"unknown model {kind!r}; choose one of {', '.join(kinds)} "
                "(the model is the first argument: ppl-vae train KIND [options])"
            )
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--preset", default="default")
    preset_name = early.parse_known_args(argv)[0].preset
    base = preset(preset_name) if preset_name in PRESETS else RunConfig()
    if kind:
        base = with_model(base, kind)

    parser = Parser(
        elsewhere=model_flags_elsewhere(base.model.kind),
        prog=f"{PROG} train" + (f" {kind}" if kind else ""),
        usage=f"{PROG} train {kind or '[KIND]'} [options]",
        description="Train a model with SVI and write its run folder "
        "(config.json, metrics.csv, checkpoint.pt, figures, eval.json, report.md). "
        f"KIND, the first argument, is the model: {', '.join(kinds)} (default: "
        f"{base.model.kind}); `ppl-vae train KIND --help` lists its options.",
        epilog="Example: ppl-vae train vae --model.z-dim 16 --train.epochs 5 --objective meanfield",
    )
    parser.add_argument(
        "--preset",
        default="default",
        choices=list(PRESETS),
        help="named defaults that the other flags then override (default: default)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue a run from its last finished epoch with its saved config "
        "(only --train.epochs may change)",
    )
    parser.add_argument(
        "--objective",
        dest="objective.name",
        default=argparse.SUPPRESS,
        choices=typing.get_args(typing.get_type_hints(type(base.objective))["name"]),
        help="shorthand for --objective.name",
    )
    add_config_flags(parser, base)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if "." in k or k in _RUN_KEYS}
    if args.resume is None:
        return apply_flags(base, flags), None, None
    extra = [f"--{k}".replace("_", "-") for k in sorted(set(flags) - {"train.epochs"})]
    extra += [f"--preset {args.preset}"] if args.preset != "default" or "--preset" in argv else []
    extra += [f"the model {kind}"] if kind else []
    if extra:
        parser.error(f"--resume uses the saved config; drop {', '.join(extra)}")
    return None, args.resume, flags.get("train.epochs")


def model_flags_elsewhere(kind: str) -> dict[str, list[str]]:
    """``--model.*`` flags of the other registered models that ``kind`` does not have → those
    models, for the error of a flag given to the wrong one."""
    def flags(cls: type) -> set[str]:
        names = {f"--model.{f.name}".replace("_", "-") for f in dataclasses.fields(cls)}
        return names | {name.replace("--", "--no-", 1) for name in names}

    own = flags(models.config_class(kind))
    out: dict[str, list[str]] = {}
    for other, (cls, _) in models.REGISTRY.items():
        for flag in sorted(flags(cls) - own):
            out.setdefault(flag, []).append(other)
    return out


def cmd_train(argv: list[str]) -> int:
    cfg, resume, epochs = parse_train(argv)
    run_dir = train.fit(cfg) if resume is None else train.fit(resume=resume, epochs=epochs)
    device = runs.read_config(run_dir).train.device
    results = evaluate.evaluate_run(run_dir, device=device)
    report.build_report(run_dir, device=device)
    if world().main:
        print(f"run folder: {run_dir}")
        print("\n".join(format_results(results)))
    return 0


_RUN_KEYS = {  # the run's own fields (--name, --runs-dir, --fast), not the nested configs
    f.name for f in dataclasses.fields(RunConfig) if not dataclasses.is_dataclass(f.default_factory)
}


def _add_fast_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the fast paths (same numbers; see ppl-vae train --help); default: the run's",
    )


def cmd_evaluate(argv: list[str]) -> int:
    parser = Parser(
        prog=f"{PROG} evaluate",
        description="Evaluate a run folder: -ELBO and importance-sampled -log p(x) on the test "
        "set, written to RUN_DIR/eval.json.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by train")
    parser.add_argument("--split", choices=["test", "val"], default="test", help="(default: test)")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=0,
        metavar="N",
        help="evaluate the first N images of the split only (default: 0, all)",
    )
    parser.add_argument(
        "--reference-vae",
        type=Path,
        metavar="RUN_DIR",
        help="a VAE run folder under which -log p of this model's samples is estimated "
        "(e.g. for an AE, which has no likelihood of its own)",
    )
    _add_fast_flag(parser)
    defaults = EvalConfig()
    docs = field_docs(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        shown = f"the run's, else {getattr(defaults, f.name)}"
        default = evaluate.EVALUATE_K if f.name == "k" else shown
        parser.add_argument(
            f"--{f.name}".replace("_", "-"),
            type=int,
            default=None,
            help=f"{docs[f.name]} (default: {default})",
        )
    args = parser.parse_args(argv)
    if args.images < 0:
        parser.error(f"argument --images: must be >= 0 (got {args.images})")
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(EvalConfig)
        if getattr(args, f.name) is not None
    }
    try:  # the flags first, named as given here (--k, not train's --eval.k)
        replace(EvalConfig(), **given)
    except ConfigError as err:
        raise ConfigError(str(err).replace("--eval.", "--")) from None
    saved = runs.read_config(args.run_dir).eval
    if args.reference_vae is not None:
        runs.read_config(args.reference_vae)  # a missing folder is a one-line error
    eval_cfg = replace(saved, **{"k": evaluate.EVALUATE_K, **given})
    results = evaluate.evaluate_run(
        args.run_dir,
        eval_cfg,
        split=args.split,
        device=args.device,
        images=args.images,
        reference_dir=args.reference_vae,
        fast=args.fast,
    )
    if world().main:
        print("\n".join(format_results(results)))
        print(f"written: {Path(args.run_dir) / evaluate.EVAL_JSON}")
    return 0


def cmd_diagnose(argv: list[str]) -> int:
    parser = Parser(
        prog=f"{PROG} diagnose",
        description="Diagnose the guide of a run folder on test images: PSIS k-hat of the "
        "importance weights, amortization and approximation gaps, NUTS posteriors against "
        "q(z|x) and q*(z|x). Writes RUN_DIR/diagnostics.json, InferenceData (.nc) and figures.",
        epilog="Example: ppl-vae diagnose runs/vae --images 200 --nuts-images 2",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by train")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)"
    )
    add_config_flags(parser, diagnostics.DiagnoseConfig())
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k not in ("run_dir", "device")}
    cfg = apply_flags(diagnostics.DiagnoseConfig(), flags)
    results = diagnostics.diagnose_run(args.run_dir, cfg, device=args.device)
    if world().main:
        print("\n".join(diagnostics.format_diagnostics(results)))
        print(f"written: {Path(args.run_dir) / diagnostics.DIAGNOSTICS_JSON}")
    return 0


def cmd_sample(argv: list[str]) -> int:
    parser = Parser(
        prog=f"{PROG} sample",
        description="Draw z ~ p(z) and save the mean images of p(x|z) as one PNG grid.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by train")
    parser.add_argument("-n", type=int, default=64, help="number of samples (default: 64)")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("samples.png"),
        help="PNG to write (default: samples.png)",
    )
    parser.add_argument("--nrow", type=int, default=8, help="images per grid row (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)"
    )
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"argument -n: must be a positive integer (got {args.n})")
    if args.nrow < 1:
        parser.error(f"argument --nrow: must be a positive integer (got {args.nrow})")
    output = args.output
    if output.suffix.lower() != ".png":
        parser.error(f"argument -o: {output} must name a .png file (a PNG grid is written)")
    if output.is_dir():
        parser.error(f"argument -o: {output} is a folder; name a .png file in it")
    if not output.parent.is_dir():
        parser.error(f"argument -o: folder {output.parent} does not exist")
    files.check_writable(output.parent, "pass -o with a writable folder")
    cfg, model, _ = runs.load_model(args.run_dir, data.resolve_device(args.device))
    shape = data.image_shape(cfg.data, runs.data_source(args.run_dir))
    with seeded(args.seed), files.Staged(output.parent, "pass -o elsewhere") as stage:
        plots.samples_figure(model, stage.path(output.name), shape, args.n, args.nrow)
    print(f"written: {output}")
    return 0


def cmd_report(argv: list[str]) -> int:
    parser = Parser(
        prog=f"{PROG} report",
        description="Draw the figures of a run folder and assemble RUN_DIR/report.md and a "
        "self-contained RUN_DIR/report.html (images embedded).",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by train")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default: auto)"
    )
    args = parser.parse_args(argv)
    path = report.build_report(args.run_dir, device=args.device)
    print(f"written: {path} and {path.with_suffix('.html')}")
    return 0


def one_line(message: str) -> str:
    return " ".join(message.split())


COMMANDS = {
    "train": (cmd_train, "train a model with SVI and write its run folder"),
    "evaluate": (cmd_evaluate, "test -ELBO and importance-sampled log p(x) of a run folder"),
    "diagnose": (cmd_diagnose, "PSIS k-hat, amortization/approximation gaps, NUTS of a run"),
    "sample": (cmd_sample, "save a grid of prior samples of a run folder"),
    "report": (cmd_report, "draw the figures, write report.md and report.html of a run folder"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            lines = [f"usage: {PROG} COMMAND [options]   ({PROG} COMMAND --help for each)", ""]
            lines += [f"  {name:<9} {doc}" for name, (_, doc) in COMMANDS.items()]
            print("\n".join(lines))
            return 0
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(
            f"{PROG}: error: {what}; choose one of {', '.join(COMMANDS)} (see {PROG} --help)",
            file=sys.stderr,
        )
        return 2
    try:
        with distributed.launched():  # one process, or all those torchrun started
            return COMMANDS[argv[0]][0](argv[1:])
    except UserError as err:
        print(f"{PROG} {argv[0]}: error: {one_line(str(err))}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except OSError as err:  # the user's filesystem (permissions, space), caught where it arose
        if err.errno not in files.USER_ERRNOS:
            raise
        where = err.filename or ""
        reason = files.USER_ERRNOS[err.errno]
        print(f"{PROG} {argv[0]}: error: {where}: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
