"""--train.precision: bf16 autocast for the networks with float32 densities, sums and VQ
statistics; tf32's settings put back; bf16 refused where it cannot reach the networks.

bf16 keeps 8 bits of mantissa (a relative rounding of 2^-9 per value); a matmul's output sums
many rounded products whose errors mostly cancel. The tolerances below are a few times what
was observed on this machine (stated at each), far below what a wrong dtype anywhere in the
loss would give (a float32 sum done in bf16 is off by ~1e-3 relative per addition).
"""

from __future__ import annotations

from dataclasses import replace

import pyro
import pytest
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ppl_vae import runs
from ppl_vae.cli import main
from ppl_vae.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from ppl_vae.errors import ConfigError
from ppl_vae.inference.objectives import ObjectiveConfig, loss_module
from ppl_vae.inference.recording import record
from ppl_vae.models import AEConfig, LinearGaussianConfig, VAEConfig, VQVAEConfig, build
from ppl_vae.train import check_precision, fit, precision

MODELS = {
    "vae-mlp": VAEConfig(z_dim=16, hidden=(256,)),
    "vae-conv": VAEConfig(z_dim=16, arch="conv", conv_channels=(8, 16)),
    "ae": AEConfig(z_dim=16, hidden=(256,)),
    "vqvae": VQVAEConfig(),
    "vqvae-ema": VQVAEConfig(ema=True),
}


def images(n: int = 64) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, 784), 0.3), generator=torch.Generator().manual_seed(3))


def loss_and_grads(model, loss_fn, x, name):
    torch.manual_seed(1)  # the same ε for both precisions
    with precision(model, name):
        loss = loss_fn(x)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), [(g, p) for g, p in zip(grads, params, strict=True) if g is not None]


@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_loss_and_gradients_match_fp32_on_the_same_draws(kind):
    """Observed: loss ≤ 2.2e-4 relative (conv VAE), gradients ≤ 2.7 % (norm of the difference
    over the norm; VQ-VAE encoder); tolerance 1e-3 and 5 %. The VQ-VAE's codebook gradient is
    held to 25 % (observed 8 %): bf16 encoder outputs move a few grid positions to another
    nearest code, and each such flip moves a whole code's gradient."""
    torch.manual_seed(0)
    model = build(MODELS[kind])
    model.train()
    loss_fn = loss_module(model, ObjectiveConfig("trace"), True)
    x = images()
    loss32, grads32 = loss_and_grads(model, loss_fn, x, "fp32")
    loss16, grads16 = loss_and_grads(model, loss_fn, x, "bf16")
    assert loss16.dtype == torch.float32
    assert loss16 != loss32  # bf16 really ran
    assert abs(loss16 - loss32) / abs(loss32) < 1e-3
    assert len(grads16) == len(grads32)
    codebook = getattr(getattr(model, "quantizer", None), "codebook", None)
    for (g16, p), (g32, _) in zip(grads16, grads32, strict=True):
        assert g16.dtype == p.dtype == torch.float32
        tolerance = 0.25 if p is codebook else 0.05
        assert (g16 - g32).norm() <= tolerance * g32.norm() + 1e-6


@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_sites_and_statistics_stay_float32(kind):
    """Every sample site's value and log-density, the VQ-VAE's aux loss and EMA buffers are
    float32 under bf16, while the networks' matmuls ran in bf16 (seen by a dispatch probe)."""
    torch.manual_seed(0)
    model = build(MODELS[kind])
    model.train()
    x = images()
    seen = []

    class Probe(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.nn.functional.linear, torch.nn.functional.conv2d):
                seen.append(out.dtype)
            return out

    with precision(model, "bf16"), Probe():
        guide = poutine.trace(model.guide).get_trace(x)
        trace = poutine.trace(poutine.replay(model.model, trace=guide)).get_trace(x)
    assert seen and set(seen) == {torch.bfloat16}
    for tr in (guide, trace):
        tr.compute_log_prob()
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not site_is_subsample(site):
                assert site["value"].dtype == torch.float32, name
                assert site["log_prob"].dtype == torch.float32, name
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
    assert not hasattr(model, "autocast") or model.autocast is None  # put back after the block


def test_bf16_recorded_loss_replays_and_equals_the_program():
    """The recorded fast path records the casts that autocast made inside ``network``; its
    replay gives exactly the loss and gradients of the bf16 program run as written."""
    torch.manual_seed(0)
    model = build(MODELS["vae-mlp"])
    lean = loss_module(model, ObjectiveConfig("trace"), True)
    recorded = record(lean, model)
    x = images()
    with pyro.validation_enabled(False):  # as training's steps after the first
        for _ in range(3):  # recorded on the second call, replayed from then on
            replayed = loss_and_grads(model, recorded, x, "bf16")
        assert recorded.replays >= 1 and not recorded.refused
        direct = loss_and_grads(model, lean, x, "bf16")
        fp32 = loss_and_grads(model, recorded, x, "fp32")  # the fp32 program: another graph
    assert torch.equal(replayed[0], direct[0])
    for (a, _), (b, _) in zip(replayed[1], direct[1], strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(fp32[0], direct[0])


def test_tf32_settings_are_put_back():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    model = build(MODELS["vae-mlp"])
    with precision(model, "tf32"):
        now = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
        assert now in ("tf32", True)
    after = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    assert after == before


def test_bf16_is_refused_for_a_model_without_networks_through_network(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--train.precision bf16"):
        check_precision(build(LinearGaussianConfig()), "bf16")
    check_precision(build(LinearGaussianConfig()), "tf32")
    rc = main(["train", "linear", "--train.precision", "bf16", "--runs-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--train.precision bf16" in err[0]
    assert not (tmp_path / "r").exists()


def small(tmp_path, name, model, precision_name, epochs=3) -> RunConfig:
    return RunConfig(
        name=name,
        runs_dir=tmp_path,
        model=model,
        data=DataConfig(train_subset=5000),
        train=TrainConfig(
            epochs=epochs, batch_size=100, device="cpu", progress=False, precision=precision_name
        ),
        eval=EvalConfig(k=20, batch_size=1000, particle_chunk=20),
    )


@pytest.mark.parametrize("kind", ["vae-mlp", "vqvae"])
def test_bf16_training_reaches_fp32s_validation_neg_elbo(tmp_path, fashion, kind, single_thread):
    """Three epochs on 5,000 real Fashion-MNIST images from the same seed: the validation
    -ELBO (measured in fp32) of the bf16 run is within 0.5 % of the fp32 run's, and in both
    it fell by more than 20 nats from epoch 1 to epoch 3. Observed: VAE 289.91 (fp32) against
    289.94 (bf16), a 31.7-nat fall; VQ-VAE 528.08 against 527.84, a 64.7-nat fall."""
    model = MODELS[kind]
    if kind == "vqvae":
        model = replace(model, code_prior=replace(model.code_prior, epochs=0))
    vals = {}
    for name in ("fp32", "bf16"):
        run_dir = fit(small(tmp_path, name, model, name), dataset=fashion)
        rows = runs.read_metrics(run_dir)
        assert rows[-1]["val_neg_elbo"] < rows[0]["val_neg_elbo"] - 20
        vals[name] = rows[-1]["val_neg_elbo"]
    assert vals["bf16"] != vals["fp32"]
    assert abs(vals["bf16"] - vals["fp32"]) < 0.005 * vals["fp32"], vals
