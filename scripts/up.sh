#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine (scripts/setup.sh), builds berth, and runs
# `berth up` on examples/ with a private Postgres and nats-server under .berth/.
# Stop it with Ctrl-C; a second run reuses the data.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

# The example image is FROM scratch with Debian's static busybox next to its Dockerfile.
cp -u /bin/busybox examples/hello/busybox

log "building berth (release)"
cargo build --release --locked --quiet
./target/release/berth validate examples/

export BERTH_SPECS=${BERTH_SPECS:-examples}
export BERTH_DATA_DIR=${BERTH_DATA_DIR:-.berth}
log "berth up: api on http://${BERTH_API_LISTEN:-127.0.0.1:7070}/healthz (Ctrl-C stops it)"
exec ./target/release/berth up
