#!/usr/bin/env bash
# The model-zoo report runs (README "Model zoo"): small, CPU-feasible budgets on Fashion-MNIST,
# 10,000 training images, seed 0, on a 2-core CPU shared with other jobs. Run folders go to
# ${RUNS:-runs/zoo}; the sample grids (32 prior samples, seed 0) to docs/zoo/.
set -euo pipefail
RUNS=${RUNS:-runs/zoo}
COMMON=(--data.train-subset 10000 --runs-dir "$RUNS" --no-train.progress)
ppl-vae train vqvae "${COMMON[@]}" --name vqvae --train.epochs 3 --model.code-prior.epochs 5
ppl-vae train vqvae "${COMMON[@]}" --name vqvae-ema --train.epochs 3 --model.ema \
    --model.code-prior.epochs 5
ppl-vae train ae "${COMMON[@]}" --name ae --train.epochs 5
ppl-vae train vae "${COMMON[@]}" --name vae-mlp --train.epochs 5 --eval.k 50
ppl-vae train vae "${COMMON[@]}" --name vae-conv --train.epochs 3 --model.arch conv --eval.k 10
ppl-vae train ae "${COMMON[@]}" --name ae-plain --train.epochs 5 --no-model.prior
for run in vqvae vqvae-ema ae ae-plain vae-mlp vae-conv; do
    ppl-vae sample "$RUNS/$run" -n 32 -o "docs/zoo/$run-samples.png"
done
python docs/zoo_ae_vs_vae.py "$RUNS"
