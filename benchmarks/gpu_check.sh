#!/usr/bin/env bash
# The GPU check, in one script, for a CUDA machine with PyTorch and no network.
#
#   benchmarks/gpu_check.sh prepare          # here, before the loan: fills .carry/ (about 40 MB)
#   benchmarks/gpu_check.sh run OUT_DIR      # there: figures into OUT_DIR, bounded to 9 minutes
#
# `prepare` tokenizes the shared corpus into .carry/run/data and copies the tokenizer cache, the
# two things that do not travel. `run` needs only torch, tiktoken, numpy and pandas (no W&B, no
# papermill), and writes at most 9 files:
#   1. the side-by-side benchmark at the paper preset, batch 8 and 64 (eager);
#   2. the LM head + loss alone, for each way of cutting the vocabulary (whole, 64-aligned + tail,
#      slices) against the unfused loss: whether the GPU default (whole) should change;
#   3. the benchmark at batch 8 with torch.compile, to see whether compile helps there;
#   4. time permitting, a short real training run of each model at the paper preset on that data.
# It exits 1, naming them, when any stage failed, and says which stages it skipped for lack of time.
# DEVICE, PRESET, BATCHES, STEPS, TRAIN_STEPS, BUDGET (seconds) and RUN_DIR change what it runs
# (the tests run it on a CPU at the smoke preset, so that it cannot rot between loans).
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${CARRY:-.carry}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-paper}
BATCHES=${BATCHES:-8 64}
STEPS=${STEPS:-30}
BUDGET=${BUDGET:-540}     # seconds for the whole run

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
    left() { echo $(( BUDGET - ($(date +%s) - start) )); }
    failed=() skipped=()
    # stage NAME LOG COMMAND...: run it, its output on the terminal and in LOG; remember a failure.
    stage() {
        local name=$1 log=$2
        shift 2
        "$@" 2>&1 | tee "$log"
        local rc=${PIPESTATUS[0]}
        [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
    }
    { nvidia-smi || true; $PY -c "import torch; print('torch', torch.__version__, torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"; } > "$OUT/environment.txt" 2>&1
    bench="$PY benchmarks/train_throughput.py --preset $PRESET --device $DEVICE --steps $STEPS --warmup 5"
    # shellcheck disable=SC2086
    stage bench "$OUT/bench.log" timeout 200 $bench --batch-size $BATCHES --json "$OUT/bench.json"
    stage head_loss "$OUT/head_loss.log" timeout 60 $PY benchmarks/lm_head_loss.py --preset "$PRESET" \
        --device "$DEVICE" --rounds 3 --json "$OUT/head_loss.json"
    if [ "$(left)" -gt 300 ]; then
        # shellcheck disable=SC2086
        stage compile "$OUT/bench_compile.log" timeout 150 $bench --batch-size ${BATCHES%% *} --compile \
            --json "$OUT/bench_compile.json"
    else
        skipped+=(compile)
    fi
    if [ "$(left)" -gt 60 ]; then
        stage short_train "$OUT/short_train.log" timeout "$(left)" $PY benchmarks/short_train.py \
            --data "$CARRY/run/data" --run-dir "${RUN_DIR:-/tmp/gpu_run}" --preset "$PRESET" \
            --max-steps "${TRAIN_STEPS:-3000}" --set device="$DEVICE" --set eval_freq=500 --set test_windows=0 \
            --set checkpoint_every=100000 --json "$OUT/short_train.json"
    else
        skipped+=(short_train)
    fi
    [ ${#skipped[@]} -eq 0 ] || echo "gpu_check: skipped for lack of time: ${skipped[*]}"
    if [ ${#failed[@]} -gt 0 ]; then
        echo "gpu_check FAILED after $(( $(date +%s) - start )) s: ${failed[*]}"
        exit 1
    fi
    echo "gpu_check finished in $(( $(date +%s) - start )) s"
    ;;
*)
    echo "usage: $0 prepare | run OUT_DIR" >&2
    exit 2
    ;;
esac
