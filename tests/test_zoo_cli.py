"""Every model through the command line on tiny fake data: train, then evaluate and sample from
the run folder alone; what each model reports; errors that name the flag."""

from __future__ import annotations

import json
import math

import pytest

from ppl_vae import runs
from ppl_vae.cli import main

TINY = ["--train.epochs", "1", "--train.batch-size", "32", "--eval.k", "4", "--no-train.progress"]
CASES = {
    "ae-map": ("ae", ["--model.z-dim", "4"]),
    "ae-plain-conv": ("ae", ["--no-model.prior", "--model.arch", "conv"]),
    "vae-gaussian-conv-warmup": (
        "vae",
        [
            "--model.arch",
            "conv",
            "--model.likelihood",
            "gaussian",
            "--model.x-scale-mode",
            "pixel",
            "--data.binarization",
            "none",
            "--model.beta",
            "0.5",
            "--model.warmup-steps",
            "3",
        ],
    ),  # fmt: skip
    "vqvae": (
        "vqvae",
        ["--model.codebook-size", "16", "--model.code-dim", "8", "--model.code-prior.epochs", "1"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_train_then_evaluate_and_sample(case, fake_data_dir, tmp_path, capsys):
    kind, flags = CASES[case]
    argv = ["train", kind, "--data.data-dir", str(fake_data_dir), "--runs-dir", str(tmp_path)]
    assert main([*argv, "--name", "run", *TINY, *flags]) == 0
    run_dir = tmp_path / "run"
    cfg = runs.read_config(run_dir)
    assert cfg.model.kind == kind
    saved = json.loads((run_dir / "config.json").read_text())["model"]
    for flag, value in zip(flags[::2], flags[1::2], strict=False):
        if flag.startswith("--model.") and "." not in flag[len("--model.") :]:
            key = flag[len("--model.") :].replace("-", "_")
            assert str(saved[key]) == value, flag
    metrics = runs.read_metrics(run_dir)
    ev = json.loads((run_dir / "eval.json").read_text())
    # the metric table: what applies is there, what does not is absent
    assert ("kl_sum" in ev) == (kind == "vae")  # a factorized Gaussian guide and prior
    assert ("active_units" in ev) == (kind != "vqvae")  # a vector latent
    if kind == "vae":
        assert "nll_is" in ev and "kl_weight" in metrics[0]
        assert metrics[0]["kl_weight"] == pytest.approx(0.5)  # the ramp ended at step 3
    else:
        assert "nll_is" not in ev and ev["notes"]  # no importance sampling for point masses
        assert math.isfinite(ev["recon_nll"])
    if kind == "ae":
        assert "aggregate_kl_to_prior" in ev
    if kind == "vqvae":
        assert {"perplexity", "codebook_usage"} <= set(metrics[0])
        # the exact -ELBO of the point mass, from the program: KL = -log p(z_q) = 49 log K
        assert ev["kl_point_mass"] == pytest.approx(49 * math.log(16), rel=1e-4)
        assert ev["neg_elbo"] == pytest.approx(ev["recon_nll"] + ev["kl_point_mass"])
        assert ev["code_prior_bits_per_position"] > 0 and ev["uniform_bits_per_position"] == 4
        assert ev["code_prior_neg_elbo"] == pytest.approx(ev["recon_nll"] + ev["code_prior_nll"])
        assert 1 <= ev["perplexity"] <= 16
    assert "Results" in (run_dir / "report.md").read_text()
    out = tmp_path / "s.png"
    assert main(["sample", str(run_dir), "-n", "4", "-o", str(out)]) == 0
    assert out.stat().st_size > 0
    if kind == "vqvae":  # the other models' evaluate is covered by train above
        assert main(["evaluate", str(run_dir), "--k", "2"]) == 0
        assert "positions · log K" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["vae", "--model.likelihood", "gaussian"], "--data.binarization"),
        (["vae", "--model.x-scale-mode", "pixel"], "--model.x-scale-mode"),
        (["vqvae", "--data.binarization", "none"], "--data.binarization"),
    ],
)
def test_invalid_combinations_exit_2_naming_the_flag(flags, flag, tmp_path, capsys):
    assert main(["train", *flags, "--runs-dir", str(tmp_path)]) == 2
    assert flag in capsys.readouterr().err
