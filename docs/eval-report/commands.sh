#!/usr/bin/env bash
# The issue-6 report run: Fashion-MNIST, default VAE (784-512-256-32, softplus, Bernoulli),
# full 50,000 training images, batch 128, Adam 1e-3, seed 0, on a shared 2-core CPU.
# Started for 10 epochs, stopped after 4 (time budget), then finalized with --resume.
set -euo pipefail
R=${RUNS:-runs}/fmnist-vae
ppl-vae train vae --name fmnist-vae --runs-dir "${RUNS:-runs}" --train.epochs 10 --eval.k 100 \
    --no-train.progress                      # interrupted after epoch 4
ppl-vae train --resume "$R" --train.epochs 4  # final evaluation (k = 100, full test set) + report
ppl-vae diagnose "$R" --device cpu  # defaults: 2 NUTS images, 100 + 100 steps; 1m43s
ppl-vae evaluate "$R" --k 5000 --images 1000 --device cpu                                # 1m54s
ppl-vae report "$R" --device cpu
