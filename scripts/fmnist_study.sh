#!/usr/bin/env bash
# The Fashion-MNIST study of docs/results_fashion_mnist.md, through train.py -m, then its reports.
#
#   bash scripts/fmnist_study.sh [OUT_DIR]        # default multirun/fmnist_study; about 1 h 50 min on 2 CPU cores
#   STAGE=report bash scripts/fmnist_study.sh     # only the tables and plots, from an existing OUT_DIR
#
# Two sweeps run side by side, one CPU thread each (the fmnist presets set trainer.threads=1):
#   1. β selection on the validation split (seed 0, global allocation, 95/98/99%): raw β_final 10 / 100,
#      kept_mean β_final 1 / 2 / 5 / 20;
#   2. the grid, 3 seeds: dense; spartan (raw β_final 10, the best raw value of stage 1), topkast, magnitude at
#      90/95/98/99% under global and ERK allocation; spartan with beta_scale=kept_mean at β_final 1 (the best
#      kept_mean value of stage 1), both allocations;
#   3. Spartan at 95% (ERK) with a cubic density schedule, and with a shorter fine-tune (10% of the steps).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-multirun/fmnist_study}
python=${PYTHON:-.venv/bin/python}
sweep() { "$python" train.py -m experiment=fmnist_spartan_s95 logger=none "$@"; }

if [ "${STAGE:-all}" != report ]; then
    mkdir -p "$out"
    # Stage 1: β selection (validation top-1 decides).
    (sweep sparsity.target=0.95,0.98,0.99 sparsity.beta_scale=raw sparsity.beta_final=10,100 \
        hydra.sweep.dir="$out/beta_raw"
     sweep sparsity.target=0.95,0.98,0.99 sparsity.beta_scale=kept_mean sparsity.beta_final=1 \
        hydra.sweep.dir="$out/beta_kept_mean_1") > "$out/stage1_a.log" 2>&1 &
    (sweep sparsity.target=0.95,0.98,0.99 sparsity.beta_scale=kept_mean sparsity.beta_final=5,20 \
        hydra.sweep.dir="$out/beta_kept_mean"
     sweep sparsity.target=0.95,0.98,0.99 sparsity.beta_scale=kept_mean sparsity.beta_final=2 \
        hydra.sweep.dir="$out/beta_kept_mean_2") > "$out/stage1_b.log" 2>&1 &
    wait
    # Stage 2: the grid, one stream per allocation.
    grid() {
        sweep sparsity.method=spartan,topkast,magnitude sparsity.target=0.9,0.95,0.98,0.99 \
            sparsity.allocation="$1" sparsity.beta_final=10 seed=0,1,2 hydra.sweep.dir="$out/main_$1"
        sweep sparsity.beta_scale=kept_mean sparsity.beta_final=1 sparsity.target=0.9,0.95,0.98,0.99 \
            sparsity.allocation="$1" seed=0,1,2 hydra.sweep.dir="$out/kept_mean_$1"
    }
    ("$python" train.py -m experiment=fmnist_dense logger=none seed=0,1,2 hydra.sweep.dir="$out/dense"
     grid global) > "$out/stage2_global.log" 2>&1 &
    grid erk > "$out/stage2_erk.log" 2>&1 &
    wait
    # Stage 3: two schedule changes tried for Spartan at 95% (ERK), where it only ties Top-KAST.
    sweep sparsity.allocation=erk sparsity.density_schedule=cubic seed=0,1,2 hydra.sweep.dir="$out/tried_cubic" \
        > "$out/stage3_a.log" 2>&1 &
    sweep sparsity.allocation=erk sparsity.finetune_frac=0.1 seed=0,1,2 hydra.sweep.dir="$out/tried_ft01" \
        > "$out/stage3_b.log" 2>&1 &
    wait
fi

report() { "$python" scripts/sweep_report.py "$@"; }
report "$out"/beta_raw "$out"/beta_kept_mean* --metric val_top1 --out docs/fmnist/beta_selection
report "$out"/dense "$out"/main_global "$out"/main_erk --out docs/fmnist/methods
report "$out"/main_global "$out"/main_erk "$out"/kept_mean_global "$out"/kept_mean_erk \
    --where sparsity.method=spartan --out docs/fmnist/beta_scale
report "$out"/main_erk "$out"/tried_cubic "$out"/tried_ft01 --where sparsity.method=spartan \
    --where sparsity.target=0.95 --metric val_top1 --out docs/fmnist/tried_95
# One run of each of the two methods that differ most at 98% (global allocation, seed 0), drawn from metrics.jsonl.
for method in spartan topkast; do
    run=$(ls -d "$out"/main_global/*seed=0,*sparsity.method=$method,sparsity.target=0.98)
    "$python" scripts/plot_run.py "$run" --out "docs/fmnist/${method}_s98_global_seed0"
done
