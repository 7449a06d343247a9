#!/usr/bin/env bash
# A second node for the berth started by scripts/up.sh: an agent in a process of its own
# (as it would run on another host), sharing the running berth's Postgres and NATS.
# Apps with several replicas then spread over both nodes: `berth status hello`.
# Stop it with Ctrl-C; its containers keep running until the manager moves them.
set -euo pipefail
cd "$(dirname "$0")/.."
state=${BERTH_DATA_DIR:-.berth}/berth.json
[ -f "$state" ] || { echo "start berth first: scripts/up.sh" >&2; exit 1; }
field() { sed -n "s/.*\"$1\": *\"\\([^\"]*\\)\".*/\\1/p" "$state"; }
export BERTH_DATABASE_URL=$(field database_url) BERTH_NATS_URL=$(field nats_url)
export BERTH_NODE_NAME=${BERTH_NODE_NAME:-node-b} BERTH_NODE_LABELS=${BERTH_NODE_LABELS:-zone=b}
export BERTH_DATA_DIR=.berth-node-b
exec ./target/release/berth up --components agent
