#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine (scripts/setup.sh), builds berth, and runs
# `berth up` on examples/ with a private Postgres and nats-server under .berth/.
# Stop it with Ctrl-C; a second run reuses the data.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

export BERTH_SPECS=${BERTH_SPECS:-examples}
export BERTH_DATA_DIR=${BERTH_DATA_DIR:-.berth}

# Already running from this data directory? Then there is nothing to start.
if [ -f "$BERTH_DATA_DIR/berth.json" ]; then
    pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$BERTH_DATA_DIR/berth.json")
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        log "berth up is already running from $BERTH_DATA_DIR (pid $pid): $(sed -n 's/.*"api_url": *"\([^"]*\)".*/\1/p' "$BERTH_DATA_DIR/berth.json")/healthz"
        exit 0
    fi
fi

# The example image is FROM scratch with Debian's static busybox next to its Dockerfile.
cp -u /bin/busybox examples/hello/busybox

log "building berth (release)"
cargo build --release --locked --quiet
./target/release/berth validate examples/

log "berth up: api on http://${BERTH_API_LISTEN:-127.0.0.1:7070}/healthz (Ctrl-C stops it)"
exec ./target/release/berth up
