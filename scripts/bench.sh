#!/usr/bin/env bash
# Runs a benchmark kept in benches/ (release build) against the test Postgres that
# scripts/test.sh sets up. Usage: scripts/bench.sh apply
set -euo pipefail
cd "$(dirname "$0")/.."
BENCH=${1:?usage: scripts/bench.sh BENCH (one of: $(ls benches | sed 's/\.rs$//' | tr '\n' ' '))}
source scripts/setup.sh
source scripts/test-postgres.sh
log "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo bench --locked --bench "$BENCH"
