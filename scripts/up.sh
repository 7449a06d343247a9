#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine (scripts/setup.sh), builds berth, starts `berth up`
# on examples/ (every component, private Postgres and nats-server under .berth/), waits
# until the example app answers through the edge, shows `berth status` and prints the URL.
# berth keeps running in the background; `scripts/up.sh stop` stops it. A second run sees
# the running one and only reports.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

# The examples folder, unless a Git repository is the source (examples/git-source.sh).
[ -n "${BERTH_GIT_URL:-}" ] || export BERTH_SPECS=${BERTH_SPECS:-examples}
export BERTH_DATA_DIR=${BERTH_DATA_DIR:-.berth}
export BERTH_EDGE_LISTEN=${BERTH_EDGE_LISTEN:-127.0.0.1:8080}
BERTH=./target/release/berth
URL="http://hello.localhost:${BERTH_EDGE_LISTEN##*:}/"

running_pid() {
    [ -f "$BERTH_DATA_DIR/berth.json" ] || return 1
    local pid
    pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$BERTH_DATA_DIR/berth.json")
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

if [ "${1:-}" = stop ]; then
    if pid=$(running_pid); then
        log "stopping berth (pid $pid)"
        kill -TERM "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    else
        log "berth is not running from $BERTH_DATA_DIR"
    fi
    exit 0
fi

# The example images are FROM scratch with Debian's static busybox next to their Dockerfile;
# the image app's image is built here (no registry is needed).
cp -u /bin/busybox examples/hello/busybox
cp -u /bin/busybox examples/static-image/busybox
docker build -q --network host -t berth-example/static:1 examples/static-image >/dev/null

if pid=$(running_pid); then
    log "berth up is already running from $BERTH_DATA_DIR (pid $pid)"
else
    log "building berth (release)"
    cargo build --release --locked --quiet
    [ -z "${BERTH_SPECS:-}" ] || "$BERTH" validate "$BERTH_SPECS"
    mkdir -p "$BERTH_DATA_DIR"
    log "starting berth up (log: $BERTH_DATA_DIR/berth.log)"
    setsid nohup "$BERTH" up >>"$BERTH_DATA_DIR/berth.log" 2>&1 </dev/null &
    pid=$!
fi

log "waiting for the example app at $URL (the first build takes a few seconds)"
for _ in $(seq 1 600); do
    if curl -sf -o /dev/null -H "Host: hello.localhost" "http://$BERTH_EDGE_LISTEN/"; then
        break
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        tail -n 30 "$BERTH_DATA_DIR/berth.log" >&2 || true
        log "berth up exited; its log is $BERTH_DATA_DIR/berth.log"
        exit 1
    fi
    sleep 0.5
done
"$BERTH" status --data-dir "$BERTH_DATA_DIR"
if ! curl -sf -H "Host: hello.localhost" "http://$BERTH_EDGE_LISTEN/"; then
    log "the example app did not answer within 5 minutes; see \`$BERTH status hello\` and $BERTH_DATA_DIR/berth.log"
    exit 1
fi
log "the example app answers through the edge: $URL  (curl $URL)"
log "berth runs in the background (pid $pid); stop it with: scripts/up.sh stop"
