#!/usr/bin/env bash
# bench_step.py on an accelerator, in parts that each end within a time
# limit (so one slow compile does not lose the rest). Writes logs and JSON
# rows to $OUT (default ./gpu_out). Uses the jax already installed there.
#
#   bash benchmarks/gpu_bench.sh
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
part() {  # name seconds args...
  local name=$1 secs=$2
  shift 2
  timeout "$secs" python3 $B --json "$OUT/$name.json" "$@" 2>&1 \
    | tee "$OUT/$name.log"
}
part bert_core 240 --trees bert --opts lamb,lamb_packed,lamb_workspace,lars,adamw,adam
part bert_rest 150 --trees bert --no-rss \
  --opts lamb_8bit,lamb_bf16,adamw_dl,paddle.Lamb,paddle.LarsMomentum,paddle.AdamW,paddle.Adam,paddle.AdamWDL
part resnet 100 --trees resnet50 --no-rss \
  --opts lamb,lamb_packed,lamb_workspace,lars,paddle.LarsMomentum,adamw,adam
part small 110 --trees many_small --opts lamb,lars,adam --rounds 5 --no-rss
