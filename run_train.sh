#!/usr/bin/env bash
# Train with TorchTitan's TOML loop and the titan_linear models.
#
#   ./run_train.sh                                   # the debug model (train_configs/debug_model.toml)
#   ./run_train.sh --config train_configs/llama3_1b_linear_0.50.toml --training.steps 20
#
# Any argument after --config FILE is a TorchTitan override (--section.key value).
# Environment:
#   NGPU         processes per node (default: the GPUs present, else 1)
#   LOG_RANK     local ranks whose output is shown (default 0; e.g. 0,1)
#   NNODES       nodes in the job (default 1); with NNODES > 1 also set
#   NODE_RANK    this node's rank (informational: with c10d rendezvous torchrun assigns global
#                ranks in join order), MASTER_ADDR and MASTER_PORT (rendezvous host:port)
#   RDZV_ID      rendezvous id shared by all nodes of one job (default titan_linear)
#   PYTHON       interpreter to use (default python3)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
CONFIG=train_configs/debug_model.toml
if [[ $# -ge 1 && $1 == "--config" ]]; then
  [[ $# -ge 2 ]] || { echo "run_train.sh: --config needs a file" >&2; exit 2; }
  CONFIG=$2
  shift 2
elif [[ $# -ge 1 && $1 == --config=* ]]; then
  CONFIG=${1#--config=}
  shift
fi

if [[ -z ${NGPU:-} ]]; then
  NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)
fi
LOG_RANK=${LOG_RANK:-0}
NNODES=${NNODES:-1}

ARGS=(--job.config_file "$CONFIG" "$@")

# Validate the whole config once, before any process starts or anything is written.
"$PYTHON" -m titan_linear.launch check "${ARGS[@]}"

if [[ $NNODES -gt 1 ]]; then
  : "${MASTER_ADDR:?set MASTER_ADDR for a multi-node run}" "${MASTER_PORT:?set MASTER_PORT for a multi-node run}"
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d
        --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-titan_linear}")
else
  RDZV=(--nnodes 1 --rdzv_backend c10d --rdzv_endpoint "localhost:0")
fi

export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NGPU" "${RDZV[@]}" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m titan_linear.launch train "${ARGS[@]}"
