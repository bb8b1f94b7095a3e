"""Shared fixtures: a fixed seed per test, a clean Pyro param store, small real data.

Also the bookkeeping of the statistical tests (see ``tests/stats.py``): every
``@pytest.mark.stat(comparisons=N)`` test must take the ``seed`` fixture and make exactly its
declared ``N`` comparisons; the declarations of the whole suite must add up to
``stats.COMPARISONS``; and ``--stat-seeds 0-199`` reruns the statistical tests once per seed and
reports the observed failure rate next to the budget.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pyro
import pytest
import stats
import torch

from ppl_vae import data
from ppl_vae.config import DataConfig

TESTS = Path(__file__).resolve().parent
SEEDS = pytest.StashKey[list]()
DECLARED = pytest.StashKey[int]()
OUTCOMES = pytest.StashKey[dict]()  # seed -> {test name: (passed, declared comparisons)}
Z_SCORES = pytest.StashKey[list]()  # the two-sided z-scores of a sweep


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Every test starts with an empty param store and Pyro's validation on."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture
def seed(request) -> int:
    """The seed of a test: 0, so that CI is deterministic; each of ``--stat-seeds`` in a sweep."""
    value = getattr(request, "param", 0)
    pyro.set_rng_seed(value)
    return value


@contextlib.contextmanager
def one_torch_thread():
    """Run a block with one torch thread: the small tensors of Monte Carlo loops and tiny
    training runs go many times faster without OpenMP hand-offs when other jobs share the
    cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def single_thread():
    """The test runs with one torch thread (see :func:`one_torch_thread`)."""
    with one_torch_thread():
        yield


@pytest.fixture
def linear_gaussian():
    """A fixed linear-Gaussian model (x_dim 5, z_dim 3, σ 0.8) in float64, its guide set to the
    exact posterior, and four observations drawn from it: ``(model, x)``."""
    from ppl_vae.models.linear import LinearGaussian, LinearGaussianConfig

    gen = torch.Generator().manual_seed(2026)
    model = LinearGaussian(LinearGaussianConfig(z_dim=3, x_dim=5, x_scale=0.8)).double()
    with torch.no_grad():
        model.decoder.linear.weight.copy_(torch.randn(5, 3, generator=gen, dtype=torch.float64))
        model.decoder.linear.bias.copy_(torch.randn(5, generator=gen, dtype=torch.float64))
        marginal = model.marginal()
        x = marginal.loc + torch.randn(4, 5, generator=gen, dtype=torch.float64) @ (
            marginal.scale_tril.T
        )
    model.set_guide_to_posterior()
    return model, x


def write_fake_idx(folder: Path, n_train: int = 120, n_test: int = 40, gz: bool = True) -> Path:
    """Four small IDX files with random 28×28 images, as the datasets ship them."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    suffix = ".gz" if gz else ""
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
        data.write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", images)
        data.write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture
def fake_data_dir(tmp_path: Path) -> Path:
    return write_fake_idx(tmp_path / "idx")


@pytest.fixture(scope="session")
def fashion() -> data.Dataset:
    """Real Fashion-MNIST on the CPU (Debian copy, else torchvision's download)."""
    return data.load(DataConfig(), "cpu")


REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300):
    """Run ``ppl-vae ARGS`` in a subprocess (this checkout's code, progress bars off)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


# ----------------------------------------------------------------------------- statistical tests


def parse_seeds(text: str) -> list[int]:
    """``"0-199"`` → 0..199; ``"1,5,9"`` and mixtures such as ``"0-9,100"`` work too."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    if not seeds or len(set(seeds)) != len(seeds):
        raise pytest.UsageError(f"--stat-seeds {text!r}: give distinct seeds like 0-199 or 1,5,9")
    return seeds


def pytest_addoption(parser):
    parser.addoption(
        "--stat-seeds",
        metavar="SEEDS",
        help="rerun every @stat test once per seed (e.g. 0-199) and report the observed "
        "failure rate against the budget of tests/stats.py; combine with -m 'stat and not slow'",
    )


def pytest_configure(config):
    option = config.getoption("--stat-seeds")
    config.stash[SEEDS] = parse_seeds(option) if option else []
    config.stash[OUTCOMES] = {}
    config.stash[Z_SCORES] = []


def pytest_generate_tests(metafunc):
    seeds = metafunc.config.stash[SEEDS]
    if seeds and "seed" in metafunc.fixturenames and metafunc.definition.get_closest_marker("stat"):
        metafunc.parametrize("seed", seeds, indirect=True, ids=[f"seed{s}" for s in seeds])


def _declared(item) -> int:
    marker = item.get_closest_marker("stat")
    comparisons = marker.kwargs.get("comparisons")
    if not isinstance(comparisons, int) or comparisons < 1:
        raise pytest.UsageError(f"{item.nodeid}: mark it @pytest.mark.stat(comparisons=N), N >= 1")
    if "seed" not in item.fixturenames:
        raise pytest.UsageError(f"{item.nodeid}: a stat test must take the `seed` fixture")
    return comparisons


def _without_seed(item) -> str:
    """An item's name apart from the sweep's seed (its other parameters included)."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    others = ",".join(f"{name}={value!r}" for name, value in params.items() if name != "seed")
    return f"{item.nodeid.split('[')[0]}[{others}]" if others else item.nodeid.split("[")[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Check the declared comparisons before ``-m``/``-k`` deselect anything."""
    per_test = {_without_seed(i): _declared(i) for i in items if i.get_closest_marker("stat")}
    declared = sum(per_test.values())
    config.stash[DECLARED] = declared
    targets = {(config.invocation_params.dir / arg.split("::")[0]).resolve() for arg in config.args}
    whole_suite = targets <= {TESTS, TESTS.parent} and not any("::" in a for a in config.args)
    if declared > stats.COMPARISONS or (whole_suite and declared != stats.COMPARISONS):
        raise pytest.UsageError(
            f"the stat tests declare {declared} comparisons but tests/stats.py budgets "
            f"COMPARISONS = {stats.COMPARISONS}; set it to the declared total so that k is right"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    stats.reset_count()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("stat")
    if marker is None or call.when != "call":
        return report
    made, declared = stats.comparisons_made(), marker.kwargs["comparisons"]
    if report.passed and made != declared:
        report.outcome = "failed"
        report.longrepr = (
            f"declared @pytest.mark.stat(comparisons={declared}) but made {made} comparisons; "
            "fix the declaration (and stats.COMPARISONS) so that the critical value is right"
        )
    if item.config.stash[SEEDS]:
        seed = item.callspec.params["seed"]
        runs = item.config.stash[OUTCOMES].setdefault(seed, {})
        runs[_without_seed(item)] = (report.passed, declared)
        item.config.stash[Z_SCORES].extend(stats.z_scores())
    return report


def binomial_upper_bound(failures: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper confidence bound for a binomial proportion."""

    def cdf(p: float) -> float:
        return sum(
            math.comb(trials, i) * p**i * (1 - p) ** (trials - i) for i in range(failures + 1)
        )

    low, high = failures / trials, 1.0
    for _ in range(60):  # bisection: cdf decreases in p
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) > 1 - confidence else (low, mid)
    return high


def pytest_terminal_summary(terminalreporter, config):
    declared = config.stash.get(DECLARED, 0)
    if not declared:
        return
    write = terminalreporter.write_line
    terminalreporter.section("statistical tests")
    write(
        f"budget {stats.BUDGET:g} per full run, split over COMPARISONS = {stats.COMPARISONS} "
        f"(Bonferroni): α = {stats.ALPHA:.3g}; k two-sided {stats.k_two_sided(200):.2f} at "
        f"n = 200 draws, {stats.k_two_sided(10**6):.2f} as n → ∞; one-sided "
        f"{stats.k_one_sided(200):.2f}, {stats.k_one_sided(10**6):.2f}"
    )
    outcomes = config.stash[OUTCOMES]
    if not outcomes:
        return
    failing = {
        seed: [name for name, (passed, _) in runs.items() if not passed]
        for seed, runs in outcomes.items()
    }
    bad = sorted(seed for seed, names in failing.items() if names)
    n = len(outcomes)
    selected = {sum(c for _, c in runs.values()) for runs in outcomes.values()}
    tests = max(len(runs) for runs in outcomes.values())
    write(
        f"sweep: {n} seeds × {tests} stat tests ({max(selected)} of {stats.COMPARISONS} "
        f"comparisons); seeds with a failing stat test: {len(bad)}/{n} = {len(bad) / n:.4g} "
        f"(one-sided 95% upper bound {binomial_upper_bound(len(bad), n):.3g}); "
        f"budget {stats.BUDGET:g} per full run"
    )
    z = torch.tensor(config.stash[Z_SCORES], dtype=torch.float64).abs()
    if z.numel():
        write(
            f"two-sided z-scores: {z.numel()}; |z| > 2: {(z > 2).double().mean():.2%} "
            f"(≈ 4.6 % expected), |z| > 3: {(z > 3).double().mean():.3%} (≈ 0.27 %), "
            f"largest {z.max():.2f} (comparisons within a test are correlated)"
        )
    if selected != {stats.COMPARISONS}:
        write(
            "note: not every comparison of the suite ran for every seed; the budget bounds "
            "the failure rate of full runs, a selection should fail less often"
        )
    for seed in bad:
        write(f"  seed {seed}: " + ", ".join(name.split("::")[-1] for name in failing[seed]))
