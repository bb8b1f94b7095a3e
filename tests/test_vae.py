"""The VAE as a model/guide pair: sites, shapes, and both training interfaces."""

from __future__ import annotations

import pyro
import pyro.optim
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine.util import site_is_subsample

from ppl_vae.config import ObjectiveConfig
from ppl_vae.inference.objectives import loss_module
from ppl_vae.models import VAE, VAEConfig


@pytest.fixture
def vae(seed):
    return VAE(VAEConfig(z_dim=4, hidden=(32, 16)))


def is_sample(site) -> bool:
    return site["type"] == "sample" and not site_is_subsample(site)


def binary_batch(n=6, d=784):
    return torch.bernoulli(torch.full((n, d), 0.3))


def test_model_and_guide_share_sites_and_shapes(vae):
    x = binary_batch()
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    guide_sites = {n for n, s in guide_trace.nodes.items() if is_sample(s)}
    model_sites = {n for n, s in model_trace.nodes.items() if is_sample(s)}
    assert guide_sites == {"z"} and model_sites == {"z", "x"}
    assert model_trace.nodes["x"]["is_observed"]
    assert guide_trace.nodes["z"]["value"].shape == (6, 4)
    for trace in (guide_trace, model_trace):
        (frame,) = trace.nodes["z"]["cond_indep_stack"]
        assert frame.name == "data" and frame.size == 6
        assert trace.nodes["z"]["fn"].event_shape == (4,)
    assert model_trace.nodes["x"]["fn"].event_shape == (784,)
    model_trace.compute_log_prob()
    assert model_trace.nodes["x"]["log_prob"].shape == (6,)


def test_vectorized_particles_keep_the_data_plate(vae):
    x = binary_batch()
    loss = loss_module(vae, ObjectiveConfig("trace", num_particles=5))(x)
    assert loss.shape == () and torch.isfinite(loss)
    assert vae.reconstruct(x).shape == x.shape and vae.sample(3).shape == (3, 784)
    assert 0 <= vae.sample(3).min() and vae.sample(3).max() <= 1


@pytest.mark.parametrize("objective", ["trace", "meanfield"])
def test_module_interface_loss_is_batch_sum_of_neg_elbo(vae, objective):
    """Untrained decoder: logits ≈ 0, so -log p(x|z) ≈ 784 log 2 per image."""
    x = binary_batch(8)
    loss = loss_module(vae, ObjectiveConfig(objective))(x)
    per_image = loss.item() / 8
    assert 784 * 0.6 < per_image < 784 * 0.8  # log 2 = 0.693 plus a small KL


def test_pyro_svi_step_trains_the_same_model_guide(vae):
    """pyro.infer.SVI with a Pyro optimizer finds the networks through pyro.module."""
    x = binary_batch(32)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    losses = [svi.step(x) for _ in range(30)]
    changed = [k for k, v in vae.state_dict().items() if not torch.equal(v, before[k])]
    assert set(changed) == set(before)  # every encoder and decoder tensor was updated
    names = set(pyro.get_param_store().keys())
    assert {"encoder$$$net.0.weight", "decoder$$$0.weight"} <= names
    # 30 steps of Adam on one batch of 32 images: the -ELBO falls by more than 2,000 nats
    # (observed ≈ 3,100: from ≈ 18,100 at initialization to ≈ 15,000)
    assert sum(losses[-5:]) / 5 < losses[0] - 2000


def test_config_is_validated():
    from ppl_vae.errors import ConfigError

    with pytest.raises(ConfigError, match="--model.z-dim must be a positive integer"):
        VAEConfig(z_dim=0)
