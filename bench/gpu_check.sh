#!/usr/bin/env bash
# Every GPU-side speed number of issue 5 in one go (about 10 minutes on an H100/H200). Not run yet: no GPU
# was lent to the session that wrote it. Usage, from the repository root on the GPU machine:
#
#   bash bench/gpu_check.sh [FASHION_MNIST_DIR]     # default: data/fashion-mnist (carry the 4 .gz files)
#
# Writes each table to $OUT (or ./gpu_check_out) and to stdout. Needs a Python with gangen's dependencies
# ($PYTHON, default python). Parts run under their own time limit, so a slow part cannot eat the rest.
set -u
FMNIST=${1:-data/fashion-mnist}
PY=${PYTHON:-python}
DEST=${OUT:-gpu_check_out}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
ls "$FMNIST"/train-images-idx3-ubyte.gz "$FMNIST"/train-labels-idx1-ubyte.gz >/dev/null || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DEST/gpu.txt"
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$DEST/gpu.txt"

part() {  # part NAME SECONDS ARGS...: one throughput table, cut off after SECONDS
    local name=$1 limit=$2
    shift 2
    echo "== $name: bench/throughput.py $*" | tee "$DEST/$name.txt"
    timeout "$limit" $PY bench/throughput.py --device cuda --root "$FMNIST" --workers 8 "$@" 2>&1 | tee -a "$DEST/$name.txt"
}

# 1. bs128: baseline (8 workers) vs gangen defaults (bf16-mixed, channels_last, fused Adam, on_device auto),
#    and one change at a time: fp32, DataLoader instead of on-device batches, NCHW, torch.compile.
part bs128 240 --batch_size 128 --steps 200 --warmup 30 --repeats 2 \
    --variants gangen gangen_fp32 gangen_loader gangen_nchw gangen_compile
# 2. bs1024 (target: >= 100k img/s on an H200): the same variants but the loader one.
part bs1024 200 --batch_size 1024 --steps 60 --warmup 15 --repeats 2 \
    --variants gangen gangen_fp32 gangen_nchw gangen_compile
# 3. FID/KID/IS evaluation time of 10k images against cached real statistics (random-valued weights, same cost).
echo "== eval: bench/eval_speed.py --num_samples 10000 --device cuda" | tee "$DEST/eval.txt"
timeout 120 $PY bench/eval_speed.py --num_samples 10000 --device cuda --batch_size 250 2>&1 | tee -a "$DEST/eval.txt"
