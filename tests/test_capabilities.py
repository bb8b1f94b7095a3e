"""A model with a non-Gaussian guide, added the way a user adds one: one file with its config
and module (here, this test module) and one registry line. Training, every objective that
applies (STL and DReG included), evaluation, diagnostics (the gaps included, with q* in its
own family), reports and the CLI work on it with no other change, and every number that needs
what it lacks (a Gaussian guide) is absent, never wrong."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import pytest
import torch
from torch import nn

from ppl_vae import metrics, nets
from ppl_vae.cli import main
from ppl_vae.config import ObjectiveConfig
from ppl_vae.errors import ConfigError
from ppl_vae.inference.objectives import loss_module
from ppl_vae.models import REGISTRY, build
from ppl_vae.models.capabilities import ExplicitPrior, GaussianGuide
from ppl_vae.models.common import ImageModel, NetworkConfig, standard_normal

# ----------------------------------------------------------------------------- the new model file


@dataclass(frozen=True)
class FlowVAEConfig(NetworkConfig):
    kind: ClassVar[str] = "flowvae"

    z_dim: int = 4
    """Dimension of the latent z."""
    flow_steps: int = 2
    """Inverse autoregressive transforms after the encoder's Normal."""


class FlowVAE(ImageModel):
    """p(z) = N(0, I); p(x|z) = likelihood(decoder(z)); q(z|x) = IAF_K ∘ N(encoder(x)).

    q(z|x) is a base Normal from the encoder pushed through ``flow_steps`` affine
    autoregressive transforms (Pyro's ``transforms.affine_autoregressive``): a density guide
    that is not Gaussian.
    """

    def __init__(self, config: FlowVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = nets.GaussianHead(config.encoder_net(2 * config.z_dim))
        self.decoder = config.decoder_net(config.z_dim)
        self.likelihood = config.build_likelihood()
        self.flows = nn.ModuleList(
            T.affine_autoregressive(config.z_dim, hidden_dims=[16])
            for _ in range(config.flow_steps)
        )

    def prior(self, x: torch.Tensor) -> dist.TorchDistribution:
        return standard_normal(x, self.config.z_dim)

    def q(self, x: torch.Tensor) -> dist.TorchDistribution:
        z_loc, z_scale = self.encoder(x)
        base = dist.Normal(z_loc, z_scale).to_event(1)
        return dist.TransformedDistribution(base, list(self.flows))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            self.observe(x, z)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("flows", self.flows)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.q(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The base mean pushed through the flows (a point summary, not q's mean)."""
        z = self.encoder(x)[0]
        for flow in self.flows:
            z = flow(z)
        return z

    def prior_sample(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.config.z_dim, device=self.device)


@pytest.fixture
def registered(monkeypatch):
    """The one registry line."""
    monkeypatch.setitem(REGISTRY, FlowVAEConfig.kind, (FlowVAEConfig, FlowVAE))


# ----------------------------------------------------------------------------- the checks


def test_the_metric_table_asks_the_program(registered, seed):
    """The flow guide has a density and z is a vector: the Monte Carlo ELBO, importance sampling
    and the aggregate posterior apply; the analytic-KL ELBO and the KL per dimension (which need
    a closed-form KL, a factorized Gaussian guide), the active units (which need encode(x) to be
    q's mean, which a flow has not in closed form) and the point-mass and codebook metrics do
    not, and are absent."""
    model = build(FlowVAEConfig(hidden=(16,))).eval()
    assert isinstance(model, ExplicitPrior) and not isinstance(model, GaussianGuide)
    x = torch.bernoulli(torch.full((20, 784), 0.3))
    assert metrics.applicable(model, x) == [
        "elbo", "importance sampling", "reconstruction", "aggregate posterior"
    ]  # fmt: skip
    results = metrics.evaluate_model(model, x, metrics.EvalConfig(k=8, batch_size=10))
    assert "kl_sum" not in results and "neg_log_joint" not in results
    assert "neg_elbo_meanfield" not in results and "active_units" not in results
    assert all(math.isfinite(results[key]) for key in ("neg_elbo", "nll_is", "recon_nll"))
    # the importance-sampled bound is the tighter one, on average (k = 8 draws per image)
    assert results["nll_is"] < results["neg_elbo"] + 1.0


@pytest.mark.parametrize("name", ["trace", "tracegraph", "iwae", "renyi", "stl", "dreg"])
def test_every_objective_that_applies_trains_it(registered, seed, name):
    """STL and DReG included: the flow's parameters cannot be detached, so the estimators
    cancel the score term instead, with no code of the model's."""
    model = build(FlowVAEConfig(hidden=(16,)))
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    loss = loss_module(model, ObjectiveConfig(name, 3))(x)
    grads = torch.autograd.grad(loss, list(model.flows.parameters()))
    assert math.isfinite(loss.item()) and all(g.isfinite().all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # the flows are trained


@pytest.mark.parametrize(("name", "alternative"), [("meanfield", "use --objective trace")])
def test_objectives_that_do_not_apply_say_so(registered, seed, name, alternative):
    """meanfield needs a closed-form KL(q || p), which a flow guide has not: a one-line error
    that names the objective that works."""
    model = build(FlowVAEConfig(hidden=(16,)))
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    with pytest.raises(ConfigError, match=alternative) as raised:
        loss_module(model, ObjectiveConfig(name, 3))(x)
    assert "\n" not in str(raised.value)


def test_the_cli_trains_evaluates_and_diagnoses_it(registered, fake_data_dir, tmp_path, capsys):
    argv = ["train", "flowvae", "--data.data-dir", str(fake_data_dir), "--runs-dir", str(tmp_path),
            "--name", "flow", "--model.hidden", "16", "--train.epochs", "1",
            "--train.batch-size", "32", "--eval.k", "4", "--no-train.progress"]  # fmt: skip
    assert main(argv) == 0
    run_dir = tmp_path / "flow"
    ev = json.loads((run_dir / "eval.json").read_text())
    assert "nll_is" in ev and "kl_sum" not in ev and "active_units" not in ev
    assert "traversals.png" in {p.name for p in run_dir.iterdir()}
    argv = ["diagnose", str(run_dir), "--images", "4", "--k", "50", "--gap-images", "2",
            "--nuts-images", "1", "--nuts-warmup", "5", "--nuts-samples", "5"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    assert "gaps on 2" in capsys.readouterr().out
    diag = json.loads((run_dir / "diagnostics.json").read_text())
    assert math.isfinite(diag["khat_mean"]) and "nuts_r_hat_max" in diag
    # q* in the guide's own family: its encoder's outputs free per image, the flows as trained
    assert diag["gap_local_family"] == "encoder-outputs" and "notes" not in diag
    assert all(math.isfinite(diag[k]) for k in ("amortization_gap", "approximation_gap"))
    assert main(["report", str(run_dir)]) == 0
    capsys.readouterr()
