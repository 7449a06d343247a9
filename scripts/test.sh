#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine (scripts/setup.sh), starts the test Postgres, and
# runs every test: formatting, clippy, unit and integration tests against the real
# Postgres, nats-server, Docker engine and git. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

source scripts/test-postgres.sh

log "cargo fmt --check"
cargo fmt --check
log "cargo clippy"
cargo clippy --locked --all-targets --quiet -- -D warnings
log "cargo test"
cargo test --locked -- --test-threads "${BERTH_TEST_THREADS:-4}"
log "systemd units and Nix files"
scripts/check-ops.sh "$PWD/target/debug/berth"
