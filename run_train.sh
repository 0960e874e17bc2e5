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

PYTHON=${PYTHON:-python3}
CONFIG=
if [[ $# -ge 1 && $1 == "--config" ]]; then
  [[ $# -ge 2 ]] || { echo "run_train.sh: --config needs a file" >&2; exit 2; }
  CONFIG=$2
  shift 2
elif [[ $# -ge 1 && $1 == --config=* ]]; then
  CONFIG=${1#--config=}
  shift
fi
# A relative --config is the caller's; the run itself works from the repository, so that
# the shipped configs' dump folders (./outputs/...) land there.
if [[ -n $CONFIG && $CONFIG != /* && -e $CONFIG ]]; then
  CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
fi
cd "$(dirname "$0")"
CONFIG=${CONFIG:-train_configs/debug_model.toml}

if [[ -z ${NGPU:-} ]]; then
  NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)' 2>/dev/null || echo 1)
fi
LOG_RANK=${LOG_RANK:-0}
export NNODES=${NNODES:-1}

ARGS=(--job.config_file "$CONFIG" "$@")

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
# `launch run` checks the whole config, data and resume point before any process starts
# or anything is written (one line and exit 2 on a problem), locks the dump folder, then
# runs torchrun with one `python -m titan_linear.train` per rank.
exec "$PYTHON" -m titan_linear.launch run --nproc_per_node "$NGPU" "${RDZV[@]}" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 -- "${ARGS[@]}"
