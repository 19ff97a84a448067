#!/usr/bin/env bash
# The GPU check, in one script, for a CUDA machine with PyTorch and no network.
#
#   benchmarks/gpu_check.sh prepare          # here, before the loan: fills .carry/ (about 40 MB)
#   benchmarks/gpu_check.sh run OUT_DIR      # there: figures into OUT_DIR, in under 10 minutes on an H200
#
# `prepare` tokenizes the shared corpus into .carry/run/data and copies the tokenizer cache, the
# two things that do not travel. `run` needs only torch, tiktoken, numpy and pandas (no W&B, no
# papermill): the side-by-side benchmark at the paper preset (batch 8 and 64), then, time
# permitting, a short real training run of each model at the paper preset on that data.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.carry}
PY=${PYTHON:-python3}

case "${1:-}" in
prepare)
    CORPUS=${CORPUS_DIR:-../shared/corpus/pt-literature}
    mkdir -p "$CARRY/tiktoken_cache"
    cp "${TIKTOKEN_CACHE_DIR:-../shared/tiktoken_cache}"/* "$CARRY/tiktoken_cache/"
    TIKTOKEN_CACHE_DIR="$CARRY/tiktoken_cache" $PY -c "
import sys; from llm_nb_utils.prepare import prepare_data
prepare_data(sys.argv[1], sys.argv[2])" "$CORPUS" "$CARRY/run/data"
    du -sh "$CARRY"
    ;;
run)
    OUT=${2:?usage: gpu_check.sh run OUT_DIR}
    mkdir -p "$OUT"
    export TIKTOKEN_CACHE_DIR="$CARRY/tiktoken_cache" PYTHONUNBUFFERED=1
    start=$(date +%s)
    { nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } \
        > "$OUT/environment.txt" 2>&1
    timeout 240 $PY benchmarks/train_throughput.py --preset paper --device cuda --batch-size 8 64 --steps 30 \
        --warmup 5 --json "$OUT/bench_paper.json" 2>&1 | tee "$OUT/bench_paper.log"
    left=$(( 540 - ($(date +%s) - start) ))
    if [ "$left" -gt 120 ]; then
        # Steps sized to the time left: each model gets half of it, evaluation included.
        timeout "$left" $PY benchmarks/short_train.py --data "$CARRY/run/data" --run-dir /tmp/gpu_run \
            --preset paper --max-steps "${TRAIN_STEPS:-3000}" --set eval_freq=500 --set test_batches=200 \
            --set checkpoint_every=100000 --json "$OUT/short_train.json" 2>&1 | tee "$OUT/short_train.log"
    fi
    echo "gpu_check finished in $(( $(date +%s) - start )) s"
    ;;
*)
    echo "usage: $0 prepare | run OUT_DIR" >&2
    exit 2
    ;;
esac
