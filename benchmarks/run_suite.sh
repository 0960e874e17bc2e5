#!/usr/bin/env bash
# The benchmark suite on a GPU machine, then benchmarks/report.py (SUMMARY.md and plots):
#
#   benchmarks/run_suite.sh
#   SUITE="attention inference" OUT=/tmp/bench TAG=h200 benchmarks/run_suite.sh
#
# Environment:
#   SUITE         parts to run, in order (default "tune attention e2e scaling inference"); "tune" times
#                 candidate launch parameters of the Triton kernels (chunk:sub_chunk:warps, passed
#                 to benchmarks/tune_attention.py, which runs each through triton_tuning.override)
#                 against the tuning table's entry, head dims 64 and 128 at T = 8192, into
#                 tune_<TAG>.json: a winner goes into triton_tuning.py's table by hand
#   TUNE_CANDIDATES   the candidates (default: tune_attention.py's own list)
#   TUNE_ARGS     extra arguments for tune_attention.py (e.g. TUNE_ARGS="--seq-lens 2048 65536")
#   OUT           results folder (default benchmarks/results): <part>_<TAG>.json, SUMMARY.md, PNGs
#   TAG           suffix of the JSON files (default h100)
#   ATTN_IMPLS    impls for attention.py (default: its own --impls default, which names every
#                 impl worth timing; e.g. ATTN_IMPLS="sdpa titan_triton torch_chunked_eager")
#   E2E_CONFIGS   configs for e2e_train.py (default "llama3_1b llama3_1b_linear_0.50
#                 llama3_1b_linear_1.00", at seq_len:batch 2048:4 8192:1 32768:1); e2e_train.py
#                 appends to its file and the report keeps the last row of each config and seq_len
#   SCALING_CONFIGS, SCALING_SEQ_LENS   the "scaling" part (default llama3_1b_linear_0.50 at 8192:1):
#                 e2e_train.py on 1, 2, 4, 8 GPUs (as many as present; skipped with fewer than 2) with
#                 FSDP and the same batch per GPU (weak scaling), then tensor parallel 2 on 2 GPUs
#                 (and TP 2 x FSDP 2 on 4),
#                 into scaling_<TAG>.json
#   ATTN_ARGS, E2E_ARGS, INFER_ARGS   extra arguments for each script (e.g. E2E_ARGS="--steps 50")
#   PYTHON        interpreter (default python3)
# A part that fails does not stop the others; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
TAG=${TAG:-h100}
mkdir -p "$OUT"
failed=""

scaling() {
  local n device rc=0 g
  n=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  if (( n < 2 )); then
    echo "run_suite.sh: $n GPU(s) here: scaling needs 2 or more, skipped" >&2
    return 0
  fi
  device=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')
  local common=(--configs ${SCALING_CONFIGS:-llama3_1b_linear_0.50} --seq-lens ${SCALING_SEQ_LENS:-8192:1}
                --out "$OUT/scaling_$TAG.json" --device "$device" ${E2E_ARGS:-})
  for g in 1 2 4 8; do
    (( g <= n )) || break
    "$PYTHON" benchmarks/e2e_train.py "${common[@]}" --ngpu "$g" || rc=1
  done
  "$PYTHON" benchmarks/e2e_train.py "${common[@]}" --ngpu 2 -- --parallelism.tensor_parallel_degree 2 || rc=1
  # TP without FSDP runs in fp32 (TorchTitan's mixed precision comes with FSDP); with 4 GPUs,
  # TP 2 x FSDP 2 gives the bf16 tensor-parallel figure.
  if (( n >= 4 )); then
    "$PYTHON" benchmarks/e2e_train.py "${common[@]}" --ngpu 4 -- --parallelism.tensor_parallel_degree 2 || rc=1
  fi
  return $rc
}

for part in ${SUITE:-tune attention e2e scaling inference}; do
  echo "run_suite.sh: $part" >&2
  case $part in
    tune)
      "$PYTHON" benchmarks/tune_attention.py --out "$OUT/tune_$TAG.json" \
        ${TUNE_CANDIDATES:+--candidates $TUNE_CANDIDATES} ${TUNE_ARGS:-} ;;
    attention)
      "$PYTHON" benchmarks/attention.py --out "$OUT/attention_$TAG.json" ${ATTN_IMPLS:+--impls $ATTN_IMPLS} \
        ${ATTN_ARGS:-} ;;
    e2e)
      device=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')
      "$PYTHON" benchmarks/e2e_train.py --configs ${E2E_CONFIGS:-llama3_1b llama3_1b_linear_0.50 llama3_1b_linear_1.00} \
        --seq-lens 2048:4 8192:1 32768:1 --out "$OUT/e2e_$TAG.json" --device "$device" ${E2E_ARGS:-} ;;
    scaling) scaling ;;
    inference)
      if [[ ! -f benchmarks/inference.py ]]; then
        echo "run_suite.sh: benchmarks/inference.py does not exist yet: inference skipped" >&2
        continue
      fi
      "$PYTHON" benchmarks/inference.py --out "$OUT/inference_$TAG.json" ${INFER_ARGS:-} ;;
    *) echo "run_suite.sh: unknown part '$part' in SUITE (allowed: tune attention e2e scaling inference)" >&2; exit 2 ;;
  esac || failed+=" $part"
done

"$PYTHON" benchmarks/report.py --results "$OUT" || failed+=" report"
if [[ -n $failed ]]; then
  echo "run_suite.sh: failed:$failed" >&2
  exit 1
fi
