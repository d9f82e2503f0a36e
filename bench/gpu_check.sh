#!/usr/bin/env bash
# The GPU-side checks of the speed work, on an H100/H200. From the repository root on the GPU machine:
#
#   bash bench/gpu_check.sh [FASHION_MNIST_DIR [PART ...]]   # default: data/fashion-mnist (the 4 .gz files)
#
# PARTS (default: all but bs1024, 15-18 minutes: more than one 10-minute device call, so name them):
#   tests (~1.5 min), experiments (5-7 min: bench/experiments.py checked on the GPU, then batch 1024 with
#   and without each), bs1024 (~4 min: the batch-1024 rows of experiments only, leaner), bs128 (~3 min),
#   cli (~1 min), profile (~1 min), layers (~2.5 min), folder (~3 min).
# A session has 15 minutes of device time, the machine's start included: one call of under 10 minutes,
#   `tests bs1024 bs128`, gives the numbers that decide the open questions (README Speed).
#
# Writes each part's output to $OUT (or ./gpu_check_out) and to stdout. Needs a Python with gangen's
# dependencies ($PYTHON, default python). Every part runs under its own time limit, so a slow or failing
# part cannot eat the rest, and a failing variant leaves its row out of the table instead of stopping it.
# The tests read the default data root too: the .gz folder is linked to /usr/share/datasets/fashion-mnist
# when nothing is there (as root; otherwise link it yourself).
# The FID-time and torch.compile rows were measured once (README Speed) and are not repeated here:
#   bench/throughput.py ... --variants gangen_compile_ro --eval_samples 10000
set -u
FMNIST=${1:-data/fashion-mnist}
shift $(($# > 0 ? 1 : 0))
PARTS=" ${*:-tests experiments bs128 cli profile layers folder} "
want() { [[ $PARTS == *" $1 "* ]]; }
PY=${PYTHON:-python}
DEST=${OUT:-gpu_check_out}
mkdir -p "$DEST"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ls "$FMNIST"/train-images-idx3-ubyte.gz "$FMNIST"/t10k-images-idx3-ubyte.gz >/dev/null || exit 2
if [ ! -e /usr/share/datasets/fashion-mnist ]; then
    mkdir -p /usr/share/datasets && ln -sfn "$(cd "$FMNIST" && pwd)" /usr/share/datasets/fashion-mnist \
        || echo "could not link $FMNIST to /usr/share/datasets/fashion-mnist: tests reading the default root fail"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$DEST/gpu.txt"
$PY -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$DEST/gpu.txt"
T0=$(date +%s)

# 1. Correctness of the CUDA-graph step: graphed fits equal eager fits (fp32, and R1 + EMA), bf16 trains,
#    the default (auto) captures where it can and falls back to the eager step where it cannot.
if want tests; then
    echo "== tests/test_gpu_step.py" | tee "$DEST/tests.txt"
    timeout 100 $PY -m pytest -q -p no:cacheprovider -rf tests/test_gpu_step.py 2>&1 | tail -30 | tee -a "$DEST/tests.txt"
fi

part() {  # part NAME SECONDS ARGS...: one throughput table, cut off after SECONDS
    local name=$1 limit=$2
    shift 2
    echo "== $name: bench/throughput.py $*" | tee "$DEST/$name.txt"
    timeout "$limit" $PY bench/throughput.py --device cuda --root "$FMNIST" --workers 8 "$@" 2>&1 \
        | grep -v "^/\|Tip\|GPU available\|TPU available\|Tensor Cores\|Seed set\|LOCAL_RANK" | tee -a "$DEST/$name.txt"
}

# 2. The candidate speed-ups of bench/experiments.py: first checked against the layers they replace (on the
#    GPU, fp32), then bs1024 (target: >= 100k img/s on an H200) with and without each (exp_nchw_image_strides:
#    gangen before layers.nhwc_strides, the paired baseline of that change), with CUDA graphs
#    (the default) and bn_act eager too (if compiled code breaks the capture, that row still shows what
#    its kernels save). The compiled variants spend up to a minute or two compiling.
if want experiments; then
    echo "== bench/experiments.py" | tee "$DEST/experiments.txt"
    timeout 60 $PY bench/experiments.py 2>&1 | grep -v "^W[0-9]\|warn" | tee -a "$DEST/experiments.txt"
    part bs1024_all 420 --batch_size 1024 --steps 40 --warmup 10 --repeats 1 --child_timeout 120 --variants gangen \
        exp_nchw_image_strides exp_gemm_image exp_bn_act exp_bn_act_eager exp_both
fi
# 2b. The same batch-1024 rows without the experiments' checks, bn_act eager and both together.
want bs1024 && part bs1024 250 --batch_size 1024 --steps 40 --warmup 10 --repeats 1 --child_timeout 110 \
    --variants gangen exp_nchw_image_strides exp_gemm_image exp_bn_act
# 3. bs128: the classic loop (8 workers) vs gangen's defaults (bf16-mixed, channels_last, fused Adam,
#    on-device batches, no host sync per batch, the whole step as CUDA graphs, with the rate of the
#    captured step replayed alone: the GPU-side ceiling), gangen before layers.nhwc_strides, and both layer
#    experiments together.
#    With bs1024 named too (one short call), exp_both is left out here.
BOTH=exp_both
want bs1024 && BOTH=
want bs128 && part bs128 210 --batch_size 128 --steps 200 --warmup 30 --repeats 2 --child_timeout 100 \
    --variants gangen exp_nchw_image_strides $BOTH

# 4. The whole CLI with the default (captured) step: r1gan (R1 every 16 + EMA: two graphs), grids,
#    checkpoints, a resume.
if want cli; then
    RUNS=$(mktemp -d)
    echo "== cli: r1gan (defaults: CUDA graphs), 2 epochs, then resumed for a 3rd" | tee "$DEST/cli.txt"
    for epochs in 2 3; do
        t=$SECONDS
        timeout 80 $PY cli.py fit --config configs/r1gan_fashion_mnist.yaml \
            --data.root "$FMNIST" --trainer.logger.init_args.save_dir "$RUNS" --trainer.max_epochs $epochs \
            --ckpt_path last 2>&1 | grep -E "^gangen|Error|error|Traceback|Restored" | tail -8 | tee -a "$DEST/cli.txt"
        echo "max_epochs $epochs: $((SECONDS - t)) s" | tee -a "$DEST/cli.txt"
    done
    find "$RUNS" -name "*.ckpt" -o -name "*.png" | sort | tee -a "$DEST/cli.txt"
    for csv in $(find "$RUNS" -name metrics.csv | sort); do
        echo "$csv: $(wc -l <"$csv") lines" && head -1 "$csv" && grep -v "^[0-9]*,[0-9]*,*$" "$csv" | tail -2
    done 2>&1 | tee -a "$DEST/cli.txt"
fi

# 5. Where a GPU-bound bs1024 step spends its time: the top kernels of the eager step, operators by input
#    shape, who asks for the activation-sized copies (1.6 ms of 14.3 on an H200), kernels by kind.
if want profile; then
    echo "== profile: bench/profile_step.py --device cuda --batch_size 1024 --variant gangen_eager" | tee "$DEST/profile.txt"
    timeout 70 $PY bench/profile_step.py --device cuda --batch_size 1024 --variant gangen_eager --steps 10 --warmup 10 \
        --root "$FMNIST" --shapes --callers aten::copy_ --rows 20 2>&1 \
        | grep -v "^/\|Tip\|GPU available\|TPU available\|Tensor Cores\|Seed set\|LOCAL_RANK\|warn" | tee -a "$DEST/profile.txt"
fi

# 6. Each layer at bs1024 in NHWC, and what torch.compile'd batchnorm + activation blocks would save.
if want layers; then
    echo "== layers: bench/layer_speed.py --batch_size 1024 --formats NHWC --compile" | tee "$DEST/layers.txt"
    timeout 150 $PY bench/layer_speed.py --batch_size 1024 --formats NHWC --compile 2>&1 | grep -v "^W[0-9]\|warn" \
        | tee -a "$DEST/layers.txt"
fi
# 7. An RGB image folder (CelebA-like JPEGs made from the Fashion-MNIST files): the one-time decode on all the
#    machine's cores, the data paths alone on the CPU cores, then batch 128 on the GPU: classic (torchvision
#    ImageFolder, 8 workers) vs gangen's default (decoded once, on-device batches) vs gangen decoding per image
#    (--data.cache false, 8 workers).
if want folder; then
    FOLDER=$(mktemp -d)/celeba_like
    echo "== folder: 20000 JPEGs of 178x218 in $FOLDER" | tee "$DEST/folder.txt"
    timeout 60 $PY bench/make_image_folder.py "$FOLDER" --num_images 20000 --fmnist "$FMNIST" | tee -a "$DEST/folder.txt"
    timeout 60 $PY bench/setup_speed.py --root "$FOLDER" 2>&1 | tee -a "$DEST/folder.txt"  # decode on all cores
    timeout 90 $PY bench/loader_speed.py --root "$FOLDER" --batches 100 --workers 8 2>&1 | tee -a "$DEST/folder.txt"
    timeout 150 $PY bench/throughput.py --device cuda --root "$FOLDER" --workers 8 --batch_size 128 --steps 150 \
        --warmup 20 --repeats 1 --child_timeout 60 --variants gangen gangen_pil 2>&1 \
        | grep -v "^/\|Tip\|GPU available\|TPU available\|Tensor Cores\|Seed set\|LOCAL_RANK" | tee -a "$DEST/folder.txt"
fi
echo "elapsed $(($(date +%s) - T0)) s" | tee -a "$DEST/gpu.txt"
