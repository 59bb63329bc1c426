#!/usr/bin/env bash
# The VAE-TracIn demo on the shipped demo data (demo/data: 5,000 MNIST digits + 100 letters), CPU-friendly:
#   1. train a beta-VAE (beta 4, z 128) on mnist_emnist_extra for 3000 iterations, checkpoints every 500
#      (resumes from the last checkpoint, so a rerun does not retrain);
#   2. self influences and data cleaning: do the letters get the highest self influence? (prints the detection AUC);
#   3. sanity check: is each of 32 training images its own strongest proponent? (prints Top-1 Acc.);
#   4. test influences of 8 test digits exported as jpgs.
# Results go to output/demo/, checkpoints to demo/checkpoints/ (both ignored by git).
# Run it with `make demo`, or `bash demo/run_demo.sh` from anywhere; PYTHON overrides the interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
# The demo always reads the shipped data (make demo sets the same); DEMO_DATA overrides it.
export VAE_TRACIN_DATA="${DEMO_DATA:-$ROOT/demo/data}"

CKPT=demo/checkpoints
OUT=output/demo
TEST_JPG="$OUT/images/test_mnist"
COMMON=(--beta 4 --latent_dim 128 --dataset mnist_emnist_extra --ckpt_root "$CKPT" --output_root "$OUT" --resume
        --ckpt_iter 3000)

banner() { printf '\n==== %s ====\n' "$*"; }

banner "1/4 train a beta-VAE on demo mnist_emnist_extra (5000 digits + 100 letters), checkpoints in $CKPT"
"$PY" Beta_VAE/main.py --dataset mnist_emnist_extra --seed 1 --optim sgd --lr 1e-4 --objective H --model MNIST \
    --batch_size 64 --z_dim 128 --max_iter 3000 --beta 4 --viz_on False --save_output False \
    --viz_name mnist_emnist_extra_beta4_z128_sgd --extra_size 100 --ckpt_every 500 --ckpt_dir "$CKPT" \
    --display_step 500

banner "2/4 self influences and data cleaning: are the 100 letters found? (detection AUC)"
"$PY" VAE_TracIn_selfinf.py "${COMMON[@]}"

banner "3/4 sanity check: is each of 32 training images its own strongest proponent? (Top-1 Acc.)"
"$PY" VAE_TracIn_testinf.py "${COMMON[@]}" --task train --test_num 32

banner "4/4 test influences of 8 demo test digits (indices 0-7, exported to $TEST_JPG)"
"$PY" tools/export_test_images.py --dataset mnist --indices 0-7 --out_dir "$TEST_JPG" --dset_dir "$VAE_TRACIN_DATA"
"$PY" VAE_TracIn_testinf.py "${COMMON[@]}" --task test --load_from_jpg --load_from_jpg_dir "$TEST_JPG"

banner "done: results (grids, plots, scores) are in these folders under $OUT"
find "$OUT" -mindepth 1 -type d ! -path "$TEST_JPG" | sort | while read -r dir; do
    n=$(find "$dir" -maxdepth 1 -type f \( -name '*.jpg' -o -name '*.png' -o -name '*.pdf' \) | wc -l)
    if [ "$n" -gt 0 ]; then
        printf '  %s  (%d images/plots)\n' "$dir" "$n"
    fi
done
