#!/usr/bin/env bash
# Train the evaluation reference models (train_configs/shakespeare_8x384.toml) at linear-attention
# ratios 0, 0.5 and 1.0 for each seed, all at once on one machine, then run every evaluation tool
# on their final checkpoints. What benchmarks/results/eval/ holds was made with it.
#
#   scripts/eval_ratios.sh OUT_DIR [TorchTitan overrides for every training run]
#   e.g. scripts/eval_ratios.sh /tmp/evalrun --compile.enable true
#
# Environment (defaults in brackets): RATIOS [0 0.5 1], SEEDS [0 1], SEQ_LENS [512 2048 8192]
# (1x, 4x, 16x the training length), PASSKEY_LENGTHS [512 1024 2048 4096 8192 16384 32768],
# PASSKEY_DEPTHS [0 0.25 0.5 0.75 1], PASSKEY_TRIALS [10], HARNESS_LIMIT [none: every document of
# the shipped lm-eval tasks; the harness runs where lm-eval is installed], PYTHON [python3], PLOT [1: write PNGs],
# CONFIG [train_configs/shakespeare_8x384.toml: the base TOML; its linear_attn_ratio line is replaced].
# Evaluations run on seed 0's checkpoints (passkey, attention maps, lm-eval harness) except perplexity, which runs on every seed (its
# spread between seeds is what a difference between ratios is judged against).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/eval_ratios.sh OUT_DIR [overrides]}
shift
PYTHON=${PYTHON:-python3}
CONFIG=${CONFIG:-train_configs/shakespeare_8x384.toml}
read -r -a RATIOS <<< "${RATIOS:-0 0.5 1}"
read -r -a SEEDS <<< "${SEEDS:-0 1}"
read -r -a SEQ_LENS <<< "${SEQ_LENS:-512 2048 8192}"
read -r -a PK_LENGTHS <<< "${PASSKEY_LENGTHS:-512 1024 2048 4096 8192 16384 32768}"
read -r -a PK_DEPTHS <<< "${PASSKEY_DEPTHS:-0 0.25 0.5 0.75 1}"
PK_TRIALS=${PASSKEY_TRIALS:-10}
mkdir -p "$OUT"

plot() {  # --plot FILE when PLOT=1
  [[ ${PLOT:-1} == 1 ]] && echo "--plot" "$1"
  return 0
}

# One TOML per ratio, so every tool reads the model from its config alone.
cfg() { echo "$OUT/ratio$1.toml"; }
for r in "${RATIOS[@]}"; do
  sed "s/^linear_attn_ratio = .*/linear_attn_ratio = $r/" "$CONFIG" > "$(cfg "$r")"
done

# Training: every (ratio, seed) at once; several small models share one GPU well.
pids=()
for r in "${RATIOS[@]}"; do
  for s in "${SEEDS[@]}"; do
    run=$OUT/ratio$r-seed$s
    mkdir -p "$run"
    # The record titan_linear.analysis.runs / report group the seeds by (as the sweep driver writes it).
    printf '{"name": "ratio%s-seed%s", "group": "ratio%s", "base_config": "%s", "overrides": {"model.linear_attn_ratio": %s, "debug.seed": %s}, "seed": %s}\n' \
      "$r" "$s" "$r" "$CONFIG" "$r" "$s" "$s" > "$run/run.json"
    PYTHON=$PYTHON ./run_train.sh --config "$(cfg "$r")" --job.dump_folder "$run" \
      --debug.seed "$s" "$@" > "$run/train.log" 2>&1 &
    pids+=($!)
  done
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
if [[ $failed == 1 ]]; then
  for f in "$OUT"/*/train.log; do echo "== $f"; tail -3 "$f"; done
  echo "eval_ratios.sh: a training run failed" >&2
  exit 1
fi

ckpt() { echo "$OUT/ratio$1-seed$2/checkpoint"; }

# Evaluation: the tools of one checkpoint run one after another, checkpoints at once.
pids=()
for r in "${RATIOS[@]}"; do
  for s in "${SEEDS[@]}"; do
    (
      e=$OUT/ratio$r-seed$s/eval
      mkdir -p "$e"
      common=(--config "$(cfg "$r")" --checkpoint "$(ckpt "$r" "$s")")
      "$PYTHON" -m titan_linear.eval.perplexity "${common[@]}" --dataset tinyshakespeare_val \
        --seq-lens "${SEQ_LENS[@]}" --bucket-size 256 --out "$e/perplexity.json" \
        $(plot "$e/perplexity.png")
      if [[ $s == "${SEEDS[0]}" ]]; then
        "$PYTHON" -m titan_linear.eval.passkey "${common[@]}" --lengths "${PK_LENGTHS[@]}" \
          --depths "${PK_DEPTHS[@]}" --trials "$PK_TRIALS" --out "$e/passkey.json" \
          $(plot "$e/passkey.png")
        "$PYTHON" -m titan_linear.eval.attention_maps "${common[@]}" \
          --text-file titan_linear/assets/eval/attention_text.txt --max-tokens 128 \
          --out "$e/attention_maps.json" $(plot "$e/attention_maps.png")
        if "$PYTHON" -c 'import lm_eval' 2>/dev/null; then
          "$PYTHON" -m titan_linear.eval.harness "${common[@]}" --tasks titan_linear_shakespeare \
            --batch-size 32 ${HARNESS_LIMIT:+--limit "$HARNESS_LIMIT"} --out "$e/harness.json"
        else
          echo "eval_ratios.sh: lm-eval is not installed here: no harness.json (pip install '.[eval]')"
        fi
      fi
    ) > "$OUT/ratio$r-seed$s/eval.log" 2>&1 &
    pids+=($!)
  done
done
for p in "${pids[@]}"; do wait "$p" || failed=1; done

runs=()
for r in "${RATIOS[@]}"; do
  runs+=(--run "ratio $r=$(cfg "$r"):$(ckpt "$r" "${SEEDS[0]}")")
done
"$PYTHON" -m titan_linear.eval.samples --prompts titan_linear/assets/eval/prompts.txt "${runs[@]}" \
  --max-new-tokens 48 --out "$OUT/samples.md" > "$OUT/samples.log" 2>&1 || failed=1
if [[ $failed == 1 ]]; then
  for f in "$OUT"/*/eval.log "$OUT/samples.log"; do echo "== $f"; tail -3 "$f"; done
  echo "eval_ratios.sh: an evaluation failed" >&2
  exit 1
fi
"$PYTHON" -m titan_linear.analysis.report "$OUT"/ratio*-seed* --out-dir "$OUT/report" > "$OUT/report.log" 2>&1 ||
  { tail -3 "$OUT/report.log"; echo "eval_ratios.sh: the report failed" >&2; exit 1; }
echo "eval_ratios.sh: done, results under $OUT (report: $OUT/report/report.md)"
