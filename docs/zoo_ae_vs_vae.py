"""Score prior samples of the zoo's autoencoders under its VAE (README, "Model zoo").

Usage: python docs/zoo_ae_vs_vae.py RUNS_DIR  (after docs/zoo_runs.sh). Draws 500 images
x ~ p(x|z), z ~ N(0, I) from each model with seed 0 and prints their mean importance-sampled
log p(x) (k = 50) under the MLP VAE, with standard errors, next to the test images'.
"""

import math
import sys
from pathlib import Path

import torch

from ppl_vae import data, runs
from ppl_vae.metrics import log_likelihood


def main(runs_dir: Path) -> None:
    _, vae, _ = runs.load_model(runs_dir / "vae-mlp")
    cfg = runs.read_config(runs_dir / "vae-mlp")
    test = data.eval_inputs(data.load(cfg.data).test, "static")[:500]
    sets = {"test images": test}
    for name in ("vae-mlp", "ae", "ae-plain"):
        if (runs_dir / name).is_dir():
            model = runs.load_model(runs_dir / name)[1]
            torch.manual_seed(0)
            sets[f"{name} samples"] = torch.bernoulli(model.sample(500))
    torch.manual_seed(0)
    for name, x in sets.items():
        log_px = log_likelihood(vae, x, k=50)
        se = log_px.std().item() / math.sqrt(log_px.numel())
        print(f"{name:>18}: log p(x) under vae-mlp = {log_px.mean().item():8.1f} ± {se:.1f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
