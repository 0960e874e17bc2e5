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
#   NNODES       nodes in the job (default 1); with NNODES > 1 also set MASTER_ADDR and
#                MASTER_PORT (the rendezvous store's host:port, on node 0) and NODE_RANK
#   NODE_RANK    this node's rank, 0..NNODES-1. When set, node 0 hosts the c10d rendezvous
#                store (torchrun --rdzv_conf is_host=1) and the other nodes only connect to it
#                (is_host=0), waiting up to read_timeout (60 s) for it to come up. Unset, every
#                node whose address matches MASTER_ADDR tries to host it and the losers fall
#                back to clients (torchrun's default; a race when nodes share a host). Global
#                ranks are handed out in join order either way, not by NODE_RANK.
#   RDZV_ID      rendezvous id shared by all nodes of one job (default titan_linear)
#   RDZV_CONF    more torchrun rendezvous settings, key=value,... (e.g. join_timeout=1200,read_timeout=120)
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
  RDZV_CONF=${RDZV_CONF:-}
  if [[ -n ${NODE_RANK:-} ]]; then
    [[ $NODE_RANK =~ ^[0-9]+$ && $NODE_RANK -lt $NNODES ]] ||
      { echo "run_train.sh: NODE_RANK=$NODE_RANK: must be an integer in [0, NNODES=$NNODES)" >&2; exit 2; }
    RDZV_CONF="is_host=$([[ $NODE_RANK -eq 0 ]] && echo 1 || echo 0)${RDZV_CONF:+,$RDZV_CONF}"
  fi
  RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d
        --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-titan_linear}"
        ${RDZV_CONF:+--rdzv_conf "$RDZV_CONF"})
else
  RDZV=(--nnodes 1 --rdzv_backend c10d --rdzv_endpoint "localhost:0")
fi

export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NGPU" "${RDZV[@]}" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m titan_linear.launch train "${ARGS[@]}"
