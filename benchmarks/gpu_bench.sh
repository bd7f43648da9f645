#!/usr/bin/env bash
# The GPU benchmarks, in two halves that each fit one 10-minute device call
# (each part has its own time limit, so one slow compile does not lose the
# rest). Writes logs and JSON rows to $OUT (default ./gpu_out). Uses the jax
# already installed there.
#
#   bash benchmarks/gpu_bench.sh steps   # bench_step.py, BERT-base and ResNet-50
#   bash benchmarks/gpu_bench.sh more    # the other optimizers, packed state,
#                                        # LARS's norm forms, many-small compile
set -o pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# One process at a time measures device memory: no 75% preallocation.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
B=benchmarks/bench_step.py
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  | tee "$OUT/env.txt"
python3 -c 'import jax, optax, flax, chex
print(jax.__version__, optax.__version__, flax.__version__, chex.__version__)
print(jax.devices())' 2>&1 | tee -a "$OUT/env.txt"
part() {  # name seconds command...
  local name=$1 secs=$2
  shift 2
  timeout "$secs" python3 "$@" 2>&1 | tee "$OUT/$name.log"
}
case ${1:-steps} in
  steps)
    part bert 200 $B --json "$OUT/bert.json" --trees bert \
      --opts lamb,lamb_packed,lars,adamw,adam
    part resnet 130 $B --json "$OUT/resnet.json" --trees resnet50 --no-rss \
      --opts lamb,lamb_packed,lars,paddle.LarsMomentum,adamw,adam
    part packed_bert 150 benchmarks/packed_state.py --tree bert --rounds 11 \
      --opts lamb,optax.lamb,lars,adamw --max-sizes 65536,1048576,inf
    part packed_resnet 90 benchmarks/packed_state.py --tree resnet50 \
      --rounds 11 --opts lamb,lars --max-sizes 65536,1048576,inf
    ;;
  more)
    part bert_rest 240 $B --json "$OUT/bert_rest.json" --trees bert --no-rss \
      --opts lamb_bf16,adamw_dl,paddle.Lamb,paddle.LarsMomentum,paddle.AdamW,paddle.Adam,paddle.AdamWDL
    part norm_forms 120 benchmarks/lars_norm_forms.py
    part small 200 benchmarks/compile_many_small.py --opts lars,lamb
    ;;
  *)
    echo "usage: $0 steps|more" >&2
    exit 2
    ;;
esac
