"""Equivalence of the fast paths (ppl_vae.fast) with Pyro's plain ones; no timing asserts.

Every comparison replays one seed on both sides, so the Monte Carlo draws are identical and the
two numbers must agree to floating-point rounding (float64 on CPU, float32 on CUDA).
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from benchmarks.reference_vae import ReferenceStep, ReferenceVAE, reference_log_likelihood
from ppl_vae import fast
from ppl_vae.config import ObjectiveConfig
from ppl_vae.evaluate import log_likelihood
from ppl_vae.models import REGISTRY, VAE, VAEConfig, build, default_config
from ppl_vae.objectives import log_weights, loss_module

CONFIG = VAEConfig(z_dim=3, hidden=(8,), x_dim=10)
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


def setup_model(device: torch.device, seed: int = 0) -> tuple[VAE, torch.Tensor]:
    """A small VAE (float64 on CPU) and a batch of 6 binary images."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    torch.manual_seed(seed)
    model = VAE(CONFIG).to(device=device, dtype=dtype)
    x = torch.bernoulli(torch.full((6, CONFIG.x_dim), 0.4, device=device, dtype=dtype))
    return model, x


def loss_and_grads(loss_fn, params, x, seed: int, validate: bool):
    pyro.set_rng_seed(seed)
    with pyro.validation_enabled(validate):
        loss = loss_fn(x)
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def assert_same(a, b, device) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, **tolerances(device))
    for g_a, g_b in zip(grads_a, grads_b, strict=True):
        if g_a is None or g_b is None:  # a parameter the loss does not use (e.g. a code prior)
            assert g_a is None and g_b is None
        else:
            torch.testing.assert_close(g_a, g_b, **tolerances(device))


@pytest.mark.parametrize("num_particles", [1, 3])
def test_lean_elbo_matches_trace_elbo(device, seed, num_particles):
    """LeanTrace_ELBO (validation off) = Trace_ELBO (validation on): loss and every gradient."""
    model, x = setup_model(device)
    params = list(model.parameters())
    cfg = ObjectiveConfig("trace", num_particles=num_particles)
    plain = loss_and_grads(loss_module(model, cfg, lean=False), params, x, seed, validate=True)
    lean_fn = loss_module(model, cfg)
    lean = loss_and_grads(lean_fn, params, x, seed, validate=False)
    assert_same(plain, lean, device)
    assert lean_fn.elbo.fallbacks == 0


def test_lean_elbo_sequential_particles(seed):
    """Non-vectorized particles: the lean loop averages like Trace_ELBO's."""
    device = torch.device("cpu")
    model, x = setup_model(device)
    params = list(model.parameters())
    plain_fn = Trace_ELBO(num_particles=4)(model.model, model.guide)
    lean_fn = fast.LeanTrace_ELBO(num_particles=4)(model.model, model.guide)
    assert_same(
        loss_and_grads(plain_fn, params, x, seed, validate=True),
        loss_and_grads(lean_fn, params, x, seed, validate=False),
        device,
    )


def test_lean_elbo_respects_scale(seed):
    """poutine.scale (β, KL warm-up) multiplies the site densities on the lean path too."""
    device = torch.device("cpu")
    model, x = setup_model(device)
    params = list(model.parameters())
    scaled_model = poutine.scale(model.model, scale=0.3)
    scaled_guide = poutine.scale(model.guide, scale=0.3)
    only_z = poutine.scale(model.guide, scale=2.0)  # a scale on the guide alone
    for guide in (scaled_guide, only_z):
        assert_same(
            loss_and_grads(Trace_ELBO()(scaled_model, guide), params, x, seed, validate=True),
            loss_and_grads(
                fast.LeanTrace_ELBO(own_params=params)(scaled_model, guide),
                params,
                x,
                seed,
                validate=False,
            ),
            device,
        )


def test_lean_elbo_falls_back_for_score_function_sites(seed):
    """A guide site without rsample needs a score function: the lean path hands over."""
    device = torch.device("cpu")
    model, x = setup_model(device)
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

    lean_elbo = fast.LeanTrace_ELBO()
    assert_same(
        loss_and_grads(Trace_ELBO()(model_fn, guide_fn), params, x, seed, validate=True),
        loss_and_grads(lean_elbo(model_fn, guide_fn), params, x, seed, validate=False),
        device,
    )
    assert lean_elbo.fallbacks == 1


def test_lean_elbo_is_trace_elbo_under_validation(seed):
    """With validation on, Pyro's own checks run: an observation outside the support fails."""
    model, x = setup_model(torch.device("cpu"))
    loss_fn = loss_module(model, ObjectiveConfig())
    with pytest.raises(ValueError), pyro.validation_enabled(True):
        loss_fn(2 * x)


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
def test_fused_log_prob_matches_log_prob(fn):
    """Fused density sums = Distribution.log_prob summed, with particle broadcasting and scale."""
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 10, dtype=torch.float64)  # (particles, data, pixels)
    x = torch.bernoulli(torch.full((6, 10), 0.3, dtype=torch.float64))
    d = fn(logits)
    with pyro.validation_enabled(False):
        expected = d.log_prob(x)
        torch.testing.assert_close(fast.neg_log_prob_sum(d, x), -expected.sum())
        torch.testing.assert_close(fast.neg_log_prob_sum(d, x, 0.5), -0.5 * expected.sum())


def test_train_step_matches_plain_step(seed):
    """Three TrainStep calls (validation on the first only, lean loss) = three plain steps."""
    device = torch.device("cpu")
    runs = []
    for lean in (False, True):
        model, x = setup_model(device)
        loss_fn = loss_module(model, ObjectiveConfig(), lean=lean)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        step = fast.TrainStep(loss_fn, optimizer, validate="first" if lean else "always")
        pyro.set_rng_seed(seed)
        losses = [step(x) for _ in range(3)]
        runs.append((torch.stack(losses), [p.detach().clone() for p in model.parameters()]))
    torch.testing.assert_close(runs[0][0], runs[1][0])
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_train_step_validates_first_step_only(seed):
    """The first step sees Pyro's checks; later ones run with validation off; it is restored."""
    model, x = setup_model(torch.device("cpu"))
    step = fast.TrainStep(
        loss_module(model, ObjectiveConfig()), torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    with pytest.raises(ValueError):
        step(2 * x)  # outside the Bernoulli support: caught by the validated first step
    step(x)
    assert pyro.infer.util.is_validation_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast.TrainStep.check_finite(float("nan"), "epoch 1")
    assert "diverged" in str(caught[0].message)


@pytest.mark.parametrize("optimizer", ["pyro", "torch-after-fast-steps"])
def test_svi_step_still_works(seed, optimizer):
    """pyro.infer.SVI with a Pyro optimizer trains the same model/guide (param store path)."""
    model, x = setup_model(torch.device("cpu"))
    if optimizer == "torch-after-fast-steps":
        step = fast.TrainStep(
            loss_module(model, ObjectiveConfig()), torch.optim.Adam(model.parameters(), lr=1e-3)
        )
        for _ in range(3):
            step(x)
    before = [p.detach().clone() for p in model.parameters()]
    svi = SVI(model.model, model.guide, Adam({"lr": 1e-2}), loss=fast.LeanTrace_ELBO())
    losses = [svi.step(x) for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert "decoder$$$0.weight" in pyro.get_param_store()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_fast_log_weights_match_traced(device, seed):
    """ppl_vae.fast.log_weights = objectives.log_weights (traces) to float rounding, same draws
    (the fused Bernoulli and Normal-at-the-draw densities are the only differences)."""
    model, x = setup_model(device)
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        traced = log_weights(model.model, model.guide, x, 5)
    pyro.set_rng_seed(seed)
    with torch.no_grad():
        lean = fast.log_weights(model.model, model.guide, x, 5, plate_dim=-2)
    assert lean.shape == (5, x.shape[0])
    torch.testing.assert_close(lean, traced, **tolerances(device))


def test_log_likelihood_lean_equals_plain_and_reference(device, seed):
    """The IS estimate is the same number through traces, the lean path (recorded weights
    replayed from the second chunk of a shape on) and the reference."""
    model, x = setup_model(device)
    reference = ReferenceVAE(CONFIG).to(device=device, dtype=x.dtype)
    reference.load_state_dict(model.state_dict())
    estimates = []
    for fn in (
        lambda: log_likelihood(model, x, k=13, batch_size=4, particle_chunk=3, lean=False),
        lambda: log_likelihood(model, x, k=13, batch_size=4, particle_chunk=3),
        lambda: reference_log_likelihood(reference, x, k=13, batch_size=4, particle_chunk=3),
    ):
        pyro.set_rng_seed(seed)
        estimates.append(fn())
    torch.testing.assert_close(estimates[1], estimates[0], **tolerances(device))
    torch.testing.assert_close(estimates[2], estimates[0], **tolerances(device))


def test_captured_log_weights_replay_bit_for_bit(device, seed):
    """CapturedLogWeights records once a (shape, particles) key repeats and replays weights
    equal bit for bit to fast.log_weights', draws included."""
    model, x = setup_model(device)
    weights = fast.CapturedLogWeights(model)
    with torch.no_grad():
        for call in range(4):
            pyro.set_rng_seed(seed + call)
            expected = fast.log_weights(model.model, model.guide, x, 5, plate_dim=-2)
            pyro.set_rng_seed(seed + call)
            torch.testing.assert_close(weights(x, 5, -2), expected, rtol=0, atol=0)
    assert weights.replays == 3 and len(weights.graphs) == 1


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
    step = ReferenceStep(reference)
    assert torch.isfinite(step(x))


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


def test_fit_runs_the_fast_step(tmp_path, fake_data_dir, monkeypatch):
    """fit() trains through TrainStep: two epochs of finite losses on small fake data, the
    VAE's loss replayed from its second full batch on (capture is fit's default)."""
    import csv

    from ppl_vae.config import DataConfig, RunConfig, TrainConfig
    from ppl_vae.train import fit

    made: list[fast.CapturedELBO] = []
    real_init = fast.CapturedELBO.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(fast.CapturedELBO, "__init__", init)
    cfg = RunConfig(
        name="fast",
        runs_dir=tmp_path,
        model=VAEConfig(z_dim=2, hidden=(8,)),
        data=DataConfig(data_dir=fake_data_dir),
        train=TrainConfig(epochs=2, batch_size=32, device="cpu", progress=False),
    )
    run_dir = fit(cfg)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert all(torch.isfinite(torch.tensor(float(r["train_neg_elbo"]))) for r in rows)
    (captured,) = made
    from ppl_vae import data

    n_train = data.load(DataConfig(data_dir=fake_data_dir), "cpu").train.images.shape[0]
    full = n_train // 32
    # per epoch: full batches, then a partial one that runs lean (its key does not repeat);
    # the first full batch of the run is validated and runs lean, the second records
    assert len(captured.graphs) == 1
    assert captured.replays == 2 * full - 1


@pytest.mark.parametrize("num_particles", [1, 3])
def test_captured_elbo_matches_lean(device, seed, num_particles):
    """The recorded graph replays the lean loss exactly: values, gradients, the random stream."""
    model, x = setup_model(device)
    params = list(model.parameters())
    lean_fn = loss_module(model, ObjectiveConfig("trace", num_particles=num_particles))
    captured = fast.CapturedELBO(lean_fn, model)
    expected = loss_and_grads(lean_fn, params, x, seed, validate=False)
    for _ in range(3):  # a new key runs lean, the repeat records and replays, then replays
        assert_same(expected, loss_and_grads(captured, params, x, seed, validate=False), device)
    assert len(captured.graphs) == 1
    for _ in range(2):  # a new shape: a new graph once it repeats
        loss_and_grads(captured, params, x[:4], seed, validate=False)
    assert len(captured.graphs) == 2


def test_captured_train_step_matches_plain_step(seed, tmp_path, fake_data_dir):
    """TrainStep over CapturedELBO = the plain step, over several steps; fit accepts capture."""
    from ppl_vae.config import DataConfig, RunConfig, TrainConfig
    from ppl_vae.train import fit

    device = torch.device("cpu")
    runs = []
    for captured in (False, True):
        model, x = setup_model(device)
        loss_fn = loss_module(model, ObjectiveConfig(), lean=captured)
        if captured:
            loss_fn = fast.CapturedELBO(loss_fn, model)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        step = fast.TrainStep(loss_fn, optimizer, validate="first" if captured else "always")
        pyro.set_rng_seed(seed)
        runs.append(torch.stack([step(x) for _ in range(4)]))
    torch.testing.assert_close(runs[0], runs[1])
    cfg = RunConfig(
        name="captured",
        runs_dir=tmp_path,
        model=VAEConfig(z_dim=2, hidden=(8,)),
        data=DataConfig(data_dir=fake_data_dir),
        train=TrainConfig(epochs=1, batch_size=32, device="cpu", progress=False, capture=True),
    )
    assert (fit(cfg) / "checkpoint.pt").exists()


def test_neg_elbo_lean_batches_match_trace_elbo(seed):
    """evaluate.neg_elbo (first batch validated, then lean) = Trace_ELBO on every batch."""
    from ppl_vae.evaluate import neg_elbo

    model, x = setup_model(torch.device("cpu"))
    inputs = torch.cat([x, x.flip(0), x])
    pyro.set_rng_seed(seed)
    got = neg_elbo(model, inputs, ObjectiveConfig("trace"), batch_size=5)
    pyro.set_rng_seed(seed)
    plain = loss_module(model, ObjectiveConfig("trace"), lean=False)
    with torch.no_grad():
        expected = sum(plain(inputs[i : i + 5]).item() for i in range(0, inputs.shape[0], 5))
    assert got == pytest.approx(expected / inputs.shape[0], rel=1e-6)  # float32 accumulator


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("capture", [False, True])
def test_cuda_steps_do_not_synchronize(seed, capture):
    """After the validated first step (and the first lean one), a training step on CUDA makes
    no host synchronization: torch's sync debug mode turns any into an error."""
    device = torch.device("cuda")
    torch.manual_seed(seed)
    model = VAE(VAEConfig(z_dim=4, hidden=(32,))).to(device)
    x = torch.bernoulli(torch.full((64, 784), 0.3, device=device))
    loss_fn = loss_module(model, ObjectiveConfig())
    if capture:
        loss_fn = fast.CapturedELBO(loss_fn, model)
    step = fast.TrainStep(loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3))
    total = torch.zeros((), device=device)
    for _ in range(2):  # validated first step; first lean step (records the graph if captured)
        total += step(x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            total += step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(total).item()


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_every_registered_model_fast_paths_match(kind, seed):
    """For every model of the registry (default config, training mode, float64): the lean loss
    and its recorded replay (or, for a program that cannot be recorded, the lean loss it falls
    back to) equal Trace_ELBO (loss and gradients), and the lean IS weights equal the traced
    ones to float rounding."""
    torch.manual_seed(seed)
    model = build(default_config(kind)).double().train()
    x_dim = getattr(model.config, "x_dim", 784)
    x = torch.bernoulli(torch.full((5, x_dim), 0.4, dtype=torch.float64))
    params = [p for p in model.parameters() if p.requires_grad]
    device = torch.device("cpu")
    for hook in ("on_train_step",):  # models with step schedules: take one, as fit does
        if hasattr(model, hook):
            getattr(model, hook)(1)
    plain = loss_and_grads(
        loss_module(model, ObjectiveConfig(), lean=False), params, x, seed, validate=True
    )
    lean_fn = loss_module(model, ObjectiveConfig())
    assert_same(plain, loss_and_grads(lean_fn, params, x, seed, validate=False), device)
    captured = fast.CapturedELBO(lean_fn, model)
    with warnings.catch_warnings(record=True) as caught:  # unrecordable programs warn, run lean
        warnings.simplefilter("always")
        for _ in range(2):
            assert_same(plain, loss_and_grads(captured, params, x, seed, validate=False), device)
    if model.capturable:  # what fit records for this model is recordable, and replays
        assert not caught and captured.replays == 1
        assert fast.capture(lean_fn, model) is not lean_fn
    else:
        assert fast.capture(lean_fn, model) is lean_fn
    with torch.no_grad():
        pyro.set_rng_seed(seed)
        traced = log_weights(model.model, model.guide, x, 3)
        pyro.set_rng_seed(seed)
        lean = fast.log_weights(model.model, model.guide, x, 3, plate_dim=-2)
    torch.testing.assert_close(lean, traced, **tolerances(device))


def test_unrecordable_program_falls_back_to_lean(seed):
    """A program that reads a tensor value in Python cannot be recorded: CapturedELBO warns,
    leaves buffers and the random stream untouched, and returns the lean loss."""
    model, x = setup_model(torch.device("cpu"))
    model.register_buffer("calls", torch.zeros((), dtype=torch.float64))
    params = list(model.parameters())

    def guide(x):
        if bool(model.calls >= 0):  # data-dependent Python
            model.calls += 1
        model.guide(x)

    lean_fn = fast.LeanTrace_ELBO(own_params=params)(model.model, guide)
    expected = loss_and_grads(lean_fn, params, x, seed, validate=False)
    captured = fast.CapturedELBO(lean_fn, model)
    loss_and_grads(captured, params, x, seed, validate=False)  # a new key runs lean
    model.calls.zero_()
    with pytest.warns(UserWarning, match="cannot be recorded"):  # the repeat tries to record
        got = loss_and_grads(captured, params, x, seed, validate=False)
    assert_same(expected, got, torch.device("cpu"))
    assert model.calls.item() == 1  # the failed recording's update was undone
    assert captured.unrecordable is not None


def test_captured_elbo_follows_python_state(seed):
    """A weight the model holds as a Python float (a KL warm-up) is part of the graph's key:
    while it changes every call the loss is the lean one, exact; once it holds, a graph."""
    model, x = setup_model(torch.device("cpu"))
    params = list(model.parameters())
    model.z_weight = 0.1

    def scaled(fn):
        def run(x):
            with poutine.scale(scale=model.z_weight):
                fn(x)

        return run

    lean_fn = fast.LeanTrace_ELBO(own_params=params)(scaled(model.model), scaled(model.guide))
    captured = fast.CapturedELBO(lean_fn, model)
    for weight in (0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.5):
        model.z_weight = weight
        expected = loss_and_grads(lean_fn, params, x, seed, validate=False)
        got = loss_and_grads(captured, params, x, seed, validate=False)
        assert_same(expected, got, torch.device("cpu"))
    assert len(captured.graphs) == 1  # recorded once, at the second call with weight 0.4


def test_density_at_the_draw_matches_normal_log_prob(seed):
    """The guide's reparameterized Normal draw is torch's own (same random stream), and
    Σ log σ + ½ Σ ε² + n·c is −Normal.log_prob(z) summed, with the same gradients."""
    torch.manual_seed(seed)
    loc = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    raw = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    fn = dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1)
    # with Pyro validation on (its default), log_prob's checks stand: no shortcut
    assert fast.reparameterized_normal_draw(fn) is None
    with pyro.validation_enabled(False):
        torch.manual_seed(seed + 1)
        expected_z = fn.rsample()
        torch.manual_seed(seed + 1)
        z, eps = fast.reparameterized_normal_draw(fn)
        assert torch.equal(z, expected_z)
        for scale in (1.0, 0.3):
            expected = -(fn.log_prob(expected_z).sum() * scale)
            got = fast.neg_log_density_at_draw(fn, eps, scale)
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
        assert fast.reparameterized_normal_draw(dist.Bernoulli(logits=loc)) is None


def test_simplified_graph_is_bit_identical(seed):
    """simplify_graph's rewrites (constant folding, x − 0, x / 1, same-shape expand) change no
    bit of the loss or the gradients, in float32, and leave fewer operations to replay."""
    model = VAE(VAEConfig(z_dim=4, hidden=(16,), x_dim=20))
    x = torch.bernoulli(torch.full((6, 20), 0.4))
    params = list(model.parameters())
    results, graphs = [], []
    for simplify in (False, True):
        captured = fast.CapturedELBO(loss_module(model, ObjectiveConfig()), model, simplify)
        for _ in range(2):  # the second call records
            got = loss_and_grads(captured, params, x, seed, validate=False)
        assert captured.replays == 1
        results.append(got)
        graphs.append(next(iter(captured.graphs.values())))
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
    fast.simplify_graph(graph)
    assert len(graph.graph.nodes) == before
    x = torch.randn(3)
    for _ in range(2):
        assert torch.equal(graph(x), f(x))


def test_fit_loop_replays_once_the_kl_weight_holds(seed):
    """fit calls the model's step hook before every step; the VAE's KL warm-up changes its
    weight for ``warmup_steps`` steps, during which the loss runs lean; after, it replays.
    Every step equals the uncaptured step's loss (float64, same draws)."""
    config = VAEConfig(z_dim=3, hidden=(8,), x_dim=10, warmup_steps=4)
    x = torch.bernoulli(torch.full((6, 10), 0.4, dtype=torch.float64))
    losses, replays = [], []
    for capture in (False, True):
        torch.manual_seed(seed)
        model = VAE(config).double()
        loss_fn = loss_module(model, ObjectiveConfig())
        if capture:
            loss_fn = fast.capture(loss_fn, model)
        step = fast.TrainStep(loss_fn, torch.optim.Adam(model.parameters(), lr=1e-3))
        pyro.set_rng_seed(seed)
        run = []
        for i in range(9):
            model.on_train_step(i)
            run.append(step(x))
            replays.append(getattr(loss_fn, "replays", 0))
        losses.append(torch.stack(run))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-10, atol=1e-10)
    captured_replays = replays[9:]
    # weights 0.01 → 1 over steps 0..4 (lean), step 5 repeats step 4's key and records
    assert captured_replays[:5] == [0] * 5
    assert captured_replays[-1] == 4
