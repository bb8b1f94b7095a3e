"""Every registered model (and the main variants of each): the model/guide contract, a finite
loss, a training step that moves the parameters, and a save/load round trip."""

from __future__ import annotations

import math
from dataclasses import replace

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from ppl_vae import metrics
from ppl_vae.config import DataConfig, ObjectiveConfig, RunConfig, from_dict, to_dict
from ppl_vae.errors import ConfigError
from ppl_vae.inference.objectives import loss_module
from ppl_vae.models import REGISTRY, VAEConfig, build, default_config
from ppl_vae.models.capabilities import TrainingHooks
from ppl_vae.models.common import ImageModel

# (kind, overrides, inputs) — the registry's defaults plus the variants worth a check; inputs
# are binary pixels, values in [0, 1) (intensities, dequantized values) or 8-bit values k/255.
VARIANTS = [(kind, {}, "binary") for kind in REGISTRY] + [
    ("vae", {"arch": "conv"}, "binary"),
    ("vae", {"likelihood": "continuous-bernoulli"}, "unit"),
    ("vae", {"likelihood": "gaussian", "x_scale_mode": "pixel"}, "unit"),
    ("vae", {"likelihood": "gaussian", "x_scale_mode": "shared", "arch": "conv"}, "unit"),
    ("vae", {"arch": "conv", "x_dim": 3 * 32 * 32, "channels": 3}, "binary"),
    ("vae", {"likelihood": "discretized-logistic"}, "8bit"),
    ("vae", {"likelihood": "discretized-logistic", "logistic_mixtures": 3, "arch": "conv",
             "x_dim": 3 * 32 * 32, "channels": 3}, "8bit"),  # fmt: skip
    ("ae", {"prior": False, "arch": "conv"}, "binary"),
    ("ae", {"likelihood": "discretized-logistic", "logistic_mixtures": 2}, "8bit"),
    ("vqvae", {"ema": True}, "binary"),
    ("vqvae", {"x_dim": 3 * 32 * 32, "channels": 3, "codebook_size": 16}, "binary"),
    ("vqvae", {"likelihood": "discretized-logistic", "logistic_mixtures": 2}, "8bit"),
    ("vae", {"prior": "mog", "prior_components": 3}, "binary"),
    ("vae", {"prior": "vamp", "prior_components": 3, "arch": "conv"}, "binary"),
    ("flow", {"guide_flow": "coupling", "flow_steps": 3, "prior": "mog"}, "binary"),
]
IDS = [f"{k}-" + "-".join(f"{a}={b}" for a, b in o.items()) for k, o, _ in VARIANTS]
BATCH = 6


@pytest.fixture(params=VARIANTS, ids=IDS)
def variant(request):
    kind, overrides, inputs = request.param
    model = build(default_config(kind, **overrides))
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(BATCH, model.config.x_dim, generator=gen)
    if inputs == "binary":
        x = torch.bernoulli(x, generator=gen)
    elif inputs == "8bit":
        x = (x * 255).round() / 255
    return model, x


def latent_sites(trace) -> dict:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and type(site["fn"]).__name__ != "_Subsample"  # the plate's own node
    }


def test_model_and_guide_agree_on_sites_and_shapes(variant, seed):
    model, x = variant
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    sites = set(latent_sites(guide_trace))  # "z", and "z2" for two stochastic layers
    assert sites == set(latent_sites(model_trace)) and "z" in sites
    assert model_trace.nodes["x"]["is_observed"]
    for name in sites:
        assert model_trace.nodes[name]["value"] is guide_trace.nodes[name]["value"]
    for trace in (guide_trace, model_trace):
        trace.compute_log_prob()
        for name in sites:
            assert trace.nodes[name]["log_prob"].shape == (BATCH,)
            assert trace.nodes[name]["cond_indep_stack"][0].name == "data"
    assert model_trace.nodes["x"]["log_prob"].shape == (BATCH,)
    assert model.encode(x).shape[0] == BATCH
    assert model.reconstruct(x).shape == x.shape
    samples = model.sample(3)
    assert samples.shape == (3, x.shape[1])
    if isinstance(model, ImageModel):  # image likelihoods have means in [0, 1]; pPCA's do not
        assert samples.min() >= 0 and samples.max() <= 1


@pytest.mark.parametrize("objective", ["trace", "meanfield"])
@pytest.mark.parametrize("particles", [1, 3])
def test_loss_is_finite(variant, seed, objective, particles):
    """Finite, or, for meanfield where a latent site has no closed-form KL (a flow guide, a
    mixture prior) or the guide is not mean-field (two stochastic layers), refused in one line
    naming the objective that works."""
    model, x = variant
    loss_fn = loss_module(model, ObjectiveConfig(objective, particles))
    facts = metrics.ProgramFacts.of(model, x)
    if objective == "meanfield" and not (facts.analytic_kl and facts.mean_field):
        with pytest.raises(ConfigError, match="use --objective trace"):
            loss_fn(x)
        return
    loss = loss_fn(x)
    assert loss.shape == () and torch.isfinite(loss)


def test_one_step_changes_parameters(variant, seed):
    """The module interface with a torch optimizer, as train.fit drives it."""
    model, x = variant
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = loss_module(model, ObjectiveConfig())(x)
    (loss / BATCH).backward()
    optimizer.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    # everything but the code prior (fitted after SVI, on codes) takes part in the loss
    expected = {k for k in before if not k.startswith("code_prior.")}
    assert changed == expected


def test_pyro_svi_step_works(variant, seed):
    """``pyro.infer.SVI`` with a Pyro optimizer trains the same pair (registered modules)."""
    model, x = variant
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert math.isfinite(svi.step(x))
    assert any(not torch.equal(v, before[k]) for k, v in model.named_parameters())


def test_save_load_round_trip(variant, seed, tmp_path):
    model, x = variant
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    (loss_module(model, ObjectiveConfig())(x) / BATCH).backward()  # move off the init
    optimizer.step()
    path = tmp_path / "checkpoint.pt"
    torch.save({"config": to_dict(model.config), "model": model.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    config = from_dict(type(model.config), saved["config"])
    assert config == model.config
    rebuilt = build(config)
    rebuilt.load_state_dict(saved["model"])
    model.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt.reconstruct(x), model.reconstruct(x))
    losses = []
    for m in (model, rebuilt):
        pyro.set_rng_seed(3)
        losses.append(loss_module(m, ObjectiveConfig())(x).item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


# ----------------------------------------------------------------------------- β and warm-up


def test_kl_weight_schedule():
    cfg = VAEConfig(beta=2.0, warmup_steps=100, warmup_start=0.1)
    assert cfg.kl_weight(0) == pytest.approx(0.2)
    assert cfg.kl_weight(50) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert cfg.kl_weight(100) == cfg.kl_weight(10_000) == pytest.approx(2.0)
    assert VAEConfig(beta=0.5).kl_weight(0) == 0.5


def test_kl_weight_scales_exactly_the_kl_term(seed):
    """Under TraceMeanField_ELBO (analytic KL) with the same z draw, the training loss at
    weight w minus the eval loss (weight 1) is (w − 1) · Σ KL(q(z|x) || p(z)): an exact check."""
    model = build(VAEConfig(z_dim=4, hidden=(16,), warmup_steps=10, warmup_start=0.2))
    x = torch.bernoulli(torch.full((5, 784), 0.3))
    loss_fn = TraceMeanField_ELBO()(model.model, model.guide)
    model.train()
    model.on_train_step(5)
    w = model.kl_weight
    assert w == pytest.approx(0.2 + 0.8 * 0.5)
    pyro.set_rng_seed(7)
    train_loss = loss_fn(x)
    model.eval()
    assert model.kl_weight == 1.0
    pyro.set_rng_seed(7)
    eval_loss = loss_fn(x)
    z_loc, z_scale = model.encoder(x)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(z_loc, z_scale), torch.distributions.Normal(0.0, 1.0)
    ).sum()
    torch.testing.assert_close(train_loss - eval_loss, (w - 1) * kl)


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("model_cfg", "binarization", "flag"),
    [
        (VAEConfig(likelihood="gaussian"), "dynamic", "--data.binarization"),
        (VAEConfig(likelihood="continuous-bernoulli"), "static", "--data.binarization"),
        (VAEConfig(), "none", "--data.binarization"),
        (default_config("vqvae"), "none", "--data.binarization"),
        (default_config("ae", likelihood="gaussian"), "dynamic", "--data.binarization"),
        (VAEConfig(), "dequantize", "--data.binarization"),
        (VAEConfig(likelihood="discretized-logistic"), "dequantize", "--data.binarization"),
        (default_config("vqvae", likelihood="discretized-logistic"), "static",
         "--data.binarization"),  # fmt: skip
    ],
)
def test_likelihood_and_data_must_match(model_cfg, binarization, flag):
    with pytest.raises(ConfigError, match=flag):
        RunConfig(model=model_cfg, data=DataConfig(binarization=binarization))


def test_valid_combinations_pass():
    RunConfig(model=VAEConfig(likelihood="gaussian"), data=DataConfig(binarization="none"))
    RunConfig(model=VAEConfig(), data=DataConfig(binarization="static"))
    for likelihood, mode in [("gaussian", "dequantize"), ("continuous-bernoulli", "dequantize"),
                             ("discretized-logistic", "none")]:  # fmt: skip
        RunConfig(model=VAEConfig(likelihood=likelihood), data=DataConfig(binarization=mode))


@pytest.mark.parametrize(
    ("kind", "overrides", "flag"),
    [
        ("vae", {"x_scale_mode": "pixel"}, "--model.x-scale-mode"),
        ("vae", {"arch": "conv", "x_dim": 700}, "--model.x-dim"),
        ("vae", {"arch": "conv", "conv_channels": (8, 8, 8)}, "--model.x-dim"),
        ("vae", {"warmup_start": 0.0}, "--model.warmup-start"),
        ("vae", {"beta": 0.0}, "--model.beta"),
        ("vqvae", {"x_dim": 3 * 30 * 30, "channels": 3}, "--model.x-dim"),
        ("vqvae", {"ema_decay": 1.0}, "--model.ema-decay"),
        ("vqvae", {"codebook_size": 1}, "--model.codebook-size"),
        ("ae", {"z_dim": 0}, "--model.z-dim"),
        ("vae", {"likelihood": "discretized-logistic", "logistic_mixtures": 0},
         "--model.logistic-mixtures"),  # fmt: skip
        ("vae", {"likelihood": "gaussian", "logistic_mixtures": 3}, "--model.logistic-mixtures"),
    ],
)
def test_invalid_model_options_name_the_flag(kind, overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        default_config(kind, **overrides)


def test_models_never_mutate_their_configs(variant, seed):
    model, x = variant
    before = to_dict(model.config)
    model.train()
    hooks = isinstance(model, TrainingHooks)
    if hooks:
        model.on_train_step(1000)
    loss_module(model, ObjectiveConfig())(x)
    if hooks:
        model.epoch_metrics()
    assert to_dict(model.config) == before
    assert replace(model.config) == model.config
