#!/usr/bin/env bash
# bash launchers/elastic.example.sh configs/RUN.yaml [key=value ...]     (on every node)
#
# A run that survives a lost node without anyone at the keyboard: torchrun's elastic agent on
# each node joins a c10d rendezvous of MIN_NODES to MAX_NODES nodes. When a node dies, the
# other ranks fail on the dead peer (one line each: engine.collective_timeout bounds a hang),
# their agents restart them (up to MAX_RESTARTS times) on the nodes that are left, and
# --resume latest continues from the last checkpoint on that smaller world, with the same
# global batches on any world that divides data.streams (the checkpoint is converted once for
# the new world). What is lost: the steps since that checkpoint (checkpoint.every), and the
# restart: the dead node's rendezvous entry expiring, LAST_CALL_S for late nodes, the ranks'
# start and the conversion (tests/test_cluster.py prints the timeline on loopback). A node
# that comes back joins at the next restart. The node at RDZV_ENDPOINT hosts the rendezvous
# store (c10d): its loss ends the job; put the endpoint on the most reliable node (or run
# torchrun with an etcd rendezvous, which no training node hosts).
#
# Set on every node: RDZV_ENDPOINT (host:port of one node, the same for all), RDZV_ID (the
# job's id); MIN_NODES, MAX_NODES, RANKS_PER_NODE, MAX_RESTARTS, LAST_CALL_S as needed.
set -euo pipefail
config=$1; shift
exec torchrun --nnodes "${MIN_NODES:-1}:${MAX_NODES:-2}" --nproc_per_node "${RANKS_PER_NODE:-8}" \
    --max-restarts "${MAX_RESTARTS:-3}" --rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" \
    --rdzv_id "$RDZV_ID" --rdzv_conf "last_call_timeout=${LAST_CALL_S:-30}" \
    --signals_to_handle SIGTERM,SIGINT,SIGUSR1 \
    launchers/train.py --config "$config" --resume latest "$@"
