"""The fast paths against the programs as written; no timing asserts.

Every comparison replays one seed on both sides, so the Monte Carlo draws are identical and the
two numbers must agree to floating-point rounding (float64 on CPU, float32 on CUDA). The
second half is the recorder's safety: every way a replay could differ from the program the
user wrote (a stop-gradient, an outer Pyro handler, a replaced module or parameter, hooks, a
dtype change, ...) must give the program's own loss and gradients.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from benchmarks.reference_vae import ReferenceStep, ReferenceVAE, reference_log_likelihood
from ppl_vae import data
from ppl_vae.config import ObjectiveConfig
from ppl_vae.distributed import stream_seed
from ppl_vae.inference import recording, weights
from ppl_vae.inference.estimators import LeanTrace_ELBO
from ppl_vae.inference.objectives import loss_module
from ppl_vae.inference.recording import RecordedLogWeights, RecordedLoss, record
from ppl_vae.inference.svi import SVIStep, run_svi
from ppl_vae.metrics import log_likelihood, neg_elbo
from ppl_vae.models import REGISTRY, VAE, VAEConfig, build, default_config
from ppl_vae.models.capabilities import TrainingHooks
from ppl_vae.train import precision

CONFIG = VAEConfig(z_dim=3, hidden=(8,), x_dim=10)
CPU = torch.device("cpu")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def tolerances(device: torch.device) -> dict[str, float]:
    return {"rtol": 1e-10, "atol": 1e-10} if device.type == "cpu" else {"rtol": 1e-5, "atol": 1e-5}


def setup_model(device: torch.device = CPU, seed: int = 0, cls=VAE):
    """A small VAE (float64 on CPU) and a batch of 6 binary images."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    torch.manual_seed(seed)
    model = cls(CONFIG).to(device=device, dtype=dtype)
    x = torch.bernoulli(torch.full((6, CONFIG.x_dim), 0.4, device=device, dtype=dtype))
    return model, x


def loss_and_grads(loss_fn, params, x, seed: int, validate: bool = False):
    pyro.set_rng_seed(seed)
    with pyro.validation_enabled(validate):
        loss = loss_fn(x)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def assert_same(a, b, device=CPU) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, **tolerances(device))
    for g_a, g_b in zip(grads_a, grads_b, strict=True):
        if g_a is None or g_b is None:  # a parameter the loss does not use (e.g. a code prior)
            assert g_a is None and g_b is None
        else:
            torch.testing.assert_close(g_a, g_b, **tolerances(device))


def differ(a, b) -> bool:
    """Whether two (loss, grads) results differ somewhere by more than rounding."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    if not torch.allclose(loss_a.double(), loss_b.double()):
        return True
    return any(
        (g is None) != (h is None) or (g is not None and not torch.allclose(g.double(), h.double()))
        for g, h in zip(grads_a, grads_b, strict=True)
    )


# ----------------------------------------------------------------------------- the lean ELBO


@pytest.mark.parametrize("num_particles", [1, 3])
def test_lean_elbo_matches_trace_elbo(device, seed, num_particles):
    """LeanTrace_ELBO (validation off) = Trace_ELBO (validation on): loss and every gradient."""
    model, x = setup_model(device)
    params = list(model.parameters())
    cfg = ObjectiveConfig("trace", num_particles=num_particles)
    plain = loss_and_grads(loss_module(model, cfg, fast=False), params, x, seed, validate=True)
    lean_fn = loss_module(model, cfg)
    assert isinstance(lean_fn.elbo, LeanTrace_ELBO)
    assert_same(plain, loss_and_grads(lean_fn, params, x, seed), device)
    assert lean_fn.elbo.fallbacks == 0


def test_lean_elbo_sequential_particles(seed):
    """Non-vectorized particles: the lean loop averages like Trace_ELBO's."""
    model, x = setup_model()
    params = list(model.parameters())
    plain_fn = Trace_ELBO(num_particles=4)(model.model, model.guide)
    lean_fn = LeanTrace_ELBO(num_particles=4)(model.model, model.guide)
    assert_same(
        loss_and_grads(plain_fn, params, x, seed, True), loss_and_grads(lean_fn, params, x, seed)
    )


def test_lean_elbo_respects_scale(seed):
    """poutine.scale (β, KL warm-up) multiplies the site densities on the lean path too."""
    model, x = setup_model()
    params = list(model.parameters())
    scaled_model = poutine.scale(model.model, scale=0.3)
    for guide in (poutine.scale(model.guide, scale=0.3), poutine.scale(model.guide, scale=2.0)):
        assert_same(
            loss_and_grads(Trace_ELBO()(scaled_model, guide), params, x, seed, True),
            loss_and_grads(LeanTrace_ELBO(own_params=params)(scaled_model, guide), params, x, seed),
        )


@pytest.mark.parametrize(
    "handler",
    [
        lambda: poutine.scale(scale=2.0),
        lambda: poutine.mask(mask=torch.tensor([True, False] * 3)),
        lambda: poutine.block(hide=["z"]),
    ],
    ids=["scale", "mask", "block"],
)
def test_lean_elbo_under_an_outer_handler_is_trace_elbo(seed, handler):
    """Called inside an outer Pyro handler, the lean loss takes no shortcut and equals Pyro's
    Trace_ELBO under the same handler."""
    model, x = setup_model()
    params = list(model.parameters())

    def under(fn):
        def run(x):
            with handler():
                return fn(x)

        return run

    plain = loss_and_grads(under(Trace_ELBO()(model.model, model.guide)), params, x, seed)
    lean = loss_and_grads(under(loss_module(model, ObjectiveConfig())), params, x, seed)
    assert_same(plain, lean)


def test_lean_elbo_falls_back_for_score_function_sites(seed):
    """A guide site without rsample needs a score function: the lean path hands over."""
    model, x = setup_model()
    params = list(model.parameters())

    def model_fn(x):
        with pyro.plate("items", x.shape[0]):
            pyro.sample("k", dist.Bernoulli(x.new_tensor(0.5)))
        model.model(x)

    def guide_fn(x):
        with pyro.plate("items", x.shape[0]):
            p = torch.sigmoid(model.encoder(x)[0][:, 0])
            pyro.sample("k", dist.Bernoulli(p))
        model.guide(x)

    lean_elbo = LeanTrace_ELBO()
    assert_same(
        loss_and_grads(Trace_ELBO()(model_fn, guide_fn), params, x, seed, True),
        loss_and_grads(lean_elbo(model_fn, guide_fn), params, x, seed),
    )
    assert lean_elbo.fallbacks == 1


def test_lean_elbo_is_trace_elbo_under_validation(seed):
    """With validation on, Pyro's own checks run: an observation outside the support fails."""
    model, x = setup_model()
    loss_fn = loss_module(model, ObjectiveConfig())
    with pytest.raises(ValueError), pyro.validation_enabled(True):
        loss_fn(2 * x)


def site(fn, value, scale=1.0) -> dict:
    return {"fn": fn, "value": value, "scale": scale, "mask": None, "args": (), "kwargs": {},
            "is_observed": True}  # fmt: skip


@pytest.mark.parametrize(
    "fn",
    [
        lambda logits: dist.Bernoulli(logits=logits).to_event(1),
        lambda logits: dist.Bernoulli(probs=torch.sigmoid(logits)).to_event(1),
        lambda logits: dist.Bernoulli(logits=logits),
        lambda logits: dist.Normal(logits, 1.5).to_event(1),
    ],
    ids=["bernoulli-logits", "bernoulli-probs", "bernoulli-batch", "normal"],
)
def test_fused_densities_match_log_prob(fn):
    """Fused densities = Distribution.log_prob, per datum and (negated) summed, with particle
    broadcasting and scale."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 10, dtype=torch.float64)  # (particles, data, pixels)
    x = torch.bernoulli(torch.full((6, 10), 0.3, dtype=torch.float64))
    d = fn(logits)
    with pyro.validation_enabled(False):
        expected = d.log_prob(x)
        for scale in (1.0, 0.5):
            got = weights.site_log_density(site(d, x, scale), per_datum=False)
            torch.testing.assert_close(got, -scale * expected.sum())
            per_datum = weights.site_log_density(site(d, x, scale), per_datum=True)
            torch.testing.assert_close(per_datum, scale * expected)


def test_density_at_the_draw_matches_normal_log_prob(seed):
    """The guide's reparameterized Normal draw is torch's own (same random stream), and
    Σ log σ + ½ Σ ε² + n·c is −Normal.log_prob(z) summed, with the same gradients."""
    torch.manual_seed(seed)
    loc = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    fn = dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1)
    # with Pyro validation on (its default), log_prob's checks stand: no shortcut
    assert weights.reparameterized_normal_draw(fn) is None
    with pyro.validation_enabled(False):
        fn = dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1)
        torch.manual_seed(seed + 1)
        expected_z = fn.rsample()
        torch.manual_seed(seed + 1)
        z, eps = weights.reparameterized_normal_draw(fn)
        assert torch.equal(z, expected_z)
        for scale in (1.0, 0.3):
            expected = -(fn.log_prob(expected_z).sum() * scale)
            got = weights.neg_log_density_at_draw(fn, eps, scale)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
            # along z = loc + ε·σ the gradient in loc is zero: autograd gets it by cancelling
            # terms in log_prob, and never sees loc in the density at the draw (None)
            (g_loc, g_raw), (e_loc, e_raw) = (
                torch.autograd.grad(y, (loc, raw), retain_graph=True, allow_unused=True)
                for y in (got, expected)
            )
            assert g_loc is None
            torch.testing.assert_close(e_loc, torch.zeros_like(e_loc), rtol=0, atol=1e-12)
            torch.testing.assert_close(g_raw, e_raw, rtol=1e-10, atol=1e-12)
        assert weights.reparameterized_normal_draw(dist.Bernoulli(logits=loc)) is None


# ----------------------------------------------------------------------------- the SVI step


def test_svi_step_matches_plain_step(seed):
    """Three fast SVIStep calls (validation on the first only, lean loss) = three plain ones."""
    runs = []
    for fast in (False, True):
        model, x = setup_model()
        loss_fn = loss_module(model, ObjectiveConfig(), fast=fast)
        step = SVIStep(loss_fn, torch.optim.Adam(model.parameters(), lr=1e-2), fast=fast)
        pyro.set_rng_seed(seed)
        losses = [step(x) for _ in range(3)]
        runs.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_svi_step_validates_first_step_only(seed):
    """The first step sees Pyro's checks; later ones run with validation off; it is restored."""
    model, x = setup_model()
    step = SVIStep(loss_module(model, ObjectiveConfig()), torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError):
        step(2 * x)  # outside the Bernoulli support: caught by the validated first step
    step(x)
    assert pyro.infer.util.is_validation_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SVIStep.check_finite(float("nan"), "epoch 1")
    assert "diverged" in str(caught[0].message)


@pytest.mark.parametrize("optimizer", ["pyro", "torch-after-fast-steps"])
def test_svi_step_still_works(seed, optimizer):
    """pyro.infer.SVI with a Pyro optimizer trains the same model/guide (param store path)."""
    model, x = setup_model()
    if optimizer == "torch-after-fast-steps":
        loss_fn = record(loss_module(model, ObjectiveConfig()), model)
        step = SVIStep(loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3))
        for _ in range(3):
            step(x)
    before = [p.detach().clone() for p in model.parameters()]
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-2}), loss=LeanTrace_ELBO())
    losses = [svi.step(x) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert "decoder$$$0.weight" in pyro.get_param_store()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# ----------------------------------------------------------------------------- the weights


def test_lean_log_weights_match_traced(device, seed):
    """The weights without traces (validation off, fused densities) = through Pyro's traces
    (validation on) to float rounding, same draws."""
    model, x = setup_model(device)
    results = []
    for validate in (True, False):
        pyro.set_rng_seed(seed)
        with torch.no_grad(), pyro.validation_enabled(validate):
            results.append(weights.log_weights(model.model, model.guide, x, 5))
    assert results[1].shape == (5, x.shape[0])
    torch.testing.assert_close(results[1], results[0], **tolerances(device))


def test_guide_factors_count_in_every_estimator(seed):
    """A pyro.factor in the guide is part of log q (as in Trace_ELBO): the VQ-VAE's auxiliary
    loss enters the IWAE and STL losses too, not only the Trace_ELBO one (K = 1: all equal)."""
    model = build(default_config("vqvae", codebook_size=16, code_dim=4)).double().train()
    model.quantizer.initialized.fill_(True)  # keep the codebook fixed between the calls
    x = torch.bernoulli(torch.full((3, 784), 0.4, dtype=torch.float64))
    values = []
    for name in ("trace", "iwae", "stl"):
        pyro.set_rng_seed(seed)
        values.append(loss_module(model, ObjectiveConfig(name))(x).detach())
    model.eval()
    without_aux = loss_module(model, ObjectiveConfig("iwae"))(x).detach()
    torch.testing.assert_close(values[1], values[0])
    torch.testing.assert_close(values[2], values[0])
    assert (values[0] - without_aux).item() > 1e-3  # the factor is there, and counts


def test_log_likelihood_fast_equals_plain_and_reference(device, seed):
    """The IS estimate is the same number through traces (--no-fast), the fast path (recorded
    weights replayed from the second chunk of a shape on) and the hand-written reference run
    batch by batch on the streams the evaluation seeds per batch."""
    model, x = setup_model(device)
    reference = ReferenceVAE(CONFIG).to(device=device, dtype=x.dtype)
    reference.load_state_dict(model.state_dict())

    def reference_by_batch() -> torch.Tensor:
        parts = []
        for b, start in enumerate(range(0, x.shape[0], 4)):
            torch.manual_seed(stream_seed(seed, b))
            xb = x[start : start + 4]
            parts.append(reference_log_likelihood(reference, xb, k=13, batch_size=4,
                                                  particle_chunk=3))  # fmt: skip
        return torch.cat(parts)

    estimates = [
        log_likelihood(model, x, k=13, batch_size=4, particle_chunk=3, fast=False, seed=seed),
        log_likelihood(model, x, k=13, batch_size=4, particle_chunk=3, seed=seed),
        reference_by_batch(),
    ]
    torch.testing.assert_close(estimates[1], estimates[0], **tolerances(device))
    torch.testing.assert_close(estimates[2], estimates[0], **tolerances(device))


def test_recorded_log_weights_replay_bit_for_bit(device, seed):
    """RecordedLogWeights records once a (shape, particles) key repeats and replays weights
    equal bit for bit to the unrecorded ones, draws included."""
    model, x = setup_model(device)
    recorded = RecordedLogWeights(model)
    with torch.no_grad(), pyro.validation_enabled(False):
        for call in range(4):
            pyro.set_rng_seed(seed + call)
            expected = weights.log_weights(model.model, model.guide, x, 5)
            pyro.set_rng_seed(seed + call)
            torch.testing.assert_close(recorded(x, 5), expected, rtol=0, atol=0)
    assert recorded.replays == 3 and len(recorded.graphs) == 1


def test_reference_is_the_same_model(device, seed):
    """The benchmark baseline computes ppl_vae's -ELBO with analytic KL (TraceMeanField_ELBO)."""
    model, x = setup_model(device)
    reference = ReferenceVAE(CONFIG).to(device=device, dtype=x.dtype)
    reference.load_state_dict(model.state_dict())
    params = list(model.parameters())
    expected = loss_and_grads(
        TraceMeanField_ELBO()(model.model, model.guide), params, x, seed, validate=True
    )
    pyro.set_rng_seed(seed)
    loss = reference.neg_elbo(x)
    got = (loss.detach(), torch.autograd.grad(loss, list(reference.parameters())))
    assert_same(expected, got, device)
    assert torch.isfinite(ReferenceStep(reference)(x))


def test_neg_elbo_lean_batches_match_trace_elbo(seed):
    """metrics.neg_elbo (validated once in a pass of its own, then lean) = Trace_ELBO on every
    batch, on the streams seeded per batch."""
    model, x = setup_model()
    inputs = torch.cat([x, x.flip(0), x])
    got = neg_elbo(model, inputs, ObjectiveConfig("trace"), batch_size=5, seed=seed)
    plain = loss_module(model, ObjectiveConfig("trace"), fast=False)
    expected = 0.0
    with torch.no_grad():
        for b, i in enumerate(range(0, inputs.shape[0], 5)):
            torch.manual_seed(stream_seed(seed, b))
            expected += plain(inputs[i : i + 5]).item()
    assert got == pytest.approx(expected / inputs.shape[0], rel=1e-6)  # float32 accumulator


# ----------------------------------------------------------------------------- the recorded loss


@pytest.mark.parametrize("num_particles", [1, 3])
def test_recorded_loss_matches_lean(device, seed, num_particles):
    """The recorded graph replays the lean loss exactly: values, gradients, the random stream."""
    model, x = setup_model(device)
    params = list(model.parameters())
    lean_fn = loss_module(model, ObjectiveConfig("trace", num_particles=num_particles))
    recorded = record(lean_fn, model)
    assert isinstance(recorded, RecordedLoss)
    expected = loss_and_grads(lean_fn, params, x, seed)
    for _ in range(3):  # a new key runs lean, the repeat records and replays, then replays
        assert_same(expected, loss_and_grads(recorded, params, x, seed), device)
    assert len(recorded.graphs) == 1 and recorded.replays == 2
    for _ in range(2):  # a new shape: a new graph once it repeats
        loss_and_grads(recorded, params, x[:4], seed)
    assert len(recorded.graphs) == 2


def test_recorded_svi_step_matches_plain_step(seed):
    """SVIStep over the recorded loss = the plain step (Trace_ELBO, validated), over steps."""
    runs = []
    for fast in (False, True):
        model, x = setup_model()
        loss_fn = loss_module(model, ObjectiveConfig(), fast=fast)
        if fast:
            loss_fn = record(loss_fn, model)
        step = SVIStep(loss_fn, torch.optim.Adam(model.parameters(), lr=1e-2), fast=fast)
        pyro.set_rng_seed(seed)
        runs.append(torch.stack([step(x) for _ in range(4)]))
        if fast:
            assert loss_fn.replays == 3  # call 1 runs lean (after its check), 2 records: 2-4
    torch.testing.assert_close(runs[0], runs[1])


def test_fit_runs_the_recorded_step(tmp_path, fake_data_dir, monkeypatch):
    """fit() trains through SVIStep: two epochs of finite losses on small fake data, the
    VAE's loss replayed from its second full batch on; --no-fast records nothing."""
    import csv

    from ppl_vae.config import DataConfig, RunConfig, TrainConfig
    from ppl_vae.train import fit

    made: list[RecordedLoss] = []
    real_init = RecordedLoss.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(RecordedLoss, "__init__", init)
    for fast in (True, False):
        cfg = RunConfig(
            name=f"fast-{fast}",
            runs_dir=tmp_path,
            fast=fast,
            model=VAEConfig(z_dim=2, hidden=(8,)),
            data=DataConfig(data_dir=fake_data_dir),
            train=TrainConfig(epochs=2, batch_size=32, device="cpu", progress=False),
        )
        run_dir = fit(cfg)
        with open(run_dir / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2
        assert all(torch.isfinite(torch.tensor(float(r["train_neg_elbo"]))) for r in rows)
    (recorded,) = made  # the fast run only
    from ppl_vae import data

    n_train = data.load(DataConfig(data_dir=fake_data_dir), "cpu").train.images.shape[0]
    full = n_train // 32
    # per epoch: full batches, then a partial one that runs lean (its key does not repeat);
    # the first full batch of the run is validated and runs lean, the second records
    assert len(recorded.graphs) == 1
    assert recorded.replays == 2 * full - 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("recorded", [False, True])
def test_cuda_steps_do_not_synchronize(seed, recorded):
    """After the validated first step (and the first lean one), a training step on CUDA makes
    no host synchronization: torch's sync debug mode turns any into an error."""
    device = torch.device("cuda")
    torch.manual_seed(seed)
    model = VAE(VAEConfig(z_dim=4, hidden=(32,))).to(device)
    x = torch.bernoulli(torch.full((64, 784), 0.3, device=device))
    loss_fn = loss_module(model, ObjectiveConfig())
    if recorded:
        loss_fn = record(loss_fn, model)
    step = SVIStep(loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3))
    total = torch.zeros((), device=device)
    for _ in range(3):  # validated first step; lean; the third records the graph
        total += step(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            total += step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("precision_name", ["fp32", "tf32", "bf16"])
def test_cuda_epoch_loop_does_not_synchronize(seed, precision_name):
    """The training loop as ``fit`` runs it (a seeded permutation moved to the device, index
    gathers, dynamic binarization, the recorded step, the loss summed on the device) makes no
    host synchronization after its warm-up steps, at every --train.precision."""
    device = torch.device("cuda")
    torch.manual_seed(seed)
    model = VAE(VAEConfig(z_dim=4, hidden=(32,))).to(device)
    source = torch.randint(0, 256, (64 * 8, 28, 28), dtype=torch.uint8, device=device)
    step = SVIStep(record(loss_module(model, ObjectiveConfig()), model),
                   torch.optim.Adam(model.parameters(), lr=1e-3))  # fmt: skip
    order = torch.Generator().manual_seed(seed)

    def epoch():
        inputs = (data.to_input(b, "dynamic") for b in data.batches(source, 64, order))
        with precision(model, precision_name):
            return run_svi(step, inputs)

    epoch()  # validated first step, lean steps, the recording
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        total = epoch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item()


def assert_lean_weights_match(model, x: torch.Tensor, seed: int) -> None:
    """The lean IS weights (validation off) equal the traced ones (validation on)."""
    results = []
    for validate in (True, False):
        pyro.set_rng_seed(seed)
        with torch.no_grad(), pyro.validation_enabled(validate):
            results.append(weights.log_weights(model.model, model.guide, x, 3))
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_registered_model_fast_paths_match(kind, seed):
    """For every model of the registry (default config, training mode, float64): the lean loss
    and, for the models that opt in, its recorded replay equal Trace_ELBO (loss and
    gradients), and the lean IS weights equal the traced ones to float rounding."""
    torch.manual_seed(seed)
    model = build(default_config(kind)).double().train()
    x_dim = getattr(model.config, "x_dim", 784)
    x = torch.bernoulli(torch.full((5, x_dim), 0.4, dtype=torch.float64))
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(model, TrainingHooks):  # models with step schedules: take one, as fit does
        model.on_train_step(1)
    plain = loss_and_grads(loss_module(model, ObjectiveConfig(), fast=False), params, x, seed,
                           validate=True)  # fmt: skip
    lean_fn = loss_module(model, ObjectiveConfig())
    assert_same(plain, loss_and_grads(lean_fn, params, x, seed))
    recorded = record(lean_fn, model)
    assert (recorded is not lean_fn) == recording.recordable(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a library model that opts in records cleanly
        for _ in range(2):
            assert_same(plain, loss_and_grads(recorded, params, x, seed))
    assert getattr(recorded, "replays", 0) == (1 if recording.recordable(model) else 0)
    assert_lean_weights_match(model, x, seed)


@pytest.mark.parametrize(
    ("likelihood", "mixtures"),
    [("discretized-logistic", 1), ("discretized-logistic", 3), ("gaussian", 1),
     ("continuous-bernoulli", 1)],
)  # fmt: skip
def test_every_likelihood_fast_paths_match(likelihood, mixtures, seed):
    """The VAE with each likelihood of 8-bit data (float64, 8-bit values or dequantized
    ones): the lean loss and its recorded replay equal Trace_ELBO (loss and gradients), and
    the lean IS weights equal the traced ones; the discretized logistic takes the generic
    log_prob path (no fused form), nothing falls back."""
    torch.manual_seed(seed)
    cfg = replace(CONFIG, likelihood=likelihood, logistic_mixtures=mixtures)
    model = VAE(cfg).double().train()
    images = torch.randint(0, 256, (5, cfg.x_dim), dtype=torch.uint8)
    mode = "none" if likelihood == "discretized-logistic" else "dequantize"
    x = data.to_input(images, mode).double()
    params = [p for p in model.parameters() if p.requires_grad]
    plain = loss_and_grads(loss_module(model, ObjectiveConfig(), fast=False), params, x, seed,
                           validate=True)  # fmt: skip
    lean_fn = loss_module(model, ObjectiveConfig())
    assert_same(plain, loss_and_grads(lean_fn, params, x, seed))
    assert lean_fn.elbo.fallbacks == 0
    recorded = record(lean_fn, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            assert_same(plain, loss_and_grads(recorded, params, x, seed))
    assert recorded.replays == 1
    assert_lean_weights_match(model, x, seed)


def test_which_models_opt_in():
    """Recording is opt-in per class: the library's MLP/conv VAE, AE, two-layer VAE and linear
    model opt in; the VQ-VAE (whose bookkeeping reads tensor values) does not, nor does any
    subclass."""
    assert {kind for kind, (_, cls) in REGISTRY.items() if cls.__dict__.get("recordable")} == {
        "vae", "ae", "hvae", "linear"
    }

    class MyVAE(VAE):
        pass

    model, _ = setup_model(cls=MyVAE)
    lean_fn = loss_module(model, ObjectiveConfig())
    assert not recording.recordable(model) and record(lean_fn, model) is lean_fn
    other, _ = setup_model()  # a loss of another instance's programs is not this model's
    assert record(loss_module(other, ObjectiveConfig()), model) is not RecordedLoss


# ----------------------------------------------------------------------------- recorder safety


class Recordable(VAE):
    """A user's VAE that opts in to recording; the variants below change its guide."""

    recordable = True


class DetachedScale(Recordable):
    recordable = True

    def posterior(self, x):
        z_loc, z_scale = self.encoder(x)
        return dist.Normal(z_loc, z_scale.detach()).to_event(1)


class NoGradScale(Recordable):
    recordable = True

    def posterior(self, x):
        z_loc, z_scale = self.encoder(x)
        with torch.no_grad():
            z_scale = z_scale + 0.0
        return dist.Normal(z_loc, z_scale).to_event(1)


class GradDisabledScale(Recordable):
    recordable = True

    def posterior(self, x):
        z_loc, z_scale = self.encoder(x)
        torch.set_grad_enabled(False)
        try:
            z_scale = z_scale * 1.0
        finally:
            torch.set_grad_enabled(True)
        return dist.Normal(z_loc, z_scale).to_event(1)


class _StraightThroughRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value):
        return value.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


class CustomFunctionLoc(Recordable):
    recordable = True

    def posterior(self, x):
        z_loc, z_scale = self.encoder(x)
        return dist.Normal(_StraightThroughRound.apply(z_loc * 4) / 4, z_scale).to_event(1)


class DataAttributeScale(Recordable):
    recordable = True

    def posterior(self, x):
        z_loc, z_scale = self.encoder(x)
        return dist.Normal(z_loc, z_scale.data).to_event(1)


@pytest.mark.parametrize(
    "cls", [DetachedScale, NoGradScale, GradDisabledScale, CustomFunctionLoc, DataAttributeScale]
)
def test_what_a_graph_cannot_reproduce_is_refused(cls, seed):
    """A program with detach, no_grad, set_grad_enabled, a custom autograd.Function or .data is
    not recorded (a graph of tensor ops would turn them into plain ops, and let gradients through
    the stop-gradient: the scale bias's gradient was [0, 0, 0] on the lean path and nonzero
    replayed): it warns once and every call gives the lean loss and gradients exactly."""
    model, x = setup_model(cls=cls)
    params = list(model.parameters())
    lean_fn = loss_module(model, ObjectiveConfig())
    expected = loss_and_grads(lean_fn, params, x, seed)
    recorded = record(lean_fn, model)
    with pytest.warns(UserWarning, match="not recorded"):
        for _ in range(4):
            assert_same(expected, loss_and_grads(recorded, params, x, seed))
    assert recorded.replays == 0 and not recorded.graphs and len(recorded.refused) == 1
    # the stop-gradient matters here: the unmodified program has other gradients
    plain_model, _ = setup_model(cls=Recordable)
    plain = loss_and_grads(loss_module(plain_model, ObjectiveConfig()),
                           list(plain_model.parameters()), x, seed)  # fmt: skip
    assert differ(expected, plain)


def recorded_setup(seed):
    """A recording VAE whose loss has been replayed once; returns the pieces."""
    model, x = setup_model(cls=Recordable)
    lean_fn = loss_module(model, ObjectiveConfig())
    recorded = record(lean_fn, model)
    params = list(model.parameters())
    for _ in range(3):
        loss_and_grads(recorded, params, x, seed)
    assert recorded.replays == 2
    return model, x, lean_fn, recorded


def test_an_outer_handler_is_never_replayed_past(seed):
    """Inside poutine.scale(scale=2), the loss is twice the program's (the replay would have
    ignored the handler: 74.97 against 37.48), with twice its gradients."""
    model, x, lean_fn, recorded = recorded_setup(seed)
    params = list(model.parameters())

    def scaled(fn):
        def run(x):
            with poutine.scale(scale=2.0):
                return fn(x)

        return run

    loss, grads = loss_and_grads(lean_fn, params, x, seed)
    replays = recorded.replays
    got = loss_and_grads(scaled(recorded), params, x, seed)
    assert_same((2 * loss, [2 * g for g in grads]), got)
    assert_same(loss_and_grads(scaled(lean_fn), params, x, seed), got)
    assert recorded.replays == replays


def replaced_activation(model):
    model.decoder[1] = torch.nn.ReLU()


def replaced_parameter(model):
    weight = model.decoder[0].weight
    model.decoder[0].weight = torch.nn.Parameter(weight.detach() * 1.5)


def frozen_bias(model):
    model.encoder.net[-1].bias.requires_grad_(False)


def forward_hook(model):
    model.decoder.register_forward_hook(lambda module, args, out: out * 2)


def forward_pre_hook(model):
    model.encoder.register_forward_pre_hook(lambda module, args: (args[0] * 0.5,))


def replaced_config(model):
    model.config = replace(model.config, z_dim=model.config.z_dim)  # equal, but a new object


def eval_mode(model):
    model.eval()


def kl_weight(model):
    model.train_kl_weight = 0.25


def double_dtype(model):
    model.float()


@pytest.mark.filterwarnings("ignore:.*requires_grad=False:UserWarning")  # pyro.module, frozen
@pytest.mark.parametrize(
    "change",
    [replaced_activation, replaced_parameter, frozen_bias, forward_hook, forward_pre_hook,
     replaced_config, eval_mode, kl_weight, double_dtype],
)  # fmt: skip
def test_a_changed_module_tree_runs_the_new_program(change, seed):
    """After a graph was recorded and replayed, any change the graph would not see (a replaced
    submodule such as Softplus → ReLU, a replaced parameter, requires_grad_ toggled, a
    forward hook, a new config object, eval mode, a Python attribute, the dtype) gives exactly
    the new program's loss and gradients from the very next call, and a new graph once the new
    state holds."""
    model, x, lean_fn, recorded = recorded_setup(seed)
    all_params = list(model.parameters())
    before = loss_and_grads(lean_fn, all_params, x, seed)
    change(model)
    if next(model.parameters()).dtype != x.dtype:
        x = x.to(next(model.parameters()).dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = loss_and_grads(lean_fn, params, x, seed)
    # the change matters (a new config object equal to the old, and eval mode for this VAE
    # with β = 1, change the key but not the numbers)
    if change is frozen_bias:  # one gradient fewer
        frozen = [i for i, p in enumerate(all_params) if not p.requires_grad]
        before = (before[0], [g for i, g in enumerate(before[1]) if i not in frozen])
    assert differ(before, expected) or change in (replaced_config, eval_mode, frozen_bias)
    replays = recorded.replays
    for _ in range(3):
        got = loss_and_grads(recorded, params, x, seed)
        if x.dtype == torch.float64:
            assert_same(expected, got)
        else:  # float32 after the change: equal to float rounding
            torch.testing.assert_close(got[0], expected[0])
            for g, h in zip(got[1], expected[1], strict=True):
                assert (g is None) == (h is None)
                if g is not None:
                    torch.testing.assert_close(g, h)
    # A new key: the first call after the change runs the program, the second records, the
    # third replays. New tensors or an equal config in the same structure: the key (and its
    # graph, a function of the tensors) is the old one. Hooks: never replayed.
    if change in (forward_hook, forward_pre_hook):
        assert recorded.replays == replays
    elif change in (replaced_parameter, replaced_config):
        assert recorded.replays == replays + 3
    else:
        assert recorded.replays == replays + 2


def test_global_module_hooks_stop_replays(seed):
    """A global forward hook (torch.nn.modules.module.register_module_forward_hook) runs on
    every module call: while one is registered nothing is replayed."""
    model, x, lean_fn, recorded = recorded_setup(seed)
    params = list(model.parameters())
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: out)
    try:
        replays = recorded.replays
        assert_same(loss_and_grads(lean_fn, params, x, seed),
                    loss_and_grads(recorded, params, x, seed))  # fmt: skip
        assert recorded.replays == replays
    finally:
        handle.remove()


def test_an_unwatchable_attribute_makes_a_model_unrecordable(seed):
    """A module attribute the key cannot watch (a list, which could change in place) makes the
    model unrecordable: the loss runs as written."""
    model, x = setup_model(cls=Recordable)
    model.decoder.history = []
    lean_fn = loss_module(model, ObjectiveConfig())
    recorded = record(lean_fn, model)
    params = list(model.parameters())
    for _ in range(3):
        assert_same(loss_and_grads(lean_fn, params, x, seed),
                    loss_and_grads(recorded, params, x, seed))  # fmt: skip
    assert recorded.replays == 0 and "history" in recorded.state.unwatchable


def test_a_program_that_reads_tensor_values_falls_back(seed):
    """A program that reads a tensor value in Python cannot be recorded: it warns, leaves
    buffers and the random stream untouched, and returns the lean loss."""
    model, x = setup_model(cls=Recordable)
    model.register_buffer("calls", torch.zeros((), dtype=torch.float64))
    params = list(model.parameters())
    guide = model.guide

    def counting_guide(x):
        if bool(model.calls >= 0):  # data-dependent Python
            model.calls += 1
        guide(x)

    model.guide = counting_guide  # a function attribute with a closure: unwatchable
    lean_fn = loss_module(model, ObjectiveConfig())
    recorded = record(lean_fn, model)
    assert isinstance(recorded, RecordedLoss)
    for _ in range(2):
        assert_same(loss_and_grads(lean_fn, params, x, seed),
                    loss_and_grads(recorded, params, x, seed))  # fmt: skip
    assert recorded.replays == 0 and "guide" in recorded.state.unwatchable
    del model.guide  # the class's guide again: recordable, but its Python reads the buffer

    class Counting(Recordable):
        recordable = True

        def guide(self, x):
            if bool(self.calls >= 0):
                self.calls += 1
            super().guide(x)

    model, x = setup_model(cls=Counting)
    model.register_buffer("calls", torch.zeros((), dtype=torch.float64))
    params = list(model.parameters())
    lean_fn = loss_module(model, ObjectiveConfig())
    recorded = record(lean_fn, model)
    expected = loss_and_grads(lean_fn, params, x, seed)
    loss_and_grads(recorded, params, x, seed)  # a new key runs lean
    model.calls.zero_()
    with pytest.warns(UserWarning, match="not recorded"):  # the repeat tries to record
        got = loss_and_grads(recorded, params, x, seed)
    assert_same(expected, got)
    assert model.calls.item() == 1  # the failed recording's update was undone
    assert recorded.replays == 0 and len(recorded.refused) == 1


def test_a_replay_that_differs_is_refused(seed, monkeypatch):
    """The first replay of a new graph is checked against the program on the same draws: a
    graph that computes something else (here: corrupted after recording) is never used."""

    def corrupt(graph_module):
        for node in graph_module.graph.nodes:
            if node.op == "output":
                (outputs,) = node.args  # a list of one node: the loss
                with graph_module.graph.inserting_before(node):
                    mul = torch.ops.aten.mul.Tensor
                    doubled = graph_module.graph.call_function(mul, (outputs[0], 2.0))
                node.args = ([doubled],)
        graph_module.recompile()

    monkeypatch.setattr(recording, "simplify_graph", corrupt)
    model, x = setup_model(cls=Recordable)
    params = list(model.parameters())
    lean_fn = loss_module(model, ObjectiveConfig())
    recorded = record(lean_fn, model)
    with pytest.warns(UserWarning, match="differs from the program"):
        for _ in range(3):
            assert_same(loss_and_grads(lean_fn, params, x, seed),
                        loss_and_grads(recorded, params, x, seed))  # fmt: skip
    assert recorded.replays == 0


def test_recorded_loss_follows_python_state(seed):
    """A weight the model holds as a Python float (a KL warm-up) is part of the graph's key:
    while it changes every call the loss is the lean one, exact; once it holds, a graph."""
    model, x = setup_model()
    params = list(model.parameters())
    lean_fn = loss_module(model, ObjectiveConfig())
    recorded = record(lean_fn, model)
    for weight in (0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.5):
        model.train_kl_weight = weight
        expected = loss_and_grads(lean_fn, params, x, seed)
        assert_same(expected, loss_and_grads(recorded, params, x, seed))
    assert len(recorded.graphs) == 1  # recorded once, at the second call with weight 0.4
    assert recorded.replays == 2


def test_simplified_graph_is_bit_identical(seed, monkeypatch):
    """simplify_graph's rewrites (constant folding, x − 0, x / 1, same-shape expand) change no
    bit of the loss or the gradients, in float32, and leave fewer operations to replay."""
    model = VAE(VAEConfig(z_dim=4, hidden=(16,), x_dim=20))
    x = torch.bernoulli(torch.full((6, 20), 0.4))
    params = list(model.parameters())
    results, graphs = [], []
    for simplify in (False, True):
        if not simplify:
            monkeypatch.setattr(recording, "simplify_graph", lambda g: g.recompile())
        else:
            monkeypatch.undo()
        recorded = record(loss_module(model, ObjectiveConfig()), model)
        for _ in range(2):  # the second call records
            got = loss_and_grads(recorded, params, x, seed)
        assert recorded.replays == 1
        results.append(got)
        graphs.append(next(iter(recorded.graphs.values())))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))

    def ops(graph) -> list[str]:
        return [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]

    plain_ops, simple_ops = ops(graphs[0]), ops(graphs[1])
    assert len(simple_ops) < len(plain_ops)
    for gone in ("aten.new_zeros.default", "aten.new_ones.default", "aten.div.Tensor"):
        assert gone in plain_ops and gone not in simple_ops


def test_simplify_graph_leaves_graphs_that_write_constants():
    """A graph writing in place into a tensor it made (not a fresh draw) is left as recorded:
    folding that tensor into a buffer would carry the write over to the next call."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a):
        z = a.new_zeros(a.shape)
        z.add_(1.0)
        return (a - a.new_zeros(a.shape)) * z

    graph = make_fx(f)(torch.randn(3))
    before = len(graph.graph.nodes)
    recording.simplify_graph(graph)
    assert len(graph.graph.nodes) == before
    x = torch.randn(3)
    for _ in range(2):
        assert torch.equal(graph(x), f(x))


def test_fit_loop_replays_once_the_kl_weight_holds(seed):
    """fit calls the model's step hook before every step; the VAE's KL warm-up changes its
    weight for ``warmup_steps`` steps, during which the loss runs lean; after, it replays.
    Every step equals the unrecorded step's loss (float64, same draws)."""
    config = VAEConfig(z_dim=3, hidden=(8,), x_dim=10, warmup_steps=4)
    x = torch.bernoulli(torch.full((6, 10), 0.4, dtype=torch.float64))
    losses, replays = [], []
    for recorded in (False, True):
        torch.manual_seed(seed)
        model = VAE(config).double()
        loss_fn = loss_module(model, ObjectiveConfig())
        if recorded:
            loss_fn = record(loss_fn, model)
        step = SVIStep(loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3))
        pyro.set_rng_seed(seed)
        run = []
        for i in range(9):
            model.on_train_step(i)
            run.append(step(x))
            replays.append(getattr(loss_fn, "replays", 0))
        losses.append(torch.stack(run))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-10)
    recorded_replays = replays[9:]
    # weights 0.01 → 1 over steps 0..4 (lean), step 5 repeats step 4's key and records
    assert recorded_replays[:5] == [0] * 5
    assert recorded_replays[-1] == 4


def test_a_deep_copy_records_its_own_graphs(seed):
    """A copy of a model is another module tree: its loss records against its own tensors."""
    model, x = setup_model()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
    for m in (model, twin):
        params = list(m.parameters())
        lean_fn = loss_module(m, ObjectiveConfig())
        recorded = record(lean_fn, m)
        for _ in range(3):
            assert_same(loss_and_grads(lean_fn, params, x, seed),
                        loss_and_grads(recorded, params, x, seed))  # fmt: skip


# ----------------------------------------------------------------------------- benchmarks


def test_step_benchmark_smoke(capsys):
    """benchmarks/step_overhead.py runs end to end with tiny settings; ratios come last."""
    from benchmarks import step_overhead

    step_overhead.main(
        ["--repeats", "2", "--warmup", "0", "--batch-sizes", "8", "--images-per-sample", "8"]
    )
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    assert all(line.startswith("ratio ppl_vae") for line in last)


def test_zoo_benchmark_smoke(capsys):
    """benchmarks/zoo_throughput.py trains every zoo model through fit's step, tiny settings."""
    from benchmarks import zoo_throughput

    zoo_throughput.main(
        ["--repeats", "1", "--warmup", "0", "--batch-sizes", "4", "--images-per-sample", "8"]
    )
    last = capsys.readouterr().out.strip().splitlines()[-3:]
    assert [line.split()[1] for line in last] == ["vae_mlp", "vae_conv", "vqvae"]
    assert all(float(line.rsplit(" ", 1)[1]) > 0 for line in last)
