#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one command: under 8 minutes on one H100/H200.
#
#   make bench-gpu                              # make setup data, then this script (CUDA)
#   bash benchmarks/gpu_check.sh [--device cuda|cpu] [--tiny] [--out DIR] [--data-dir DIR]
#                                [--budget SECONDS]
#   bash benchmarks/gpu_check.sh --device cpu --tiny      # the dry run of tests/test_gpu_check.py
#
# Steps, each under `timeout` (the caps add up to 455 s on CUDA, and --budget, default 450 s,
# bounds their sum again; the machine check before them takes a few seconds):
#   1. the CUDA tests: pytest -m cuda
#   2. python -m benchmarks.step_overhead at batch 128, 1024 and 8192
#   3. python -m benchmarks.zoo_throughput: MLP VAE, conv VAE, VQ-VAE at the same batches
#   4. python -m benchmarks.eval_throughput: IS log p(x), k = 5000, the 10,000 test images
#   5. one default `ppl-vae train` on the device: seconds per epoch (metrics.csv)
#   6. python -m benchmarks.torchrun_world under torchrun --nproc-per-node 1: which process
#      group the distributed path joins (backend, world size, one all-reduce)
#   7. torchrun --nproc-per-node 1 -m ppl_vae train: seconds per epoch on that path
# --tiny shrinks every size (small batches, few steps and images, small k, one epoch of 1,000
# images) so that `--device cpu --tiny` runs every code path in about a minute on 2 cores, with
# one torch thread per process (OMP_NUM_THREADS=1 unless it is set): the dry run checks that
# every step runs and gives its figures, not the figures themselves.
#
# Each step prints the command it ran and its figures; its whole output goes to
# DIR/NN-STEP.log, and the results block (markdown, ready to paste into benchmarks/RESULTS.md)
# to DIR/results.md and to stdout. DIR is --out, else $OUT when set, else a fresh temp folder.
# A step that fails is recorded as "FAILED (rc N)" and the others still run. Exit status: 0 when
# every step gave its figures, 1 when one failed, 2 for a usage error or --device cuda without
# a CUDA device (one line on stderr, before anything runs).
#
# It installs nothing: it runs the Python that `make setup` installed (.venv/bin/python, or
# $PYTHON: an interpreter that can import ppl_vae's dependencies) on this checkout.
set -euo pipefail

prog=gpu_check.sh
die() {
    echo "$prog: error: $*" >&2
    exit 2
}
usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

device=cuda tiny=0 out=${OUT:-} data_dir="" budget=""
while (($#)); do
    case $1 in
        --device | --out | --data-dir | --budget)
            (($# >= 2)) || die "$1 needs a value (see --help)"
            case $1 in
                --device) device=$2 ;;
                --out) out=$2 ;;
                --data-dir) data_dir=$2 ;;
                --budget) budget=$2 ;;
            esac
            shift 2
            ;;
        --tiny) tiny=1 && shift ;;
        -h | --help) usage && exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ $device == cuda || $device == cpu ]] || die "--device $device: choose cuda or cpu"
[[ -z $budget || $budget =~ ^[0-9]+$ ]] || die "--budget $budget: a whole number of seconds"
[[ -z $data_dir || -d $data_dir ]] || die "--data-dir $data_dir: no such directory"

# paths given relative to where the script was started; it then runs in the repository root
[[ -z $out || $out == /* ]] || out=$PWD/$out
[[ -z $data_dir ]] || data_dir=$(cd "$data_dir" && pwd)
py=${PYTHON:-}
[[ -z $py || $py == /* || $py != */* ]] || py=$PWD/$py
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
py=${py:-.venv/bin/python}
command -v "$py" >/dev/null || die "no $py: run \`make setup\` first (or set PYTHON)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ((tiny)); then
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # steady on a shared CPU: no thread spinning
fi

# The machine, and the refusal of --device cuda without CUDA, before anything is written.
info_rc=0
info=$("$py" - "$device" "$data_dir" 2>&1 <<'EOF'
import os, platform, sys
from datetime import UTC, datetime
from pathlib import Path

import pyro
import torch

from benchmarks.common import cpu_model
from ppl_vae import data

device, data_dir = sys.argv[1], sys.argv[2]
if device == "cuda" and not torch.cuda.is_available():
    print(f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) sees no CUDA device")
    sys.exit(3)
if device == "cuda":
    props = torch.cuda.get_device_properties(0)
    name = f"{props.name} ({props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs)"
else:
    name = f"CPU {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
folders = [Path(data_dir)] if data_dir else [data.DEBIAN_DIRS["fashion-mnist"]]
folders.append(data.cache_dir() / "FashionMNIST" / "raw")
found = next((f for f in folders if data.find_idx_files(f) is not None), None)
fields = {
    "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
    "device": name,
    "cpu": f"{cpu_model()} ({os.cpu_count()} cores)",
    "torch": torch.__version__,
    "cuda": f"CUDA {torch.version.cuda}, cuDNN {cudnn}" if torch.version.cuda else "CPU build",
    "pyro": pyro.__version__,
    "python": platform.python_version(),
    "data": str(found) if found else "no Fashion-MNIST found here (benchmarks time random pixels)",
}
for key, value in fields.items():
    print(f"@{key}\t{value}")
EOF
) || info_rc=$?
if ((info_rc == 3)); then
    die "--device cuda: ${info##*$'\n'}; run on a GPU machine, or --device cpu --tiny for the dry run"
elif ((info_rc != 0)); then
    die "$py could not describe the machine (rc $info_rc): ${info##*$'\n'}"
fi
field() { sed -n "s/^@$1\t//p" <<<"$info"; }

if [[ -z $out ]]; then
    out=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)
scratch=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_scratch.XXXXXX")  # run folders: not in $out
trap 'rm -rf "$scratch"' EXIT
train_data=()
if [[ -n $data_dir ]]; then
    # ppl-vae gets --data.data-dir; the benchmark scripts read DataConfig()'s sources, of which
    # $PPL_VAE_DATA/FashionMNIST/raw is the last one: the same files, linked there
    train_data=(--data.data-dir "$data_dir")
    files=$data_dir
    [[ ! -d $data_dir/FashionMNIST/raw ]] || files=$data_dir/FashionMNIST/raw
    mkdir -p "$scratch/data/FashionMNIST/raw"
    ln -s "$files"/* "$scratch/data/FashionMNIST/raw/"
    export PPL_VAE_DATA=$scratch/data
fi
driver=""
if [[ $device == cuda ]] && command -v nvidia-smi >/dev/null; then
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1) || true
fi
git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown commit")
if [[ -n $(git status --porcelain 2>/dev/null | head -1) ]]; then
    git_rev="$git_rev + uncommitted changes"
fi

how="bash benchmarks/gpu_check.sh --device $device"
((tiny == 0)) || how="$how --tiny"
echo "$prog: $how; logs and results in $out"
echo "# $(field device) | torch $(field torch) | $(field cuda) | pyro $(field pyro)"

if ((tiny)); then
    batches=(16 32)
    step_sizes=(--images-per-sample 64 --repeats 3 --warmup 3)
    zoo_sizes=(--images-per-sample 32 --repeats 2 --warmup 2)
    caps=(60 45 45 45 90 30 90)
    budget=${budget:-420}
else
    batches=(128 1024 8192)
    step_sizes=() zoo_sizes=()
    caps=(70 55 55 80 110 25 60)
    budget=${budget:-450}
fi
deadline=$((SECONDS + budget))
step_no=0 failures=0 failed_step=0
rows=()

# `timeout` runs its command in a process group of its own, out of reach of a Ctrl-C: pass it on.
running=""
stop() {
    [[ -z $running ]] || kill -TERM "$running" 2>/dev/null || true
    wait || true
    echo "$prog: interrupted; logs so far in $out" >&2
    exit 130
}
trap stop INT TERM

# run_step NAME CAP CMD...: CMD under `timeout` (at most CAP s and what is left of the budget),
# its output into $log; sets rc, wall (seconds), cap and cmd (the command as typed).
run_step() {
    local name=$1 left=$((deadline - SECONDS)) start=$EPOCHREALTIME
    cap=$2
    shift 2
    step_no=$((step_no + 1))
    log=$(printf '%s/%02d-%s.log' "$out" "$step_no" "$name")
    cmd=$(printf '%q ' "$@")
    cmd=${cmd% }
    ((cap <= left)) || cap=$left
    echo
    echo "== $step_no. $name (timeout ${cap}s)"
    echo "\$ $cmd"
    rc=0 not_run=0
    if ((cap < 5)); then
        echo "not run: the time budget (--budget $budget) is spent" >"$log"
        rc=124 not_run=1
    else
        timeout --kill-after=5 "$cap" "$@" >"$log" 2>&1 </dev/null &
        running=$!
        wait "$running" || rc=$?
        running=""
    fi
    wall=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    echo "   rc $rc, ${wall} s, log $log"
}

# row FIGURE VALUE: one figure of the step just run, with its command.
row() {
    echo "   $1: $2"
    rows+=("| $1 | $2 | \`$cmd\` (${wall} s) |")
}

# failed FIGURE [DETAIL]: the step just run failed (or gave no figure).
failed() {
    local why="FAILED (rc $rc)"
    ((rc != 0)) || why="FAILED (rc 0, no figure in its log)"
    ((rc != 124 && rc != 137)) || why="FAILED (rc $rc: stopped at its ${cap} s limit)"
    ((not_run == 0)) || why="FAILED (not run: the --budget of $budget s was spent)"
    ((failed_step == step_no)) || failures=$((failures + 1))
    failed_step=$step_no
    row "$1" "$why${2:+; $2}"
}

# epoch_figures METRICS_CSV: "median s/epoch over N epochs ..." of a run's metrics.csv.
epoch_figures() {
    [[ -f $1 ]] || return 1
    "$py" - "$1" <<'EOF'
import csv, statistics, sys

rows = list(csv.DictReader(open(sys.argv[1])))
if not rows:
    sys.exit(1)
seconds = [float(r["seconds"]) for r in rows]
rate = statistics.median(float(r["images_per_s"]) for r in rows)
later = f"; epoch 1 {seconds[0]:.2f} s" if len(seconds) > 1 else ""
print(
    f"{statistics.median(seconds):.2f} s/epoch, median of {len(seconds)} epoch(s)"
    f" (min {min(seconds):.2f}, max {max(seconds):.2f}{later}), {rate:,.0f} images/s;"
    f" last val -ELBO {float(rows[-1]['val_neg_elbo']):.1f}"
)
EOF
}

# 1. the CUDA tests (on a CPU they all skip: reported, not failed)
run_step cuda-tests "${caps[0]}" "$py" -m pytest -m cuda -q -rfEs -p no:cacheprovider \
    --basetemp "$scratch/pytest"
counts=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|errors?)' "$log" | tail -n 1 |
    grep -Eo '[0-9]+ (passed|failed|skipped|errors?|xfailed|xpassed)' | paste -sd, - |
    sed 's/,/, /g') || true
if ((rc == 0)) && [[ $device == cuda && $counts != *passed* ]]; then
    failed "CUDA tests (pytest -m cuda)" "none passed on the GPU: ${counts:-no counts in the log}"
elif ((rc == 0)) && [[ -n $counts ]]; then
    [[ $device == cuda || $counts == *passed* ]] || counts="$counts (no CUDA device here)"
    row "CUDA tests (pytest -m cuda)" "$counts"
elif ((rc == 5)) && [[ $device == cpu ]]; then
    row "CUDA tests (pytest -m cuda)" "0 selected (no CUDA device here)"
else
    failed "CUDA tests (pytest -m cuda)" "$counts"
fi

# 2. the training step against the hand-written one
run_step step-overhead "${caps[1]}" "$py" -m benchmarks.step_overhead --device "$device" \
    --batch-sizes "${batches[@]}" "${step_sizes[@]}"
for b in "${batches[@]}"; do
    value=$(awk -v b="$b" '
        $1 == "batch" { cur = $2 }
        cur == b && $1 == "ppl_vae:" { rate = $(NF - 1) }
        $1 == "ratio" && $4 == b {
            split($2, who, "/"); r[who[1]] = $6; iqr[who[1]] = $8; sub(/\)$/, "", iqr[who[1]])
        }
        END {
            if (r["ppl_vae"] == "" || rate == "") exit 1
            printf "ppl_vae %s× the hand-written step (IQR %s), %s images/s", r["ppl_vae"],
                iqr["ppl_vae"], rate
            if (r["ppl_vae_lean"] != "") printf "; unrecorded lean %s×", r["ppl_vae_lean"]
            if (r["ppl_vae_plain"] != "") printf "; --no-fast %s×", r["ppl_vae_plain"]
        }' "$log") || value=""
    if ((rc == 0)) && [[ -n $value ]]; then
        row "training step, batch $b" "$value"
    else
        failed "training step, batch $b" "$value"
    fi
done

# 3. the model zoo's training images/s
run_step zoo-throughput "${caps[2]}" "$py" -m benchmarks.zoo_throughput --device "$device" \
    --batch-sizes "${batches[@]}" "${zoo_sizes[@]}"
for model in vae_mlp vae_conv vqvae; do
    value=$(awk -v m="$model" '
        $1 == "images/s" && $2 == m { s = s (s == "" ? "" : ", ") "batch " $4 ": " $6 }
        END { if (s == "") exit 1; print s " images/s" }' "$log") || value=""
    if ((rc == 0)) && [[ -n $value ]]; then
        row "zoo $model, training" "$value"
    else
        failed "zoo $model, training" "$value"
    fi
done

# 4. importance-sampled log p(x), as ppl-vae evaluate runs it
if ((tiny)); then images=200 k=20; else images=10000 k=5000; fi
run_step eval-throughput "${caps[3]}" "$py" -m benchmarks.eval_throughput --device "$device" \
    --images "$images" --k "$k" --repeats 1 --only-ppl-vae
value=$(awk -v n="$images" -v k="$k" '
    $1 == "ppl_vae:" {
        for (i = 1; i <= NF; i++) if ($i == "images/s") rate = $(i - 1)
        printf "%.1f s for %d test images at k = %d (%s images/s)", $2 / 1000, n, k, rate
        found = 1
    }
    END { exit !found }' "$log") || value=""
if ((rc == 0)) && [[ -n $value ]]; then
    row "IS log p(x), k = $k" "$value"
else
    failed "IS log p(x), k = $k" "$value"
fi

# 5. one default training run on the device; 7. the same through torchrun
train_args=(--train.device "$device" --runs-dir "$scratch/runs" --no-train.progress
    "${train_data[@]}")
tiny_train=(--train.epochs 1 --data.train-subset 1000 --data.val-size 500 --eval.k 5)
if ((tiny)); then
    run_step train "${caps[4]}" "$py" -m ppl_vae train "${train_args[@]}" --name default \
        "${tiny_train[@]}"
else
    run_step train "${caps[4]}" "$py" -m ppl_vae train "${train_args[@]}" --name default
fi
value=$(epoch_figures "$scratch/runs/default/metrics.csv") || value=""
if ((rc == 0)) && [[ -n $value ]]; then
    row "ppl-vae train (default), per epoch" "$value"
    row "ppl-vae train (default), whole command" \
        "${wall} s (training, test-set evaluation, figures, report)"
else
    failed "ppl-vae train (default), per epoch" "$value"
fi

run_step torchrun-world "${caps[5]}" "$py" -m torch.distributed.run --standalone \
    --nproc-per-node 1 -m benchmarks.torchrun_world --device "$device"
value=$(grep -m1 '^process group: ' "$log") || value=""
if ((rc == 0)) && [[ -n $value ]]; then
    row "torchrun --nproc-per-node 1: ppl_vae's process group" "${value#process group: }"
else
    failed "torchrun --nproc-per-node 1: ppl_vae's process group" "$value"
fi

if ((tiny)); then
    torchrun_train=("${tiny_train[@]}")
else
    torchrun_train=(--train.epochs 5 --eval.k 100)
fi
run_step torchrun-train "${caps[6]}" "$py" -m torch.distributed.run --standalone \
    --nproc-per-node 1 -m ppl_vae train "${train_args[@]}" --name torchrun-1 "${torchrun_train[@]}"
value=$(epoch_figures "$scratch/runs/torchrun-1/metrics.csv") || value=""
if ((rc == 0)) && [[ -n $value ]]; then
    row "torchrun --nproc-per-node 1 ppl-vae train, per epoch" "$value"
else
    failed "torchrun --nproc-per-node 1 ppl-vae train, per epoch" "$value"
fi

# The results block.
{
    if ((tiny)); then
        echo "## gpu_check.sh dry run, $(field date): tiny sizes, not figures to record"
    else
        echo "## GPU check: $(field device | sed 's/ (.*//'), $(field date)"
    fi
    echo
    echo "\`$how\` on $git_rev: $SECONDS s in all, $failures step(s) failed."
    echo "Device: $(field device)${driver:+, driver $driver}. Host CPU: $(field cpu)."
    echo "torch $(field torch), $(field cuda),"
    echo "pyro-ppl $(field pyro), Python $(field python). Data: $(field data)."
    echo
    echo "| figure | value | command (its wall time) |"
    echo "|---|---|---|"
    printf '%s\n' "${rows[@]}"
} >"$out/results.md"
echo
cat "$out/results.md"
echo
echo "$prog: results block in $out/results.md"
((failures == 0)) || exit 1
