"""Every entry point smoke-run in a subprocess with tiny arguments, and its user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from ppl_vae.cli import parse_train


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("cli-runs")
    result = run_cli(
        "train", "vae", "--name", "tiny", "--runs-dir", str(runs_dir),
        "--model.z-dim", "4", "--model.hidden", "64", "--data.train-subset", "500",
        "--train.epochs", "1", "--train.device", "cpu", "--objective", "meanfield",
        "--eval.k", "4", "--eval.batch-size", "2500",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return runs_dir / "tiny", result


def test_train_writes_the_run_folder_and_prints_results(cli_run):
    run_dir, result = cli_run
    expected = {"config.json", "metrics.csv", "checkpoint.pt", "samples.png",
                "reconstructions.png", "report.md", "eval.json", "curves.png"}  # fmt: skip
    assert expected <= {p.name for p in run_dir.iterdir()}
    assert f"run folder: {run_dir}" in result.stdout
    assert "importance-sampled -log p(x)" in result.stdout and "(k=4)" in result.stdout
    cfg = json.loads((run_dir / "config.json").read_text())
    given = {"kind": "vae", "z_dim": 4, "hidden": [64], "activation": "softplus", "x_dim": 784}
    assert {k: cfg["model"][k] for k in given} == given
    assert cfg["model"]["likelihood"] == "bernoulli"  # the defaults of the other options
    assert cfg["objective"]["name"] == "meanfield"
    assert "Results on the test set" in (run_dir / "report.md").read_text()
    assert "Traceback" not in result.stderr


def test_evaluate_sample_and_report_rebuild_from_the_run_folder(cli_run, tmp_path):
    run_dir, _ = cli_run
    result = run_cli("evaluate", str(run_dir), "--k", "3", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "eval.json").read_text())["k"] == 3
    out = tmp_path / "grid.png"
    result = run_cli("sample", str(run_dir), "-n", "6", "-o", str(out), "--nrow", "3")
    assert result.returncode == 0, result.stderr
    from PIL import Image

    width, height = Image.open(out).size
    assert (width, height) == (3 * 30 + 2, 2 * 30 + 2)  # 28 px images, 2 px padding
    result = run_cli("report", str(run_dir))
    assert result.returncode == 0 and "report.md" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "--data.data-dir", "/no/such/dir"],
            "--data.data-dir /no/such/dir: no such directory",
        ),
        (["train", "--train.epochs", "0"], "--train.epochs must be a positive integer (got 0)"),
        (["train", "--train.lr", "abc"], "argument --train.lr: 'abc' is not a number"),
        (["train", "--model.activation", "swish"], "argument --model.activation: invalid choice"),
        (["train", "--resume", "/no/run", "--model.z-dim", "3"], "--resume uses the saved config"),
        (["evaluate", "/no/run"], "/no/run/config.json: not found"),
        (["sample", "/no/run", "-n", "0"], "argument -n: must be a positive integer"),
        (["frobnicate"], "unknown command 'frobnicate'"),
        (["train", "--dataset", "mnist"], "did you mean --data.dataset?"),
        (["train", "--epochs", "3", "--data-dir", "d"], "mean --train.epochs, --data.data-dir?"),
        (["train", "ae", "--no-prior"], "did you mean --no-model.prior?"),
        (["train", "mnist"], "unknown model 'mnist'; choose one of vae, ae, vqvae"),
        (["train", "--model.z-dim", "4", "vqvae"], "unrecognized arguments: vqvae"),
        (["train", "vae", "--resume", "r"], "saved config; drop --runs-dir, the model vae"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, message, tmp_path):
    result = run_cli(*args, "--runs-dir", str(tmp_path)) if args[0] == "train" else run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_empty_data_dir_names_the_directory(tmp_path):
    runs_dir = tmp_path / "runs"
    result = run_cli("train", "--data.data-dir", str(tmp_path), "--runs-dir", str(runs_dir))
    assert result.returncode == 2
    assert f"--data.data-dir {tmp_path}: does not contain the four IDX files" in result.stderr
    assert not runs_dir.exists()


@pytest.mark.parametrize("command", ["train", "evaluate", "diagnose", "sample", "report"])
def test_help_explains_every_option(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "usage: ppl-vae " + command in result.stdout
    if command == "train":
        flags = ["--model.z-dim", "--train.epochs", "--data.data-dir", "--objective.num-particles"]
        for flag in [*flags, "--preset", "--resume", "pyro-example", "burda-1l"]:
            assert flag in result.stdout
        assert "Dimension of the latent z. (default: 32)" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("argv", "kind", "field", "value"),
    [
        (["--name", "ae"], "vae", "name", "ae"),  # a flag's value is never the model
        (["--runs-dir", "vqvae"], "vae", "runs_dir", Path("vqvae")),
        (["vqvae", "--model.ema"], "vqvae", "fast", True),
        (["ae", "--no-fast", "--name", "vae"], "ae", "fast", False),
        (["--preset", "pyro-example", "--name", "linear"], "vae", "name", "linear"),
    ],
)
def test_the_model_is_the_first_argument_only(argv, kind, field, value):
    cfg, resume, _ = parse_train(argv)
    assert resume is None and cfg.model.kind == kind and getattr(cfg, field) == value


def test_preset_sets_defaults_that_flags_override():
    result = run_cli("train", "--preset", "pyro-example", "--help")
    text = " ".join(result.stdout.split())
    assert "(default: 50)" in text and "(default: 400)" in text and "(default: 256)" in text
